"""Learning-rate schedules as pure functions of the update number.

A schedule is a frozen dataclass whose ``lr_at(step, base_lr)`` gives the learning rate for the
optimizer update numbered ``step`` (0-based: the first update uses step 0). There is no mutable
scheduler object: the optimizer thread updates units one at a time, out of lock-step with the
training loop, so each unit's update computes its own LR from the step number it belongs to
instead of reading a shared scheduler that someone must remember to ``.step()`` at the right time.

Each schedule gives the same LRs as its ``torch.optim.lr_scheduler`` counterpart, read from
``param_groups[0]["lr"]`` before each ``optimizer.step()`` when ``scheduler.step()`` follows
every ``optimizer.step()``:

* ``ConstantLR()``: ``base_lr`` always (torch ``LambdaLR(opt, lambda _: 1.0)``; not torch's
  ``ConstantLR``, which is a temporary multiplicative factor).
* ``WarmupCosine``: ``SequentialLR(opt, [LinearLR(opt, start_factor=warmup_start_ratio,
  end_factor=1.0, total_iters=warmup_steps), CosineAnnealingLR(opt, T_max=total_steps -
  warmup_steps, eta_min=min_lr_ratio * base_lr)], milestones=[warmup_steps])``.
* ``WarmupLinear``: the same with ``LinearLR(opt, start_factor=1.0, end_factor=min_lr_ratio,
  total_iters=total_steps - warmup_steps)`` as the decay.

Warm-up convention (torch ``LinearLR`` semantics): step 0 uses ``warmup_start_ratio * base_lr``,
rising linearly to ``base_lr`` at step ``warmup_steps``, where the decay starts. torch requires
``0 < start_factor <= 1``, so ``warmup_start_ratio`` lies in (0, 1]; the default 1e-3 starts
near zero. With ``warmup_steps = 0`` there is no warm-up and step 0 uses ``base_lr``.

Deviations from torch, both deliberate:

* ``lr_at`` is the closed form (torch's own ``_get_closed_form_lr`` expressions), while torch's
  ``CosineAnnealingLR`` and ``LinearLR`` update the previous LR recursively, which drifts by
  rounding error. Measured largest relative difference over whole schedules: 5e-14 (1,000
  steps), 1.6e-13 (10,000), 5e-12 (100,000; linear decay just before a zero floor, cosine stays
  under 6e-13). Exact zeros (a zero floor) agree exactly. The closed form is the value the
  recursion approximates, so we do not replay the recursion.
* After ``total_steps`` the LR stays at the floor ``min_lr_ratio * base_lr``. torch's cosine
  climbs back up past ``T_max``; its linear decay stays at the floor, as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["ConstantLR", "WarmupCosine", "WarmupLinear", "Schedule"]


def _check_lr_args(step: int, base_lr: float) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 (the 0-based update number), got {step!r}")
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr >= 0):
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")


@dataclass(frozen=True, kw_only=True)
class ConstantLR:
    """``base_lr`` at every step."""

    def lr_at(self, step: int, base_lr: float) -> float:
        _check_lr_args(step, base_lr)
        return float(base_lr)


@dataclass(frozen=True, kw_only=True)
class _Warmup:
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    warmup_start_ratio: float = 1e-3

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("warmup_steps", "total_steps"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}: {field} must be an int, got {v!r}")
        if self.total_steps < 1:
            raise ValueError(f"{name}: total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"{name}: warmup_steps must be in [0, total_steps) so the decay has at least one "
                f"step, got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}; "
                "lower warmup_steps or raise total_steps")
        for field, lo_open in (("min_lr_ratio", False), ("warmup_start_ratio", True)):
            v = getattr(self, field)
            ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                  and (0 < v if lo_open else 0 <= v) and v <= 1)
            if not ok:
                interval = "(0, 1]" if lo_open else "[0, 1]"
                raise ValueError(f"{name}: {field} must be a number in {interval}, got {v!r}")

    def lr_at(self, step: int, base_lr: float) -> float:
        _check_lr_args(step, base_lr)
        w = self.warmup_steps
        if step < w:
            s = self.warmup_start_ratio
            return base_lr * (s + (1.0 - s) * step / w)
        floor = self.min_lr_ratio * base_lr
        t, n = min(step, self.total_steps) - w, self.total_steps - w
        return floor + (base_lr - floor) * self._decay(t, n)

    @staticmethod
    def _decay(t: int, n: int) -> float:  # 1 at t = 0 falling to 0 at t = n
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class WarmupCosine(_Warmup):
    """Linear warm-up to ``base_lr`` at ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * base_lr`` at ``total_steps`` and that floor after."""

    @staticmethod
    def _decay(t: int, n: int) -> float:
        # torch's form and argument order: near the floor 1 + cos cancels, and computing it as
        # cos(pi * t / 2n) ** 2 instead (more exact) would differ from torch by up to 1e-10 rel.
        return (1.0 + math.cos(math.pi * t / n)) / 2.0


@dataclass(frozen=True, kw_only=True)
class WarmupLinear(_Warmup):
    """Linear warm-up to ``base_lr`` at ``warmup_steps``, then linear decay to
    ``min_lr_ratio * base_lr`` at ``total_steps`` and that floor after."""

    @staticmethod
    def _decay(t: int, n: int) -> float:
        return 1.0 - t / n


Schedule: TypeAlias = ConstantLR | WarmupCosine | WarmupLinear
