"""The device peak of one training step, computed without running it.

Why a replay and not a closed formula: the engine's peak is the largest of many moments (the
loss head with the last block's restored input, a backward with two units' gradients in flight
and the next input already restored, a tied head's gradient waiting for the embedding), and
which moment wins depends on the sizes. This module walks the same order of units as
``Engine.forward_backward`` and makes the same ``hold``/``release`` calls on a ``DeviceLedger``
with byte counts computed from the layouts, so its peak is the engine's accounting, exactly
(``tests/unit/test_estimate.py`` checks that against real steps). If the engine changes what it
holds, this replay must change with it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from horizon.engine.traffic import GRADS_IN_FLIGHT
from horizon.engine.ledger import DeviceLedger
from horizon.engine.plan import ActivationPolicy
from horizon.engine.slots import shared_slot_numel, slot_numel
from horizon.store.layout import UnitLayout

__all__ = ["DevicePeak", "replay_device_peak"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevicePeak:
    peak_bytes: int
    """The ledger's peak over one step (steps repeat it exactly)."""
    bytes_by_part_at_peak: dict[str, int]
    """What was held at that moment: slots, hidden (the activation or gradient flowing between
    units), inputs (restored RECOMPUTE inputs), offloading, kept (KEEP graphs), grads (on their
    way to the host), pending (a tied parameter's gradient waiting for its owner)."""


class _PeakLedger(DeviceLedger):
    """A ``DeviceLedger`` that also remembers what it held at its peak."""

    def __init__(self) -> None:
        super().__init__()
        self.at_peak: dict[object, int] = {}

    def hold(self, key: object, nbytes: int) -> None:
        super().hold(key, nbytes)
        if self.current_bytes == self.peak_bytes:
            self.at_peak = dict(self._held)


def _own_grad_bytes(layout: UnitLayout, itemsize: int) -> int:
    return layout.numel * itemsize


def replay_device_peak(layouts: list[UnitLayout], policies: list[ActivationPolicy | None], *, num_slots: int,
                       hidden_bytes: int, kept_bytes: list[int], itemsize: int,
                       resident: Sequence[int] = ()) -> DevicePeak:
    """The engine's ledger peak for units ``layouts`` (embedding, blocks, head) under ``policies``.

    ``policies[u]`` is None for the embedding and the head; ``kept_bytes[u]`` is what a KEEP
    block's graph saves (unused for other units); ``itemsize`` is the compute dtype's size;
    ``resident``: the units with a device buffer of their own (``Plan.resident``).
    """
    num_units = len(layouts)
    order = list(range(num_units)) + list(range(num_units - 2, -1, -1))
    ledger = _PeakLedger()
    for slot in range(num_slots):
        ledger.hold(("slot", slot), shared_slot_numel(layouts, resident) * itemsize)
    for i, unit in enumerate(resident):
        ledger.hold(("slot", num_slots + i), slot_numel([layouts[unit]]) * itemsize)
    hidden = _Hidden(ledger, hidden_bytes)
    offloads: list[int] = []
    grads: collections.deque[int] = collections.deque()
    pending: dict[int, list[tuple]] = {}
    next_restore = num_units

    def land(unit: int) -> None:
        for b in layouts[unit].borrowed:
            key = ("pending", b.owner, b.owner_slot.offset)
            pending.setdefault(b.owner, []).append(key)
            ledger.hold(key, b.owner_slot.numel * itemsize)
        for key in pending.pop(unit, []):
            ledger.release(key)
        while len(grads) >= GRADS_IN_FLIGHT:
            ledger.release(("grad", grads.popleft()))
        grads.append(unit)
        ledger.hold(("grad", unit), _own_grad_bytes(layouts[unit], itemsize))

    for position, unit in enumerate(order):
        while next_restore <= min(position + num_slots - 1, len(order) - 1):
            restored = order[next_restore]
            if restored >= position:
                break
            if policies[restored] is ActivationPolicy.RECOMPUTE:
                if restored in offloads:
                    offloads.remove(restored)
                    ledger.release(("offloading", restored))
                ledger.hold(("input", restored), hidden_bytes)
            next_restore += 1
        first_visit = position < num_units
        if unit == 0:
            hidden.set(first_visit)
            if not first_visit:
                land(unit)
        elif unit == num_units - 1:
            hidden.set(True)  # the gradient of the loss w.r.t. the hidden state replaces it
            land(unit)
        elif policies[unit] is ActivationPolicy.KEEP:
            if first_visit:
                ledger.hold(("kept", unit), kept_bytes[unit])
                hidden.set(True)
            else:
                ledger.release(("kept", unit))
                hidden.set(True)
                land(unit)
        elif first_visit:
            ledger.hold(("offloading", unit), hidden_bytes)
            hidden.set(True)
            for earlier in offloads:
                ledger.release(("offloading", earlier))
            offloads[:] = [unit]
        else:
            ledger.release(("input", unit))
            hidden.set(True)
            land(unit)
    by_part: dict[str, int] = collections.Counter()
    for key, nbytes in ledger.at_peak.items():
        by_part[key[0] + "s" if key[0] in ("slot", "input", "grad") else key[0]] += nbytes
    return DevicePeak(peak_bytes=ledger.peak_bytes, bytes_by_part_at_peak=dict(by_part))


class _Hidden:
    """The one hidden state (activation forward, gradient backward) the engine holds between units."""

    def __init__(self, ledger: DeviceLedger, nbytes: int) -> None:
        self.ledger, self.nbytes, self.count = ledger, nbytes, 0

    def set(self, present: bool) -> None:
        if self.count:
            self.ledger.release(("hidden", self.count))
        self.count += 1
        if present:
            self.ledger.hold(("hidden", self.count), self.nbytes)
