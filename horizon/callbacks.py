"""Callbacks: user code the trainer runs after each update and each committed checkpoint.

Why: a loop around ``Trainer.step`` can log whatever it likes, but a few things only the trainer
knows when they happen (a checkpoint becomes durable on a background thread), and the usual
sinks (a JSONL file, a progress bar) should not be rewritten by every user. A callback is any
object with some of ``on_step_end(trainer, metrics)``, ``on_checkpoint(trainer, step, path)`` and
``on_eval(trainer, metrics)``; ``Callback`` is an empty base to subclass. All run on the training
thread, inside ``step``, ``evaluate`` (or ``close``, for the final checkpoint), so they see the
trainer between two updates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from horizon.metrics import EvalMetrics, StepMetrics

__all__ = ["Callback", "CallbackList", "JsonlMetrics", "TensorBoardMetrics", "metrics_record", "HOOKS"]

HOOKS = ("on_step_end", "on_checkpoint", "on_eval")
"""The methods a callback may have."""


class Callback:
    """The hooks, each a no-op; override those you need."""

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        """After every call of ``step`` that ended an update (applied, or skipped for a non-finite gradient)."""

    def on_checkpoint(self, trainer, step: int, path: str) -> None:
        """Once the checkpoint of ``step`` is committed (durable) in directory ``path``."""

    def on_eval(self, trainer, metrics: EvalMetrics) -> None:
        """After every ``Trainer.evaluate``."""


def metrics_record(metrics: StepMetrics) -> dict:
    """One update's metrics as a JSON object: every StepMetrics field, tokens_per_s and the wall-clock time."""
    record = dataclasses.asdict(metrics)
    record["checkpoint_errors"] = list(metrics.checkpoint_errors)
    record["tokens_per_s"] = metrics.tokens / metrics.seconds if metrics.seconds > 0 else None
    record["time_unix_s"] = time.time()
    return record


class JsonlMetrics(Callback):
    """Appends one JSON line per update to ``path`` (flushed at once, so a crash loses at most one line)."""

    def __init__(self, path: str | os.PathLike) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"metrics file {os.fspath(path)!r}: its folder {parent} does not exist; create it first")
        if os.path.isdir(path):
            raise ValueError(f"metrics file {os.fspath(path)!r} is a directory: name a file")
        self.path = os.fspath(path)

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics_record(metrics)) + "\n")

    def on_checkpoint(self, trainer, step: int, path: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": "checkpoint", "step": step, "path": path, "time_unix_s": time.time()}) + "\n")

    def on_eval(self, trainer, metrics: EvalMetrics) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": "eval", **dataclasses.asdict(metrics), "time_unix_s": time.time()}) + "\n")


class TensorBoardMetrics(Callback):
    """Scalars for TensorBoard in ``log_dir``, through ``torch.utils.tensorboard.SummaryWriter``, at
    x = global_step: train/loss, train/tokens_per_s, train/grad_norm, train/lr, eval/loss and the
    memory report's memory/host_bytes, memory/device_peak_bytes, memory/ssd_bytes. The event file is
    created at the first write; ``Trainer.close`` closes it."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from e
        self._make_writer = lambda: SummaryWriter(log_dir=os.fspath(log_dir))
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._make_writer()
        return self._writer

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        scalars = {"train/loss": metrics.loss, "train/tokens_per_s": metrics.tokens_per_s, "train/lr": metrics.lr,
                   "train/grad_norm": metrics.grad_norm}
        memory = trainer.memory()
        scalars.update({"memory/host_bytes": memory.host_bytes, "memory/device_peak_bytes": memory.device_peak_bytes,
                        "memory/ssd_bytes": memory.ssd_bytes})
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, metrics.step)
        self.writer.flush()

    def on_eval(self, trainer, metrics: EvalMetrics) -> None:
        self.writer.add_scalar("eval/loss", metrics.loss, metrics.step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class CallbackList(list):
    """The trainer's callbacks: the user's, then the sinks its config asks for (a JsonlMetrics for
    ``metrics_jsonl``, a TensorBoardMetrics for ``tensorboard_dir``). A list, so it can be read and
    extended as one; ``run`` calls one hook on every callback that has it, in order."""

    def __init__(self, callbacks, *, metrics_jsonl: str | None = None, tensorboard_dir: str | None = None) -> None:
        for callback in callbacks:
            if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
                raise ValueError(f"callback {callback!r} has none of {HOOKS}; subclass horizon.Callback")
        sinks = [JsonlMetrics(metrics_jsonl)] if metrics_jsonl else []
        sinks += [TensorBoardMetrics(tensorboard_dir)] if tensorboard_dir else []
        super().__init__([*callbacks, *sinks])

    def run(self, hook: str, trainer, *args) -> None:
        assert hook in HOOKS, hook
        for callback in self:
            if hasattr(callback, hook):
                getattr(callback, hook)(trainer, *args)

    def close(self) -> None:
        """Close the sinks that hold a file open (TensorBoard's event writer)."""
        for callback in self:
            if isinstance(callback, TensorBoardMetrics):
                callback.close()
