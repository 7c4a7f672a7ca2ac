"""What the planner chooses per block: how its batch rows split between KEEP, SWAP and RECOMPUTE.

Why one record for all of it: with token fractions (MEMO-style) a block is no longer KEEP, SWAP
or RECOMPUTE but, say, "keep half the rows, swap a quarter, recompute the rest". A choice is the
engine's own ``RowSplit``; every cost of one is read from the profile here, in one place, so the
schedule, the simulator, the MIP, the greedy planner and ``horizon plan`` cannot disagree.
Compute is linear in the rows (seconds per token); bytes are those measured at exactly that many
rows (``UnitCost.keep_bytes_at``), because not every tensor a block saves is per row.
"""

from __future__ import annotations

from horizon.engine.plan import ActivationPolicy as P
from horizon.engine.plan import RowSplit
from horizon.planner.profile import Profile

__all__ = ["Choice", "as_choice", "choices", "kept_bytes", "swapped_bytes", "input_bytes", "host_bytes_of",
           "forward_s", "backward_s"]

Choice = RowSplit


def as_choice(x: P | Choice) -> Choice:
    return x if isinstance(x, RowSplit) else RowSplit.of(x)


def choices(profile: Profile) -> tuple[Choice, ...]:
    """KEEP, SWAP, RECOMPUTE, then every split of the rows into KEEP, SWAP and RECOMPUTE at the
    profile's fractions (keep + swap <= 1)."""
    levels = (0.0, *profile.fractions, 1.0)
    splits = [RowSplit(k, s) for k in levels for s in levels if k + s <= 1 + 1e-9]
    whole = [RowSplit.of(P.KEEP), RowSplit.of(P.SWAP), RowSplit.of(P.RECOMPUTE)]
    return (*whole, *(c for c in splits if c not in whole))


def _at(profile: Profile, fraction: float, full: int, at: tuple[int, ...]) -> int:
    if fraction == 0.0:
        return 0
    return full if fraction == 1.0 else at[profile.fractions.index(fraction)]


def kept_bytes(profile: Profile, unit: int, c: Choice) -> int:
    """Device bytes the block's kept graph holds until its backward."""
    cost = profile.units[unit]
    return _at(profile, c.keep, cost.keep_bytes, cost.keep_bytes_at)


def swapped_bytes(profile: Profile, unit: int, c: Choice) -> int:
    """Bytes the block's swapped graph sends to the host and back."""
    cost = profile.units[unit]
    return _at(profile, c.swap, cost.swap_bytes, cost.swap_bytes_at)


def input_bytes(profile: Profile, c: Choice) -> int:
    """Bytes of the recomputed rows' input, sent to the host and back."""
    return round(c.recompute * profile.hidden_bytes)


def host_bytes_of(profile: Profile, unit: int, c: Choice) -> int:
    """Host bytes the engine parks for the block: swapped bytes, and a whole hidden state for any input."""
    return swapped_bytes(profile, unit, c) + (profile.hidden_bytes if c.recompute > 0 else 0)


def forward_s(profile: Profile, unit: int, c: Choice) -> float:
    cost = profile.units[unit]
    return (c.keep + c.swap) * cost.fwd_grad_s + c.recompute * cost.fwd_s


def backward_s(profile: Profile, unit: int, c: Choice) -> float:
    cost = profile.units[unit]
    return cost.bwd_s + c.recompute * cost.fwd_grad_s
