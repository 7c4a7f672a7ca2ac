"""Byte-level text for the reference decoder: a token is a byte, so there is no tokenizer to fetch.

The default corpus is the Python standard library's own ``*.py`` source, which every machine
with Python has; any file can be used instead. Batches are random windows of ``seq_len + 1``
bytes with labels shifted by one; the validation set is the last slice of the stream.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "load_corpus", "split", "sample_batch", "validation_batches"]

VOCAB_SIZE = 256
"""Byte-level tokens: a token is a byte value."""
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__",
                          "test", "tests", "idle_test", "encodings", "pydoc_data"})
"""Folders left out: third-party packages (they can live under the stdlib folder), the test suites,
and generated tables (codec maps, pydoc's topics). The last two are repetitive enough that a
held-out slice of them would be nearly a copy of the training text and flatter the validation loss."""


def stdlib_sources(root: Path) -> list[Path]:
    """Every ``*.py`` file under the stdlib folder but those in ``SKIPPED_DIRS``, sorted by path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        found.extend(Path(folder, f) for f in files if f.endswith(".py"))
    return sorted(found)


def _stdlib_corpus(max_bytes: int) -> tuple[bytes, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in stdlib_sources(root):
        if total >= max_bytes:
            break
        with contextlib.suppress(OSError):
            data = path.read_bytes()[: max_bytes - total]
            chunks.append(data)
            total += len(data)
    if total == 0:
        raise ValueError(f"found no readable *.py files under {root}")
    return b"".join(chunks), f"{len(chunks)} stdlib files"


def load_corpus(source: str, max_bytes: int) -> tuple[torch.Tensor, str]:
    """(at most ``max_bytes`` of text as a uint8 tensor, a description); ``source`` is "stdlib" or a path."""
    if source == "stdlib":
        data, what = _stdlib_corpus(max_bytes)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--text {source!r} is not a file; pass a text file or 'stdlib'")
        data, what = path.read_bytes()[:max_bytes], str(path)
        if not data:
            raise ValueError(f"--text {source!r} is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), what


def split(data: torch.Tensor, val_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation): the validation set is the last ``val_fraction`` of the byte stream."""
    num_val = max(int(len(data) * val_fraction), seq_len + 1)
    if len(data) - num_val < seq_len + 1:
        raise ValueError(f"{len(data)} bytes of text are too few for --seq-len {seq_len}")
    return data[:-num_val], data[-num_val:]


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random windows of ``seq_len + 1`` bytes; labels are the inputs shifted by one byte."""
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
    return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}


def validation_batches(data: torch.Tensor, batch_size: int, seq_len: int,
                       num_batches: int) -> list[dict[str, torch.Tensor]]:
    """Fixed windows spread evenly over the validation bytes, the same for every evaluation."""
    num_windows = min(batch_size * num_batches, (len(data) - 1) // seq_len)
    last_start = len(data) - seq_len - 1
    starts = torch.linspace(0, last_start, num_windows).long().tolist()
    windows = torch.stack([data[s: s + seq_len + 1] for s in starts]).long()
    return [{"input_ids": w[:, :-1], "labels": w[:, 1:]} for w in windows.split(batch_size)]
