"""Shared pieces of the checkpoint tests: a deterministic run, reference states, fault-injecting disks."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import torch

import horizon
from horizon.checkpoint import Disk
from helpers import batches, tiny_decoder

NUM_LAYERS = 2
ROLES = ("master", "exp_avg", "exp_avg_sq")


def model():
    return tiny_decoder(num_layers=NUM_LAYERS, seed=0)


def data(num: int):
    return batches(num, seed=3)


def config(ckpt: horizon.CheckpointConfig | None = None, *, eager: bool = False, resume: bool = False):
    lr = horizon.WarmupCosine(warmup_steps=2, total_steps=20)
    if eager:  # no clipping, nothing checked: updates run as gradients land (reverse order)
        return horizon.TrainConfig(on_nonfinite="ignore", lr_schedule=lr, checkpoint=ckpt, resume=resume)
    return horizon.TrainConfig(grad_clip_norm=1.0, lr_schedule=lr, checkpoint=ckpt, resume=resume)


def unit_state(trainer) -> list[dict[str, torch.Tensor]]:
    """Every unit's master, m and v (copies), after the pending updates."""
    trainer.updater.wait_all()
    return [{role: getattr(u, role).clone() for role in ROLES} for u in trainer.store.units]


def reference_states(num_steps: int, *, eager: bool = False) -> tuple[list[float], list[list[dict]]]:
    """Losses of an uninterrupted run and the unit state after each step (index 0 = before training)."""
    states, losses = [], []
    with horizon.Trainer(model(), config(eager=eager)) as trainer:
        states.append(unit_state(trainer))
        for b in data(num_steps):
            losses.append(trainer.step(b).loss)
            states.append(unit_state(trainer))
    return losses, states


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def states_equal(a: list[dict], b: list[dict]) -> bool:
    return all(same_bytes(x[r], y[r]) for x, y in zip(a, b) for r in ROLES) and len(a) == len(b)


def checkpoint_state(directory: str) -> list[dict[str, torch.Tensor]]:
    """The unit state a checkpoint holds, read back through safetensors and the manifest."""
    from safetensors.torch import load_file

    from horizon.checkpoint import read_manifest

    manifest = read_manifest(directory)
    files = {f: load_file(os.path.join(directory, f)) for f in manifest["files"]}
    units = [{role: torch.empty(u["numel"]) for role in ROLES} for u in manifest["layout"]]
    for name, r in manifest["tensors"].items():
        t = files[r["file"]][name].view(-1)
        units[r["unit"]][r["role"]][r["offset"]:r["offset"] + t.numel()] = t
    return units


class SlowDisk(Disk):
    """A disk slower than training: it serves one write at a time, each taking ``delay_s`` longer."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._busy = threading.Lock()

    def write(self, fd, data, offset):
        with self._busy:
            time.sleep(self.delay_s)
            super().write(fd, data, offset)


class GatedDisk(Disk):
    """Every write waits until ``open_gate()``: nothing staged leaves staging before then."""

    def __init__(self) -> None:
        self._gate = threading.Event()

    def open_gate(self) -> None:
        self._gate.set()

    def write(self, fd, data, offset):
        self._gate.wait()
        super().write(fd, data, offset)


class FullDisk(Disk):
    """Writes fail with ENOSPC while ``full`` is true."""

    def __init__(self) -> None:
        self.full = False

    def write(self, fd, data, offset):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        super().write(fd, data, offset)


class KillingDisk(Disk):
    """SIGKILLs this process the ``nth`` time protocol point ``point`` is reached."""

    def __init__(self, point: str, nth: int) -> None:
        self.point, self.nth, self.seen = point, nth, 0

    def at(self, point):
        if point == self.point:
            self.seen += 1
            if self.seen == self.nth:
                os.kill(os.getpid(), signal.SIGKILL)
