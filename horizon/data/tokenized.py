"""Tokenised text from local files, packed into windows, in a seeded order with a resumable cursor.

Why: a resumed run must see exactly the samples the uninterrupted run would have, so the loader's
position is part of the checkpoint (``Trainer.register_data``). The whole order follows from the
seed: each file is one document, tokenised (bytes, or a tokenizer the user hands in: a
``tokenizers.Tokenizer``, a ``transformers`` tokenizer, or a local ``tokenizer.json`` / tokenizer
folder; nothing is downloaded), ended by the EOS token when there is one, and the documents are
concatenated and cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs and labels
shifted by one). Epoch ``e`` visits the windows in the permutation seeded by ``(seed, e)``, in
batches of ``batch_size`` (an incomplete last batch is dropped). The cursor is just (epoch, batch).
Under data parallelism every rank draws the same permutation and takes its own ``batch_size``
windows of each group of ``num_ranks * batch_size``, so the cursor is the same on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["TokenizedText", "load_tokenizer", "encode", "tokenizer_vocab_size"]


def load_tokenizer(source):
    """``source`` as an object with ``encode``: a tokenizer.json file or a local tokenizer folder
    (``AutoTokenizer``, local files only), or a tokenizer object passed through."""
    if not isinstance(source, (str, os.PathLike)):
        if not callable(getattr(source, "encode", None)):
            raise ValueError(f"tokenizer must have encode(text), got {type(source).__name__}")
        return source
    path = Path(source)
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    raise ValueError(f"tokenizer {os.fspath(source)!r} is neither a tokenizer.json file nor a tokenizer folder")


def encode(tokenizer, text: str) -> list[int]:
    """``text`` as token ids: its UTF-8 bytes when ``tokenizer`` is None, no special tokens added."""
    if tokenizer is None:
        return list(text.encode())
    out = tokenizer.encode(text, add_special_tokens=False) if _is_transformers(tokenizer) else tokenizer.encode(text)
    return list(getattr(out, "ids", out))  # tokenizers returns an Encoding, transformers a list


def tokenizer_vocab_size(tokenizer) -> int:
    """Token ids ``tokenizer`` may produce (256 for bytes): the model's vocabulary must be at least this."""
    if tokenizer is None:
        return 256
    if callable(getattr(tokenizer, "get_vocab_size", None)):  # tokenizers.Tokenizer
        return tokenizer.get_vocab_size(with_added_tokens=True)
    return len(tokenizer)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rank" else 1):
            raise ValueError(f"TokenizedText {name} must be an int >= {0 if name == 'rank' else 1}, got {value!r}")
    if sizes["rank"] >= sizes["num_ranks"]:
        raise ValueError(f"TokenizedText rank={sizes['rank']} must be below num_ranks={sizes['num_ranks']}")


def _is_transformers(tokenizer) -> bool:
    return hasattr(tokenizer, "convert_tokens_to_ids")


def _eos_id(tokenizer) -> int | None:
    if tokenizer is None or not _is_transformers(tokenizer):
        return None
    return tokenizer.eos_token_id


class TokenizedText:
    """An endless iterator of ``{"input_ids", "labels"}`` batches ([batch_size, seq_len] int64).

    ``tokenizer=None`` means bytes (a token is a byte, vocabulary 256). ``eos_token_id`` ends every
    document (default: the transformers tokenizer's EOS, none otherwise). ``state_dict()`` /
    ``load_state_dict(state)`` save and restore the position; register it with ``Trainer.register_data``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer=None, *, seq_len: int,
                 batch_size: int, seed: int = 0, eos_token_id: int | None = None, rank: int = 0,
                 num_ranks: int = 1) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        _check_sizes(seq_len=seq_len, batch_size=batch_size, rank=rank, num_ranks=num_ranks)
        missing = [os.fspath(p) for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise ValueError(f"TokenizedText needs text files; not files: {missing or 'none given'}")
        self.tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
        eos = eos_token_id if eos_token_id is not None else _eos_id(self.tokenizer)
        ids: list[int] = []
        for path in paths:
            ids += encode(self.tokenizer, Path(path).read_text()) + ([eos] if eos is not None else [])
        self._pack(torch.tensor(ids, dtype=torch.int64), seq_len, batch_size, seed, rank, num_ranks)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, *, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                    num_ranks: int = 1) -> "TokenizedText":
        """The same windows, order and cursor over a stream tokenised already (a 1-D integer tensor),
        e.g. the training part of a corpus whose end is held out (``horizon train``)."""
        _check_sizes(seq_len=seq_len, batch_size=batch_size, rank=rank, num_ranks=num_ranks)
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"TokenizedText.from_tokens needs a 1-D integer tensor, got {tokens.dtype} "
                             f"of shape {tuple(tokens.shape)}")
        data = cls.__new__(cls)
        data.tokenizer = None
        data._pack(tokens.long(), seq_len, batch_size, seed, rank, num_ranks)
        return data

    def _pack(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int,
              num_ranks: int) -> None:
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.num_ranks = rank, num_ranks
        self.num_windows = (len(tokens) - 1) // seq_len
        self.batches_per_epoch = self.num_windows // (batch_size * num_ranks)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(tokens)} tokens make {self.num_windows} windows of {seq_len} + 1, fewer than one "
                             f"batch of {batch_size} per rank for {num_ranks} rank(s): lower seq_len or batch_size, "
                             "or add text")
        self.epoch, self.batch = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def window(self, index: int) -> torch.Tensor:
        """Window ``index`` of the token stream: ``seq_len + 1`` tokens starting at ``index * seq_len``."""
        start = index * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def __iter__(self) -> "TokenizedText":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        first = (self.batch * self.num_ranks + self.rank) * self.batch_size
        picked = self._order[first:first + self.batch_size]
        windows = torch.stack([self.window(int(i)) for i in picked])
        self.batch += 1
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def _fingerprint(self) -> dict:
        return {"num_tokens": len(self.tokens), "seq_len": self.seq_len, "batch_size": self.batch_size,
                "seed": self.seed, "num_ranks": self.num_ranks}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            raise ValueError(f"this data cursor was saved for {saved}, but this loader has {self._fingerprint()}: "
                             "resume with the same files, tokenizer, seq_len, batch_size and seed")
        if not 0 <= state["batch"] <= self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"data cursor {state} is out of range ({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.batch = state["epoch"], state["batch"]
        self._order = self._permutation(self.epoch)
