"""What the engine executes: per unit, where activations live between forward and backward.

Why a plan object: the engine carries out decisions and never makes them. ``Plan`` is what the
planner (or a user, by hand) hands it: an activation policy per block, the number of device
slots and the loss-head chunk size. The engine validates it against the model before a step.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

__all__ = ["ActivationPolicy", "Plan"]


class ActivationPolicy(enum.Enum):
    KEEP = "keep"            # keep the block's autograd activations on the device until its backward
    RECOMPUTE = "recompute"  # keep only the block input (offloaded to host), recompute in backward
    SWAP = "swap"            # copy the block's saved activations to host after forward, back before backward


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    default: ActivationPolicy = ActivationPolicy.RECOMPUTE
    """Policy of every block not named in ``per_unit``."""
    per_unit: Mapping[str, ActivationPolicy] = dataclasses.field(default_factory=dict)
    """Policy by unit name (``layers.3``), overriding ``default``."""
    num_slots: int = 2
    """Device buffers for unit weights: 2 = double buffering, more = deeper prefetch."""
    loss_chunk_tokens: int | None = None
    """Tokens per loss-head chunk; None = as many as fit 256 MiB of fp32 logits."""

    def __post_init__(self) -> None:
        if not isinstance(self.default, ActivationPolicy):
            raise ValueError(f"Plan.default must be an ActivationPolicy, got {self.default!r}")
        bad = {k: v for k, v in self.per_unit.items() if not isinstance(v, ActivationPolicy)}
        if bad:
            raise ValueError(f"Plan.per_unit values must be ActivationPolicy members, got {bad}")
        if self.num_slots < 2:
            raise ValueError(f"Plan.num_slots must be at least 2 (double buffering), got {self.num_slots}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens <= 0:
            raise ValueError(f"Plan.loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}")

    @classmethod
    def uniform(cls, policy: ActivationPolicy | str, **kwargs) -> "Plan":
        return cls(default=ActivationPolicy(policy), **kwargs)

    def policy(self, unit_name: str) -> ActivationPolicy:
        return self.per_unit.get(unit_name, self.default)

    def check_names(self, block_names: list[str]) -> None:
        unknown = sorted(set(self.per_unit) - set(block_names))
        if unknown:
            raise ValueError(f"Plan names units the model does not have as blocks: {unknown}; "
                             f"blocks are {block_names[0]} … {block_names[-1]}")

    def loss_chunk(self, vocab_size: int) -> int:
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return max(1, (256 * 2**20) // (4 * vocab_size))
