"""``horizon train``: train the reference decoder on byte-level text, end to end.

A plain ``nn.Module`` (``horizon.models.Decoder``) is handed to ``horizon.Trainer``, which moves
its parameters into the host store and trains it one exact step per batch. The text is the
Python standard library's own source by default (every machine has it) or any file
(``--text PATH``); tokens are bytes. Settings come from a TOML run file (``--config``, see
``horizon.cli.run_config``), with flags and ``--set section.key=value`` on top. The last 5% of the stream is held out, and the validation
loss is computed before and after training with the model itself: its parameters are views of
Horizon's fp32 master weights, so ``model(x)`` evaluates the weights the trainer updates. The run
exits non-zero if the validation loss did not go down.
"""

from __future__ import annotations

import argparse
import builtins
import math
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

import horizon
from horizon.cli.run_config import RunConfig, load_run_config, to_toml
from horizon.distributed.world import launch_from_env
from horizon.data.text import VOCAB_SIZE, load_corpus, sample_batch, split, validation_batches
from horizon.models import PRESETS, Decoder, decoder_config
from horizon.store import format_bytes

VAL_FRACTION = 0.05
"""Share of the byte stream held out for validation (its end)."""
MIN_IMPROVEMENT = 0.01
"""Nats the validation loss must drop by for the run to count as learning."""


_FLAGS = {"text": "data.text", "steps": "training.steps", "batch_size": "data.batch_size",
          "seq_len": "data.seq_len", "preset": "model.preset", "lr": "optimizer.lr", "plan": "training.plan",
          "device": "training.device", "seed": "training.seed", "eval_every": "training.eval_every",
          "eval_batches": "training.eval_batches", "max_bytes": "data.max_bytes",
          "metrics_jsonl": "training.metrics_jsonl"}
"""Each flag is a shorthand for one key of the run file; a flag given overrides the file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML run file (path; sections model, data, training, optimizer); "
                                         "see --dump-config for every key and its default")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key of the run file, e.g. --set optimizer.lr=3e-4 (repeatable)")
    parser.add_argument("--dump-config", action="store_true",
                        help="print the resolved run file (defaults, --config, flags, --set) as TOML and exit")
    parser.add_argument("--text", help="training text: a file path, or 'stdlib' for the Python standard library's "
                                       "source (data.text; default stdlib)")
    parser.add_argument("--steps", type=int, help="optimizer steps to train (count; training.steps, default 100)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (count; data.batch_size, default 16)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (bytes; data.seq_len, default 256)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="decoder shape from horizon.models.PRESETS, vocabulary forced to 256 bytes "
                             "(model.preset, default small)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (per step; optimizer.lr, default 1.5e-3)")
    parser.add_argument("--plan", choices=["recompute", "keep"],
                        help="activation plan for every block (training.plan, default recompute)")
    parser.add_argument("--device", help="where units compute: 'cpu' or 'cuda' / 'cuda:N' (training.device)")
    parser.add_argument("--seed", type=int, help="seed for the weights and the batch order (training.seed)")
    parser.add_argument("--eval-every", type=int,
                        help="validate every this many steps (steps; 0 = only before and after training; "
                             "training.eval_every, default 50)")
    parser.add_argument("--eval-batches", type=int,
                        help="validation batches of batch size x seq-len tokens per evaluation "
                             "(count; training.eval_batches, default 4)")
    parser.add_argument("--max-bytes", type=int, help="cap on the text read (bytes; data.max_bytes, default 4 MiB)")
    parser.add_argument("--metrics-jsonl", metavar="PATH",
                        help="append one JSON line per update (step, loss, tokens, seconds, tokens_per_s, grad_norm, "
                             "lr) to this file (path; training.metrics_jsonl, default off)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve the run file with the flags and --set on top; any bad key or value is a usage error."""
    flags = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    try:
        args.run_config = load_run_config(args.config, flags=flags, overrides=args.set)
    except ValueError as e:
        parser.error(str(e))


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


def _silent(*args, **kwargs) -> None:
    pass


def _rank() -> int:
    """This process's rank under torchrun (0 alone): ranks draw their own batches, rank 0 alone prints."""
    launch = launch_from_env()
    return launch.rank if launch else 0


def train_batches(data: torch.Tensor, cfg: RunConfig) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(cfg.training.seed + _rank())
    for _ in range(cfg.training.steps):
        yield sample_batch(data, cfg.data.batch_size, cfg.data.seq_len, generator)


def postfix(smoothed_loss: float, tokens: int, seconds: float, memory: horizon.MemoryReport) -> str:
    """The progress bar's tail: smoothed loss, mean training throughput, host and device bytes."""
    tokens_per_s = f"{tokens / seconds:,.0f}" if seconds > 0 else "-"
    return (f"loss {smoothed_loss:.3f}, {tokens_per_s} tok/s, host {format_bytes(memory.host_bytes)}, "
            f"device peak {format_bytes(memory.device_peak_bytes)}")


def train(trainer: horizon.Trainer, model: torch.nn.Module, train_data: torch.Tensor,
          val_batches: list[dict[str, torch.Tensor]], cfg: RunConfig) -> tuple[float, float]:
    """Run ``cfg.training.steps`` steps; returns (first step's loss, smoothed loss at the end)."""
    first_loss = smoothed = math.nan
    tokens, seconds = 0, 0.0
    steps, eval_every = cfg.training.steps, cfg.training.eval_every
    bar = tqdm(train_batches(train_data, cfg), total=steps, unit="step", dynamic_ncols=True, disable=_rank() != 0)
    for batch in bar:
        m = trainer.step(batch)
        if m.step == 1:
            first_loss = smoothed = m.loss
        smoothed = 0.9 * smoothed + 0.1 * m.loss
        tokens, seconds = tokens + m.tokens, seconds + m.seconds
        bar.set_postfix_str(postfix(smoothed, tokens, seconds, trainer.memory()), refresh=False)
        if eval_every and m.step % eval_every == 0 and m.step < steps and _rank() == 0:
            bar.write(f"step {m.step}: validation loss {evaluate(model, val_batches):.3f}")
    bar.close()
    return first_loss, smoothed


def run(args: argparse.Namespace) -> int:
    """Train as the resolved run file says; 0 when the validation loss went down, 1 otherwise."""
    cfg: RunConfig = args.run_config
    print = builtins.print if _rank() == 0 else _silent  # noqa: A001: under torchrun, rank 0 speaks for all
    if args.dump_config:
        print(to_toml(cfg), end="")
        return 0
    start_s = time.perf_counter()
    data_cfg, training = cfg.data, cfg.training
    torch.manual_seed(training.seed)

    data, what = load_corpus(data_cfg.text, data_cfg.max_bytes)
    train_data, val_data = split(data, VAL_FRACTION, data_cfg.seq_len)
    val_batches = validation_batches(val_data, data_cfg.batch_size, data_cfg.seq_len, training.eval_batches)
    print(f"text: {what}, {format_bytes(len(data))} "
          f"({len(train_data):,} bytes train, {len(val_data):,} held out)")

    model = Decoder(decoder_config(cfg.model.preset, vocab_size=VOCAB_SIZE))
    num_params = sum(p.numel() for p in model.parameters())
    with horizon.Trainer(model, cfg.train_config()) as trainer:
        print(f"model: decoder '{cfg.model.preset}', {num_params / 1e6:.2f}M parameters; plan {training.plan} on "
              f"{training.device}; {training.steps} steps of {data_cfg.batch_size} x {data_cfg.seq_len} bytes")
        val_before = evaluate(model, val_batches)
        print(f"validation loss before training: {val_before:.3f}")
        first_loss, last_loss = train(trainer, model, train_data, val_batches, cfg)
        val_after = evaluate(model, val_batches)
        memory = trainer.memory()

    roles = ", ".join(f"{role} {format_bytes(n)}" for role, n in memory.host_bytes_by_role.items() if n)
    print(f"memory: host {format_bytes(memory.host_bytes)} ({roles}); "
          f"device peak {format_bytes(memory.device_peak_bytes)}")
    print(f"wall time: {time.perf_counter() - start_s:.0f} s")
    losses = f"{first_loss:.2f} -> {last_loss:.2f} (validation {val_before:.2f} -> {val_after:.2f})"
    if not val_after < val_before - MIN_IMPROVEMENT:
        print(f"error: the validation loss did not go down: {losses}; try a lower optimizer.lr or more "
              "training.steps",
              file=sys.stderr)
        return 1
    print(f"loss went down: {losses}")
    return 0

