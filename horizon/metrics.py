"""What a step and the memory report tell the caller."""

from __future__ import annotations

import dataclasses

__all__ = ["StepMetrics", "MemoryReport"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMetrics:
    step: int
    """The global step this update made (1 after the first)."""
    loss: float
    """Mean cross-entropy over the labels that are not -100."""
    tokens: int
    """Labels that counted in the loss."""
    seconds: float
    """Wall time of the step, batch checks to updated weights."""
    grad_norm: float | None = None
    """Global gradient 2-norm before clipping (None when clipping is off)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryReport:
    device_peak_bytes: int
    """Peak device bytes since the trainer started (CUDA: the allocator's peak; CPU: the engine's ledger)."""
    host_bytes: int
    """Bytes of the host store plus the host activation buffers."""
    host_bytes_by_role: dict[str, int]
    """host_bytes split by role: master, exp_avg, exp_avg_sq, grad, compute, activations."""
    slot_bytes: int
    """Bytes of one device slot (the largest unit in the compute dtype)."""
    num_slots: int
