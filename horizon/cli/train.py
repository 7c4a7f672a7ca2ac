"""``horizon train``: train the reference decoder on byte-level text, end to end.

A plain ``nn.Module`` (``horizon.models.Decoder``) is handed to ``horizon.Trainer``, which moves
its parameters into the host store and trains it one exact step per batch. The text is the
Python standard library's own source by default (every machine has it) or any file
(``--text PATH``); tokens are bytes. The last 5% of the stream is held out, and the validation
loss is computed before and after training with the model itself: its parameters are views of
Horizon's fp32 master weights, so ``model(x)`` evaluates the weights the trainer updates. The run
exits non-zero if the validation loss did not go down.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

import horizon
from horizon.data.text import VOCAB_SIZE, load_corpus, sample_batch, split, validation_batches
from horizon.models import PRESETS, Decoder, decoder_config
from horizon.store import format_bytes

VAL_FRACTION = 0.05
"""Share of the byte stream held out for validation (its end)."""
MIN_IMPROVEMENT = 0.01
"""Nats the validation loss must drop by for the run to count as learning."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default="stdlib",
                        help="training text: a file path, or 'stdlib' for the Python standard library's source")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train (count)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (count)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (bytes)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS),
                        help="decoder shape from horizon.models.PRESETS (vocabulary forced to 256 bytes)")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="AdamW learning rate (constant, per step)")
    parser.add_argument("--plan", default="recompute", choices=["recompute", "keep"],
                        help="activation plan for every block: recompute in backward, or keep them")
    parser.add_argument("--device", default="cpu", help="where units compute: 'cpu' or 'cuda' / 'cuda:N'")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch order")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="validate every this many steps (steps; 0 = only before and after training)")
    parser.add_argument("--eval-batches", type=int, default=4,
                        help="validation batches of --batch-size x --seq-len tokens per evaluation (count)")
    parser.add_argument("--max-bytes", type=int, default=4 << 20,
                        help="cap on the text read (bytes)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "max_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")


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


def postfix(smoothed_loss: float, tokens: int, seconds: float, memory: horizon.MemoryReport) -> str:
    """The progress bar's tail: smoothed loss, mean training throughput, host and device bytes."""
    tokens_per_s = f"{tokens / seconds:,.0f}" if seconds > 0 else "-"
    return (f"loss {smoothed_loss:.3f}, {tokens_per_s} tok/s, host {format_bytes(memory.host_bytes)}, "
            f"device peak {format_bytes(memory.device_peak_bytes)}")


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
        bar.set_postfix_str(postfix(smoothed, tokens, seconds, trainer.memory()), refresh=False)
        if args.eval_every and m.step % args.eval_every == 0 and m.step < args.steps:
            bar.write(f"step {m.step}: validation loss {evaluate(model, val_batches):.3f}")
    bar.close()
    return first_loss, smoothed


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` says; 0 when the validation loss went down, 1 otherwise."""
    start_s = time.perf_counter()
    torch.manual_seed(args.seed)

    data, what = load_corpus(args.text, args.max_bytes)
    train_data, val_data = split(data, VAL_FRACTION, args.seq_len)
    val_batches = validation_batches(val_data, args.batch_size, args.seq_len, args.eval_batches)
    print(f"text: {what}, {format_bytes(len(data))} "
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
    losses = f"{first_loss:.2f} -> {last_loss:.2f} (validation {val_before:.2f} -> {val_after:.2f})"
    if not val_after < val_before - MIN_IMPROVEMENT:
        print(f"error: the validation loss did not go down: {losses}; try a lower --lr or more --steps",
              file=sys.stderr)
        return 1
    print(f"loss went down: {losses}")
    return 0

