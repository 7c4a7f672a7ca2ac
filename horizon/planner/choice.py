"""What the planner chooses per block: a policy and the fraction of the batch's rows it covers.

Why its own record: with token fractions (MEMO-style) a block is no longer KEEP, SWAP or
RECOMPUTE but, say, "KEEP half the rows, recompute the other half". Every cost of such a choice
is read from the profile here, in one place, so the schedule, the simulator, the MIP, the greedy
planner and ``horizon plan`` cannot disagree. Compute is linear in the rows (seconds per token);
bytes are the ones measured at exactly that many rows (``UnitCost.keep_bytes_at``), because a
block's saved tensors are not all per row.
"""

from __future__ import annotations

import dataclasses

from horizon.engine.plan import ActivationPolicy as P
from horizon.planner.profile import Profile

__all__ = ["Choice", "as_choice", "choices", "held_fraction", "kept_bytes", "swapped_bytes", "input_bytes",
           "host_bytes_of", "forward_s", "backward_s"]


@dataclasses.dataclass(frozen=True)
class Choice:
    policy: P
    fraction: float = 1.0
    """Of the batch's rows whose activations ``policy`` holds; the other rows are recomputed."""

    def __str__(self) -> str:
        return self.policy.value if self.fraction == 1.0 else f"{self.policy.value}@{self.fraction:g}"


def as_choice(x: P | Choice) -> Choice:
    return x if isinstance(x, Choice) else Choice(x)


def choices(profile: Profile) -> tuple[Choice, ...]:
    """KEEP, SWAP, RECOMPUTE, then KEEP and SWAP at each of the profile's fractions."""
    return (Choice(P.KEEP), Choice(P.SWAP), Choice(P.RECOMPUTE),
            *(Choice(p, f) for f in profile.fractions for p in (P.KEEP, P.SWAP)))


def held_fraction(c: Choice) -> float:
    """The rows kept or swapped; 1 - this is recomputed."""
    return 0.0 if c.policy is P.RECOMPUTE else c.fraction


def _at(profile: Profile, full: int, at: tuple[int, ...], c: Choice) -> int:
    return full if c.fraction == 1.0 else at[profile.fractions.index(c.fraction)]


def kept_bytes(profile: Profile, unit: int, c: Choice) -> int:
    """Device bytes the block's kept graph holds until its backward."""
    cost = profile.units[unit]
    return _at(profile, cost.keep_bytes, cost.keep_bytes_at, c) if c.policy is P.KEEP else 0


def swapped_bytes(profile: Profile, unit: int, c: Choice) -> int:
    """Bytes the block's swapped graph sends to the host and back."""
    cost = profile.units[unit]
    return _at(profile, cost.swap_bytes, cost.swap_bytes_at, c) if c.policy is P.SWAP else 0


def input_bytes(profile: Profile, c: Choice) -> int:
    """Bytes of the recomputed rows' input, sent to the host and back."""
    return round((1.0 - held_fraction(c)) * profile.hidden_bytes)


def host_bytes_of(profile: Profile, unit: int, c: Choice) -> int:
    """Host bytes the engine parks for the block: swapped bytes, and a whole hidden state for any input."""
    return swapped_bytes(profile, unit, c) + (profile.hidden_bytes if held_fraction(c) < 1 else 0)


def forward_s(profile: Profile, unit: int, c: Choice) -> float:
    cost, f = profile.units[unit], held_fraction(c)
    return f * cost.fwd_grad_s + (1 - f) * cost.fwd_s


def backward_s(profile: Profile, unit: int, c: Choice) -> float:
    cost, f = profile.units[unit], held_fraction(c)
    return cost.bwd_s + (1 - f) * cost.fwd_grad_s
