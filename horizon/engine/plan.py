"""What the engine executes: per unit, where activations live between forward and backward.

Why a plan object: the engine carries out decisions and never makes them. ``Plan`` is what the
planner (or a user, by hand) hands it: an activation policy per block, or, MEMO-style, a split
of the block's batch rows between KEEP, SWAP and RECOMPUTE (and where the recomputed rows' input
waits: host or device); the number of device slots, the units resident on the device and the
loss-head chunk size. The engine validates it against the model before a step.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping

__all__ = ["ActivationPolicy", "Plan", "RowSplit"]


class ActivationPolicy(enum.Enum):
    KEEP = "keep"            # keep the block's autograd activations on the device until its backward
    RECOMPUTE = "recompute"  # keep only the block input (offloaded to host), recompute in backward
    SWAP = "swap"            # copy the block's saved activations to host after forward, back before backward


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """A block's batch rows by policy: the first ``keep`` of them KEEP, the next ``swap`` SWAP, the rest
    RECOMPUTE (fractions of the batch's rows; the engine needs each to be whole rows of the batch)."""

    keep: float = 0.0
    swap: float = 0.0
    input_on_device: bool = False
    """Where the recomputed rows' input waits for their backward: False = on the host (it crosses the
    link twice), True = on the device (it holds device memory instead)."""

    def __post_init__(self) -> None:
        for name in ("keep", "swap"):
            f = getattr(self, name)
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
                raise ValueError(f"RowSplit.{name} must be a fraction of the rows in [0, 1], got {f!r}")
        if self.keep + self.swap > 1 + 1e-9:
            raise ValueError(f"RowSplit keep + swap must be at most 1 (the rest is recomputed), got "
                             f"{self.keep} + {self.swap}")
        if not isinstance(self.input_on_device, bool):
            raise ValueError(f"RowSplit.input_on_device must be True or False, got {self.input_on_device!r}")
        if self.input_on_device and self.recompute == 0:
            raise ValueError("RowSplit.input_on_device=True needs rows to recompute (keep + swap < 1): "
                             "it says where their input waits")

    @classmethod
    def of(cls, policy: ActivationPolicy) -> "RowSplit":
        return cls(keep=float(policy is ActivationPolicy.KEEP), swap=float(policy is ActivationPolicy.SWAP))

    @property
    def recompute(self) -> float:
        return max(0.0, 1.0 - self.keep - self.swap)

    def __str__(self) -> str:
        whole = {(1.0, 0.0): "keep", (0.0, 1.0): "swap", (0.0, 0.0): "recompute"}.get((self.keep, self.swap))
        text = whole or f"keep {self.keep:g} swap {self.swap:g} recompute {self.recompute:g}"
        return text + (" (input on device)" if self.input_on_device else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    default: ActivationPolicy = ActivationPolicy.RECOMPUTE
    """Policy of every block not named in ``per_unit``."""
    per_unit: Mapping[str, ActivationPolicy] = dataclasses.field(default_factory=dict)
    """Policy by unit name (``layers.3``), overriding ``default``."""
    splits: Mapping[str, RowSplit] = dataclasses.field(default_factory=dict)
    """By unit name: the block's rows split between KEEP, SWAP and RECOMPUTE, overriding its policy."""
    num_slots: int = 2
    """Device buffers for unit weights: 2 = double buffering, more = deeper prefetch."""
    resident: tuple[str, ...] = ()
    """Units (any: ``embed_tokens``, ``layers.3``, ``lm_head``) with a device buffer of their own: copied in
    once per update (after it; a step without accumulation), instead of once for the forward and once more
    for the backward of every step."""
    loss_chunk_tokens: int | None = None
    """Tokens per loss-head chunk; None = as many as fit 256 MiB of fp32 logits."""
    round_rows: bool = False
    """A split's fraction that is not whole rows of a batch: False = a ValueError; True = its KEEP and
    SWAP rows round down and the rest is recomputed (fewer device bytes than the plan's batch), so a
    smaller batch (an epoch's last) runs within the budget. Plans from the planner set it."""

    def __post_init__(self) -> None:
        if not isinstance(self.default, ActivationPolicy):
            raise ValueError(f"Plan.default must be an ActivationPolicy, got {self.default!r}")
        bad = {k: v for k, v in self.per_unit.items() if not isinstance(v, ActivationPolicy)}
        if bad:
            raise ValueError(f"Plan.per_unit values must be ActivationPolicy members, got {bad}")
        bad = {k: v for k, v in self.splits.items() if not isinstance(v, RowSplit)}
        if bad:
            raise ValueError(f"Plan.splits values must be RowSplit(keep=..., swap=...), got {bad}")
        if self.num_slots < 2:
            raise ValueError(f"Plan.num_slots must be at least 2 (double buffering), got {self.num_slots}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens <= 0:
            raise ValueError(f"Plan.loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}")
        if not isinstance(self.round_rows, bool):
            raise ValueError(f"Plan.round_rows must be True or False, got {self.round_rows!r}")
        if not isinstance(self.resident, tuple) or not all(isinstance(n, str) for n in self.resident):
            raise ValueError(f"Plan.resident must be a tuple of unit names, got {self.resident!r}")
        if len(set(self.resident)) != len(self.resident):
            raise ValueError(f"Plan.resident names a unit twice: {self.resident}")

    @classmethod
    def uniform(cls, policy: ActivationPolicy | str, **kwargs) -> "Plan":
        return cls(default=ActivationPolicy(policy), **kwargs)

    def policy(self, unit_name: str) -> ActivationPolicy:
        return self.per_unit.get(unit_name, self.default)

    def split(self, unit_name: str) -> RowSplit:
        return self.splits.get(unit_name) or RowSplit.of(self.policy(unit_name))

    def rows(self, unit_name: str, batch_rows: int) -> tuple[int, int]:
        """(KEEP rows, SWAP rows) of a ``batch_rows`` batch for the block; the rest are recomputed."""
        out = []
        for f in (self.split(unit_name).keep, self.split(unit_name).swap):
            rows = round(f * batch_rows)
            if abs(f * batch_rows - rows) > 1e-9:
                if not self.round_rows:
                    raise ValueError(f"Plan.splits[{unit_name!r}]: {f} of a batch of {batch_rows} rows is not a "
                                     f"whole number of rows; use multiples of 1/{batch_rows} (splits divide the batch "
                                     "by rows), or Plan(round_rows=True) to round down")
                rows = math.floor(f * batch_rows)
            out.append(rows)
        return out[0], out[1]

    def check_names(self, block_names: list[str]) -> None:
        unknown = sorted((set(self.per_unit) | set(self.splits)) - set(block_names))
        if unknown:
            raise ValueError(f"Plan names units the model does not have as blocks: {unknown}; "
                             f"blocks are {block_names[0]} … {block_names[-1]}")

    def resident_units(self, unit_names: list[str]) -> list[int]:
        """The indices of the resident units in the chain, in chain order; a ValueError for an unknown name."""
        unknown = sorted(set(self.resident) - set(unit_names))
        if unknown:
            raise ValueError(f"Plan.resident names units the model does not have: {unknown}; its units are "
                             f"{', '.join(unit_names[:3])} … {unit_names[-1]}")
        return [u for u, name in enumerate(unit_names) if name in self.resident]

    def loss_chunk(self, vocab_size: int) -> int:
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return max(1, (256 * 2**20) // (4 * vocab_size))
