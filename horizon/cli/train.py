"""``horizon train``: train a model on local text, end to end, from a TOML run file.

The model is the reference decoder (``model.preset``) or a Hugging Face causal LM named by its
config.json folder (``model.hf_config``), initialised or loaded from safetensors
(``model.hf_weights``) straight into the host store. The text is the Python standard library's own
source by default (every machine has it) or any file (``--text PATH``); tokens are bytes, or the
ids of a local tokenizer (``data.tokenizer``). Settings come from a TOML run file (``--config``,
see ``horizon.cli.run_config``), with flags and ``--set section.key=value`` on top. The end of the
token stream is held out (``data.eval_fraction``); ``Trainer.evaluate`` measures it before, every
``training.eval_every_steps`` steps and after training, and the progress bar, the JSONL metrics and
TensorBoard report it. The run exits non-zero if the held-out loss did not go down.

The training part of the stream is a ``horizon.data.TokenizedText``: windows of ``data.seq_len``
in an order that follows from ``training.seed``, with a cursor the trainer saves in every
checkpoint (``[checkpoint]``). With ``training.resume`` / ``--resume`` the run continues from the
newest valid checkpoint, weights, optimizer, RNG and cursor, to ``training.steps``: the updates
it makes are those the uninterrupted run would have made, on the same batches.
"""

from __future__ import annotations

import argparse
import builtins
import math
import sys
import time
import torch

import horizon
from horizon.checkpoint.commit import committed_steps
from horizon.cli.run_config import RunConfig, load_run_config, to_toml
from horizon.cli.train_data import build_model, load_tokens
from horizon.data.text import split, validation_batches
from horizon.data.tokenized import TokenizedText
from horizon.distributed.world import launch_from_env
from horizon.flops import device_peak_flops, flops_per_token
from horizon.models import PRESETS
from horizon.progress import ProgressBar
from horizon.store import format_bytes

MIN_IMPROVEMENT = 0.01
"""Nats the validation loss must drop by for the run to count as learning."""


_FLAGS = {"text": "data.text", "steps": "training.steps", "batch_size": "data.batch_size",
          "seq_len": "data.seq_len", "preset": "model.preset", "lr": "optimizer.lr", "plan": "training.plan",
          "device": "training.device", "seed": "training.seed", "eval_every_steps": "training.eval_every_steps",
          "eval_batches": "training.eval_batches", "max_bytes": "data.max_bytes",
          "metrics_jsonl": "training.metrics_jsonl", "resume": "training.resume",
          "checkpoint_dir": "checkpoint.dir"}
"""Each flag is a shorthand for one key of the run file; a flag given overrides the file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML run file (path; sections model, data, training, optimizer, "
                                         "checkpoint); "
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
                        help="decoder shape from horizon.models.PRESETS, vocabulary sized to the tokenizer (256 bytes) "
                             "(model.preset, default small)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (per step; optimizer.lr, default 1.5e-3)")
    parser.add_argument("--plan", choices=["recompute", "keep"],
                        help="activation plan for every block (training.plan, default recompute)")
    parser.add_argument("--device", help="where units compute: 'cpu' or 'cuda' / 'cuda:N' (training.device)")
    parser.add_argument("--seed", type=int, help="seed for the weights and the batch order (training.seed)")
    parser.add_argument("--eval-every-steps", type=int,
                        help="evaluate on the held-out split every this many steps (steps; 0 = only before and "
                             "after training; training.eval_every_steps, default 50)")
    parser.add_argument("--eval-batches", type=int,
                        help="validation batches of batch size x seq-len tokens per evaluation "
                             "(count; training.eval_batches, default 4)")
    parser.add_argument("--max-bytes", type=int, help="cap on the text read (bytes; data.max_bytes, default 4 MiB)")
    parser.add_argument("--metrics-jsonl", metavar="PATH",
                        help="append one JSON line per update (step, loss, tokens, seconds, tokens_per_s, grad_norm, "
                             "lr) and per evaluation to this file (path; training.metrics_jsonl, default off)")
    parser.add_argument("--checkpoint-dir", metavar="PATH",
                        help="write checkpoints (step-<N> folders) here, every checkpoint.every_steps updates and at "
                             "the end (path; checkpoint.dir, default off)")
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue from the newest valid checkpoint in checkpoint.dir, if any, up to "
                             "training.steps (training.resume)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve the run file with the flags and --set on top; any bad key or value is a usage error."""
    flags = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    try:
        args.run_config = load_run_config(args.config, flags=flags, overrides=args.set)
    except ValueError as e:
        parser.error(str(e))


def _silent(*args, **kwargs) -> None:
    pass


def _launch() -> tuple[int, int]:
    """(this process's rank, the number of ranks) under torchrun, (0, 1) alone: rank 0 alone prints."""
    launch = launch_from_env()
    return (launch.rank, launch.world_size) if launch else (0, 1)


def _rank() -> int:
    return _launch()[0]


def train_data(tokens: torch.Tensor, cfg: RunConfig) -> TokenizedText:
    """The training windows in their seeded order; each rank takes its own share of every step's windows."""
    rank, num_ranks = _launch()
    return TokenizedText.from_tokens(tokens, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                     seed=cfg.training.seed, rank=rank, num_ranks=num_ranks)


def train(trainer: horizon.Trainer, data: TokenizedText, eval_batches: list[dict[str, torch.Tensor]],
          cfg: RunConfig) -> tuple[float, float]:
    """Run the updates from ``trainer.global_step`` to ``cfg.training.steps``, evaluating every
    ``eval_every_steps``; (first, last training loss)."""
    first_loss = last_loss = math.nan
    steps, every = cfg.training.steps, cfg.training.eval_every_steps
    for _ in range((steps - trainer.global_step) * cfg.training.grad_accum_steps):
        m = trainer.step(next(data))
        if not m.updated:
            continue
        first_loss = m.loss if math.isnan(first_loss) else first_loss
        last_loss = m.loss
        if every and m.step % every == 0 and m.step < steps:
            trainer.evaluate(eval_batches)
    return first_loss, last_loss


def _check_checkpoint_dir(cfg: RunConfig) -> None:
    existing = committed_steps(cfg.checkpoint.dir) if cfg.checkpoint.dir else []
    if existing and not cfg.training.resume:
        raise ValueError(f"checkpoint.dir {cfg.checkpoint.dir} already holds checkpoints (newest: step "
                         f"{existing[-1]}): pass --resume (training.resume = true) to continue from it, or "
                         "name an empty checkpoint.dir")


def _progress_bar(model: torch.nn.Module, cfg: RunConfig) -> ProgressBar:
    peak = cfg.training.peak_flops or device_peak_flops(cfg.training.device)
    return ProgressBar(cfg.training.steps, flops_per_token=flops_per_token(model, cfg.data.seq_len),
                       peak_flops=peak, rank=_rank())


def run(args: argparse.Namespace) -> int:
    """Train as the resolved run file says; 0 when the held-out loss went down, 1 otherwise."""
    cfg: RunConfig = args.run_config
    print = builtins.print if _rank() == 0 else _silent  # noqa: A001: under torchrun, rank 0 speaks for all
    if args.dump_config:
        print(to_toml(cfg), end="")
        return 0
    start_s = time.perf_counter()
    data_cfg, training = cfg.data, cfg.training
    _check_checkpoint_dir(cfg)
    torch.manual_seed(training.seed)

    tokens, what = load_tokens(data_cfg)
    model, model_what = build_model(cfg.model, data_cfg)
    train_tokens, eval_data = split(tokens, data_cfg.eval_fraction, data_cfg.seq_len)
    data = train_data(train_tokens, cfg)
    eval_batches = validation_batches(eval_data, data_cfg.batch_size, data_cfg.seq_len, training.eval_batches)
    print(f"text: {what}, {len(tokens):,} tokens ({len(train_tokens):,} train, {len(eval_data):,} held out)")
    num_params = sum(p.numel() for p in model.parameters())
    bar = _progress_bar(model, cfg)
    with horizon.Trainer(model, cfg.train_config(), callbacks=[bar]) as trainer:
        print(f"model: {model_what}, {num_params / 1e6:.2f}M parameters; plan {training.plan} on "
              f"{training.device}; {training.steps} steps of {data_cfg.batch_size} x {data_cfg.seq_len} tokens")
        trainer.register_data(data)  # its cursor goes into each checkpoint; a resumed one is loaded into it
        if trainer.global_step:
            print(f"resumed from step {trainer.global_step} in {cfg.checkpoint.dir} (data epoch {data.epoch}, "
                  f"batch {data.batch})")
            bar.start_at(min(trainer.global_step, training.steps))
        if trainer.global_step >= training.steps:
            bar.close()
            print(f"nothing to train: the checkpoint is at step {trainer.global_step}, training.steps is "
                  f"{training.steps}")
            return 0
        eval_before = trainer.evaluate(eval_batches).loss
        first_loss, last_loss = train(trainer, data, eval_batches, cfg)
        eval_after = trainer.evaluate(eval_batches).loss
        memory = trainer.memory()
    bar.close()

    roles = ", ".join(f"{role} {format_bytes(n)}" for role, n in memory.host_bytes_by_role.items() if n)
    print(f"memory: host {format_bytes(memory.host_bytes)} ({roles}); "
          f"device peak {format_bytes(memory.device_peak_bytes)}")
    print(f"wall time: {time.perf_counter() - start_s:.0f} s")
    losses = f"{first_loss:.2f} -> {last_loss:.2f} (held out {eval_before:.2f} -> {eval_after:.2f})"
    if not eval_after < eval_before - MIN_IMPROVEMENT:
        print(f"error: the held-out loss did not go down: {losses}; try a lower optimizer.lr or more "
              "training.steps",
              file=sys.stderr)
        return 1
    print(f"loss went down: {losses}")
    return 0
