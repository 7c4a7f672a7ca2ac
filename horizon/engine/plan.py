"""What the engine executes: per unit, where activations live between forward and backward.

Why a plan object: the engine carries out decisions and never makes them. ``Plan`` is what the
planner (or a user, by hand) hands it: an activation policy per block (and, MEMO-style, the
fraction of the batch's rows it applies to, the other rows recomputed), the number of device
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
    fractions: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """By unit name: the fraction of the batch's rows whose activations a KEEP or SWAP block holds;
    its other rows keep only their input and are recomputed. Absent = 1 (every row)."""
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
        for name, f in self.fractions.items():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"Plan.fractions[{name!r}] must be a number in (0, 1], got {f!r}")
            if self.policy(name) is ActivationPolicy.RECOMPUTE:
                raise ValueError(f"Plan.fractions[{name!r}]: a fraction applies to a KEEP or SWAP block (the rows "
                                 f"it does not hold are recomputed), but {name} is RECOMPUTE; give it a policy "
                                 "in per_unit or drop the fraction")
        if self.num_slots < 2:
            raise ValueError(f"Plan.num_slots must be at least 2 (double buffering), got {self.num_slots}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens <= 0:
            raise ValueError(f"Plan.loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}")

    @classmethod
    def uniform(cls, policy: ActivationPolicy | str, **kwargs) -> "Plan":
        return cls(default=ActivationPolicy(policy), **kwargs)

    def policy(self, unit_name: str) -> ActivationPolicy:
        return self.per_unit.get(unit_name, self.default)

    def fraction(self, unit_name: str) -> float:
        return float(self.fractions.get(unit_name, 1.0))

    def rows_held(self, unit_name: str, batch_rows: int) -> int:
        """Rows of a ``batch_rows`` batch whose activations the block holds (0 for RECOMPUTE)."""
        if self.policy(unit_name) is ActivationPolicy.RECOMPUTE:
            return 0
        f = self.fraction(unit_name)
        rows = round(f * batch_rows)
        if abs(f * batch_rows - rows) > 1e-9:
            raise ValueError(f"Plan.fractions[{unit_name!r}]={f} of a batch of {batch_rows} rows is not a whole "
                             f"number of rows; use a multiple of 1/{batch_rows} (fractions split the batch by rows)")
        return rows

    def check_names(self, block_names: list[str]) -> None:
        unknown = sorted((set(self.per_unit) | set(self.fractions)) - set(block_names))
        if unknown:
            raise ValueError(f"Plan names units the model does not have as blocks: {unknown}; "
                             f"blocks are {block_names[0]} … {block_names[-1]}")

    def loss_chunk(self, vocab_size: int) -> int:
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return max(1, (256 * 2**20) // (4 * vocab_size))
