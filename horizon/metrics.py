"""What a step and the memory report tell the caller."""

from __future__ import annotations

import dataclasses

__all__ = ["StepMetrics", "EvalMetrics", "MemoryReport"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMetrics:
    step: int
    """Trainer.global_step after this call (updates made so far)."""
    loss: float
    """Mean cross-entropy over the labels that are not -100, over the micro-batches of this update so far."""
    tokens: int
    """Labels that counted in the loss (this update's micro-batches so far)."""
    seconds: float
    """Wall time of this update's step calls so far, batch checks to the updates submitted."""
    grad_norm: float | None = None
    """Global gradient 2-norm before clipping (None when it was not taken: eager updates, or mid-accumulation)."""
    lr: float = 0.0
    """The learning rate of this update."""
    skipped: bool = False
    """True when a non-finite gradient made this update be skipped."""
    updated: bool = True
    """True when this call ended with an update (False mid-accumulation or when skipped)."""
    checkpoint_errors: tuple[str, ...] = ()
    """Checkpoints that failed since the previous step (each reported once; training went on)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalMetrics:
    step: int
    """Trainer.global_step when the evaluation ran (the weights after that many updates)."""
    loss: float
    """Mean cross-entropy over every label that is not -100 in all the batches (token-weighted)."""
    tokens: int
    """Labels that counted in the loss."""
    seconds: float
    """Wall time of the evaluation, pending updates waited for included."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryReport:
    device_peak_bytes: int
    """Peak device bytes since the trainer started (CUDA: the allocator's peak above what was allocated
    before the trainer; CPU: the engine's ledger)."""
    host_bytes: int
    """Bytes of the host store plus the host activation buffers."""
    host_bytes_by_role: dict[str, int]
    """host_bytes split by role: master, exp_avg, exp_avg_sq, grad, compute, activations."""
    slot_bytes: int
    """Bytes of one shared device slot (the largest unit that is not resident, in the compute dtype)."""
    num_slots: int
    resident_bytes: int = 0
    """Bytes of the device buffers of the plan's resident units (``Plan.resident``), all of them."""
    ssd_bytes_by_role: dict[str, int] = dataclasses.field(default_factory=dict)
    """Optimizer state on SSD by role (master, exp_avg, exp_avg_sq; TrainConfig.ssd); empty when none."""

    @property
    def ssd_bytes(self) -> int:
        return sum(self.ssd_bytes_by_role.values())
