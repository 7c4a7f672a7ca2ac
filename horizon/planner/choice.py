"""What the planner chooses per block: how its batch rows split between KEEP, SWAP and RECOMPUTE.

Why one record for all of it: with token fractions (MEMO-style) a block is no longer KEEP, SWAP
or RECOMPUTE but, say, "keep half the rows, swap a quarter, recompute the rest". A choice is the
engine's own ``RowSplit``; every cost of one is read from the profile here, in one place, so the
schedule, the simulator, the MIP, the greedy planner and ``horizon plan`` cannot disagree.
Each part of a split costs what it was measured to cost at exactly that many rows
(``UnitCost.*_at``): seconds, because a small part runs less efficiently than its share of the
whole, and bytes, because not every tensor a block saves is per row; and each part after the
first costs the engine's copies, concatenations and sums (``UnitCost.split_fwd_s``, ``split_bwd_s``).
"""

from __future__ import annotations

from horizon.engine.plan import ActivationPolicy as P
from horizon.engine.plan import RowSplit
from horizon.planner.profile import Profile

__all__ = ["Choice", "DEVICE_INPUT_RECOMPUTE", "as_choice", "choices", "kept_bytes", "swapped_bytes", "input_bytes",
           "host_bytes_of", "forward_s", "backward_s"]

Choice = RowSplit


def as_choice(x: P | Choice) -> Choice:
    return x if isinstance(x, RowSplit) else RowSplit.of(x)


DEVICE_INPUT_RECOMPUTE = RowSplit(input_on_device=True)
"""RECOMPUTE with the block input left on the device: no link traffic for it, its bytes held instead.
Offered for whole blocks only (one more column per block; on every split it would be ten)."""


def choices(profile: Profile) -> tuple[Choice, ...]:
    """KEEP, SWAP, RECOMPUTE, RECOMPUTE with its input on the device, then every split of the rows into
    KEEP, SWAP and RECOMPUTE at the profile's fractions (keep + swap <= 1)."""
    levels = (0.0, *profile.fractions, 1.0)
    measured = lambda f: any(abs(f - m) < 1e-9 for m in levels)  # noqa: E731  (the recomputed part too)
    splits = [RowSplit(k, s) for k in levels for s in levels if k + s <= 1 + 1e-9 and measured(1 - k - s)]
    whole = [RowSplit.of(P.KEEP), RowSplit.of(P.SWAP), RowSplit.of(P.RECOMPUTE), DEVICE_INPUT_RECOMPUTE]
    return (*whole, *(c for c in splits if c not in whole))


def _at(profile: Profile, fraction: float, full, at: tuple):
    """A cost of the first ``fraction`` of the rows: 0, the whole block's, or the measured part's."""
    if fraction < 1e-9:
        return 0
    if fraction > 1 - 1e-9:
        return full
    return at[min(range(len(at)), key=lambda i: abs(profile.fractions[i] - fraction))]


def kept_bytes(profile: Profile, unit: int, c: Choice) -> int:
    """Device bytes the block holds until its backward: its kept graph, and its recomputed rows' input
    when that stays on the device."""
    cost = profile.units[unit]
    device_input = round(c.recompute * profile.hidden_bytes) if c.input_on_device else 0
    return _at(profile, c.keep, cost.keep_bytes, cost.keep_bytes_at) + device_input


def swapped_bytes(profile: Profile, unit: int, c: Choice) -> int:
    """Bytes the block's swapped graph sends to the host and back."""
    cost = profile.units[unit]
    return _at(profile, c.swap, cost.swap_bytes, cost.swap_bytes_at)


def input_bytes(profile: Profile, c: Choice) -> int:
    """Bytes of the recomputed rows' input, sent to the host and back (none when it stays on the device)."""
    return 0 if c.input_on_device else round(c.recompute * profile.hidden_bytes)


def host_bytes_of(profile: Profile, unit: int, c: Choice) -> int:
    """Host bytes the engine parks for the block: swapped bytes, and a whole hidden state for an input it sends."""
    return swapped_bytes(profile, unit, c) + (profile.hidden_bytes if input_bytes(profile, c) else 0)


def _part_s(profile: Profile, unit: int, fraction: float, name: str) -> float:
    cost = profile.units[unit]
    return _at(profile, fraction, getattr(cost, name), getattr(cost, f"{name}_at"))


def _extra_parts(c: Choice) -> int:
    return sum(f > 1e-9 for f in (c.keep, c.swap, c.recompute)) - 1


def forward_s(profile: Profile, unit: int, c: Choice) -> float:
    """KEEP and SWAP parts with autograd, the recomputed part without, and the split's own copies."""
    return (_part_s(profile, unit, c.keep, "fwd_grad_s") + _part_s(profile, unit, c.swap, "fwd_grad_s")
            + _part_s(profile, unit, c.recompute, "fwd_s") + _extra_parts(c) * profile.units[unit].split_fwd_s)


def backward_s(profile: Profile, unit: int, c: Choice) -> float:
    """Each part's backward; the recomputed part's forward with autograd first; the split's own sums."""
    return sum(_part_s(profile, unit, f, "bwd_s") for f in (c.keep, c.swap, c.recompute)) \
        + _part_s(profile, unit, c.recompute, "fwd_grad_s") + _extra_parts(c) * profile.units[unit].split_bwd_s
