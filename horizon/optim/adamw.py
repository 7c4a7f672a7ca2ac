"""AdamW over a unit's flat host buffers, with the semantics of ``torch.optim.AdamW``.

Why flat: a unit's master weights, gradient and moments are each one contiguous buffer, so the
update is one fused pass per unit (``horizon.optim.native``) rather than a loop over parameters.
The bias correction, decoupled weight decay and epsilon placement are torch's fused kernel's, in
its order, and tested against ``torch.optim.AdamW``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import torch

from horizon.optim.native import fused_adamw_
from horizon.store.host_store import UnitBuffers

__all__ = ["AdamW", "adamw_unit_step", "decay_runs_by_name", "optimizer_threads", "overlap_threads"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamW:
    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment."""
    eps: float = 1e-8
    """Added to the denominator, after the square root (as torch does)."""
    weight_decay: float = 1e-2
    """Decoupled weight decay (torch.optim.AdamW's default is 1e-2)."""
    weight_decay_exclude: tuple[str, ...] = ()
    """Regular expressions; a parameter whose model name matches one (``re.search``) gets no decay."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"AdamW.lr must be a finite number >= 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamW.betas must be two numbers in [0, 1), got {self.betas}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"AdamW.eps must be a finite number >= 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"AdamW.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if isinstance(self.weight_decay_exclude, str):
            raise ValueError("AdamW.weight_decay_exclude is a tuple of patterns: write (pattern,), not pattern")
        for pattern in self.weight_decay_exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"AdamW.weight_decay_exclude: {pattern!r} is not a regular expression ({e})") from e

    def decays(self, name: str) -> bool:
        """Whether the parameter called ``name`` in the model gets weight decay."""
        return not any(re.search(p, name) for p in self.weight_decay_exclude)


def optimizer_threads() -> int:
    """Threads for the update kernel: the cores this process may use, split between local ranks.

    torchrun sets OMP_NUM_THREADS=1, which must not leave the optimizer on one core, so this reads
    the CPU affinity instead and divides it by LOCAL_WORLD_SIZE.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // local_ranks)


def overlap_threads() -> int:
    """Threads for an update that overlaps the engine: ``optimizer_threads()`` but one, the core left
    to the engine's own threads (the one issuing compute, the CPU transfer thread). Measured on 2
    cores (docs/optim.md): a two-thread update beside the transfer thread's copies slows both."""
    return max(1, optimizer_threads() - 1)


def adamw_unit_step(unit: UnitBuffers, step: torch.Tensor, cfg: AdamW, *, lr: float, grad: torch.Tensor,
                    grad_scale: float | None, decay_runs: list[tuple[int, int, float]],
                    num_threads: int = 1) -> None:
    """Update one unit in place: master, m and v, and the compute copy the next load sends.

    ``step`` is the unit's fp32 step count *after* this update (torch keeps it as a tensor too).
    ``grad`` is the unit's flat gradient (the landed one, or the accumulated one); ``grad_scale``
    multiplies it first (clipping, accumulation), as ``clip_grad_norm_`` does, without writing it
    back. ``decay_runs`` are the unit's contiguous element ranges ``(start, end, weight_decay)``.
    One pass per run: the native kernel also writes the bf16 copy; otherwise torch's fused kernel
    runs and the copy follows.
    """
    own_copy = unit.compute.data_ptr() != unit.master.data_ptr()
    # A sharded unit holds shards of both (horizon.distributed), so one pass writes its bf16 shard too.
    one_pass = own_copy and unit.compute.dtype == torch.bfloat16 and unit.compute.numel() == unit.master.numel()
    for start, end, weight_decay in decay_runs:
        fused_adamw_(unit.master[start:end], grad[start:end], unit.exp_avg[start:end], unit.exp_avg_sq[start:end],
                     unit.compute[start:end] if one_pass else None, step=int(step), lr=lr, beta1=cfg.betas[0],
                     beta2=cfg.betas[1], eps=cfg.eps, weight_decay=weight_decay, grad_scale=grad_scale,
                     num_threads=num_threads)
    if own_copy and not one_pass:
        unit.refresh_compute()


def decay_runs_by_name(units, param_names: list[list[str]], optimizer: AdamW) -> list[list[tuple[int, int, float]]]:
    """Per unit, maximal contiguous element ranges ``(start, end, weight_decay)``: parameters whose name
    matches ``optimizer.weight_decay_exclude`` get 0. ``param_names[u]`` names unit u's own slots in order."""
    runs = []
    for unit, names in zip(units, param_names, strict=True):
        unit_runs: list[tuple[int, int, float]] = []
        for slot, name in zip(unit.layout.own, names, strict=True):
            decay = optimizer.weight_decay if optimizer.decays(name) else 0.0
            if unit_runs and unit_runs[-1][1] == slot.offset and unit_runs[-1][2] == decay:
                unit_runs[-1] = (unit_runs[-1][0], slot.offset + slot.numel, decay)
            else:
                unit_runs.append((slot.offset, slot.offset + slot.numel, decay))
        runs.append(unit_runs)
    return runs
