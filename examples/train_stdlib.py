"""Train Horizon's reference decoder on the Python standard library's own source, end to end.

What this shows: a plain ``nn.Module`` (``horizon.models.Decoder``) handed to ``horizon.Trainer``,
which moves its parameters into the host store and trains it one exact step per ``step(batch)``
call, on real text that every machine with Python already has. The text is the stdlib's ``*.py``
files, read in sorted path order and capped at a few MB; tokens are bytes (vocabulary 256,
token = byte value), so there is no tokenizer to download. The last ~5% of the byte stream is
held out, and the validation loss is computed before and after training with the model itself:
its parameters are views of Horizon's fp32 master weights, so ``model(x)`` under
``torch.no_grad()`` evaluates the weights the trainer is updating.

The defaults finish in about two minutes on a 2-core CPU; the loss goes from ~5.5 (uniform over
256 bytes) to well under 3. The run exits non-zero if the validation loss did not go down.

    python examples/train_stdlib.py                  # the defaults (make run)
    python examples/train_stdlib.py --steps 400 --plan keep --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import horizon
from horizon.models import PRESETS, Decoder, decoder_config
from horizon.store import format_bytes

VOCAB_SIZE = 256
"""Byte-level tokens: a token is a byte value."""
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Third-party packages can live under the stdlib folder; they are not the stdlib."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train Horizon's reference decoder on the Python standard library's source (byte-level).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps to train (count)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (count)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (bytes)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS),
                        help="decoder shape from horizon.models.PRESETS (vocabulary forced to 256 bytes)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (constant, per step)")
    parser.add_argument("--plan", default="recompute", choices=["recompute", "keep"],
                        help="activation plan for every block: recompute in backward, or keep them")
    parser.add_argument("--device", default="cpu", help="where units compute: 'cpu' or 'cuda' / 'cuda:N'")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch order")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="validate every this many steps (steps; 0 = only before and after training)")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="validation batches of --batch-size x --seq-len tokens per evaluation (count)")
    parser.add_argument("--max-bytes", type=int, default=4 << 20,
                        help="cap on the stdlib source read (bytes)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "max_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    return args


def stdlib_sources(root: Path) -> list[Path]:
    """Every ``*.py`` file under the stdlib folder, third-party packages left out, sorted by path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        found.extend(Path(folder, f) for f in files if f.endswith(".py"))
    return sorted(found)


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, int]:
    """(the stdlib's source as a uint8 tensor of at most ``max_bytes``, number of files read)."""
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
        raise SystemExit(f"found no readable *.py files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8), len(chunks)


def split(data: torch.Tensor, val_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation): the validation set is the last ``val_fraction`` of the byte stream."""
    num_val = max(int(len(data) * val_fraction), seq_len + 1)
    if len(data) - num_val < seq_len + 1:
        raise SystemExit(f"{len(data)} bytes of text are too few for --seq-len {seq_len}")
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-byte cross-entropy (nats) of the model's current weights over ``batches``."""
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for batch in batches:
            logits = model(batch["input_ids"])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                           reduction="sum"))
            count += batch["labels"].numel()
        return total / count
    finally:
        model.train(was_training)


def train_batches(data: torch.Tensor, args: argparse.Namespace) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        yield sample_batch(data, args.batch_size, args.seq_len, generator)


def postfix(smoothed_loss: float, tokens: int, seconds: float, memory: horizon.MemoryReport) -> dict[str, str]:
    return {"loss": f"{smoothed_loss:.3f}",
            "tok/s": f"{tokens / seconds:,.0f}" if seconds > 0 else "-",
            "host": format_bytes(memory.host_bytes),
            "dev peak": format_bytes(memory.device_peak_bytes)}


def train(trainer: horizon.Trainer, model: torch.nn.Module, train_data: torch.Tensor,
          val_batches: list[dict[str, torch.Tensor]], args: argparse.Namespace) -> tuple[float, float]:
    """Run ``args.steps`` steps; returns (first step's loss, smoothed loss at the end)."""
    first_loss = smoothed = math.nan
    tokens, seconds = 0, 0.0
    bar = tqdm(train_batches(train_data, args), total=args.steps, unit="step", dynamic_ncols=True)
    for batch in bar:
        m = trainer.step(batch)
        if m.step == 1:
            first_loss = smoothed = m.loss
        smoothed = 0.9 * smoothed + 0.1 * m.loss
        tokens, seconds = tokens + m.tokens, seconds + m.seconds
        bar.set_postfix(postfix(smoothed, tokens, seconds, trainer.memory()), refresh=False)
        if args.eval_every and m.step % args.eval_every == 0 and m.step < args.steps:
            bar.write(f"step {m.step}: validation loss {evaluate(model, val_batches):.3f}")
    bar.close()
    return first_loss, smoothed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_s = time.perf_counter()
    torch.manual_seed(args.seed)

    data, num_files = load_corpus(args.max_bytes)
    train_data, val_data = split(data, val_fraction=0.05, seq_len=args.seq_len)
    val_batches = validation_batches(val_data, args.batch_size, args.seq_len, args.eval_batches)
    print(f"text: {num_files} stdlib files, {format_bytes(len(data))} "
          f"({len(train_data):,} bytes train, {len(val_data):,} held out)")

    model = Decoder(decoder_config(args.preset, vocab_size=VOCAB_SIZE))
    num_params = sum(p.numel() for p in model.parameters())
    config = horizon.TrainConfig(device=args.device, plan=args.plan, grad_clip_norm=1.0,
                                 optimizer=horizon.AdamW(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1))
    with horizon.Trainer(model, config) as trainer:
        print(f"model: decoder '{args.preset}', {num_params / 1e6:.2f}M parameters; plan {args.plan} on "
              f"{args.device}; {args.steps} steps of {args.batch_size} x {args.seq_len} bytes")
        val_before = evaluate(model, val_batches)
        print(f"validation loss before training: {val_before:.3f}")
        first_loss, last_loss = train(trainer, model, train_data, val_batches, args)
        val_after = evaluate(model, val_batches)
        memory = trainer.memory()

    roles = ", ".join(f"{role} {format_bytes(n)}" for role, n in memory.host_bytes_by_role.items() if n)
    print(f"memory: host {format_bytes(memory.host_bytes)} ({roles}); "
          f"device peak {format_bytes(memory.device_peak_bytes)}")
    print(f"wall time: {time.perf_counter() - start_s:.0f} s")
    print(f"loss went down: {first_loss:.2f} -> {last_loss:.2f} (validation {val_before:.2f} -> {val_after:.2f})")
    if not val_after < val_before:
        print(f"error: the validation loss did not go down ({val_before:.3f} -> {val_after:.3f}); "
              f"try a lower --lr or more --steps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
