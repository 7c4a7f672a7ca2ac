"""The engine's step as a list of events, in the engine's own program order, for any plan at once.

Why: the simulator (which replays one plan) and the MIP (which chooses among all of them) must
agree with the engine, and with each other, about what is copied, computed, held and let go,
and when. ``events`` walks ``Engine.forward_backward`` once: weights issued ``num_slots - 1``
positions ahead (a resident unit's only before its forward), restores as far ahead, each block's
offload drained during the next unit, at most two units of gradients in flight; a copy also
costs the compute beside it its bytes times ``Profile.copy_compute_s_per_byte``. Compute is in
measured seconds: ``Profile.compute_scale`` applies where a plan is priced (``simulate.py``), so
one event list serves every scale (``calibrate.py``). Every amount is a ``Term``: a sum of
coefficients, each counted always (unit None) or only when the named block has the named
``Choice`` (a policy and a row fraction, ``choice.py``). Evaluated for one plan a term is a
number; over the MIP's 0/1 variables it is a linear expression.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

from horizon.engine.slots import SlotUse, assign_slots
from horizon.engine.traffic import GRADS_IN_FLIGHT
from horizon.planner import choice as C
from horizon.planner.choice import Choice
from horizon.planner.profile import Profile

__all__ = ["Term", "Event", "events", "value", "shared_slot_bytes"]

Term = tuple[tuple[float, int | None, Choice | None], ...]
"""((coefficient, unit, choice), ...): coefficients count when ``unit`` is None or has ``choice``."""


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str            # "hold" | "release" | "copy" | "wait" | "compute" | "interval"
    key: object = None   # ledger key (hold/release) or copy id (copy/wait)
    amount: Term = ()    # bytes (hold/copy) or seconds (compute)
    direction: str = ""  # copies: "h2d" or "d2h"
    unit: int | None = None  # copies: the unit whose weights come in, or whose gradient goes out
    what: str = ""       # copies: "weights", "grad", or "" (activations)
    scaled: bool = False  # compute: a unit's measured seconds, times ``Profile.compute_scale`` when replayed


def value(term: Term, choose: Callable[[int, Choice], object]) -> object:
    """``term`` for one plan (``choose`` returns 0/1) or as an expression (``choose`` returns variables)."""
    return sum((c if unit is None else c * choose(unit, policy) for c, unit, policy in term), 0)


def _const(x: float) -> Term:
    return ((x, None, None),)


def events(profile: Profile, num_slots: int, resident: Collection[int] = (), *, fresh: bool = False) -> list[Event]:
    """The program-order events of one step; each position starts with an "interval" event.
    ``resident``: the units with a device buffer of their own (``Plan.resident``); ``fresh``: they hold
    the current weights already (a micro-batch after an update's first: ``SlotPool.uses``), so they load nothing."""
    return _Walk(profile, num_slots, resident, fresh).run()


def shared_slot_bytes(profile: Profile, resident: Collection[int] = ()) -> float:
    """One shared slot's bytes: the profile's, less what the largest unit's weights exceed the largest
    streamed unit's by when the largest are resident (the engine sizes shared slots to streamed units)."""
    largest = max(u.weight_bytes for u in profile.units)
    streamed = max((u.weight_bytes for i, u in enumerate(profile.units) if i not in resident), default=0)
    return profile.slot_bytes - (largest - streamed)


class _Walk:
    def __init__(self, profile: Profile, num_slots: int, resident: Collection[int], fresh: bool) -> None:
        self.p, self.depth = profile, num_slots - 1
        n = len(profile.units)
        self.order = list(range(n)) + list(range(n - 2, -1, -1))
        self.resident = sorted(resident)
        self.uses = assign_slots(self.order, num_slots, {u: num_slots + i for i, u in enumerate(self.resident)})
        if fresh:
            self.uses = [SlotUse(use.slot, use.load and unit not in resident)
                         for unit, use in zip(self.order, self.uses)]
        self.out: list[Event] = []
        self.copies = 0
        self.ready: dict[int, list[int]] = {}
        self.offloads: list[int] = []
        self.grads: list[int] = []   # units with gradients in flight, oldest first
        self.grad_copy: dict[int, int] = {}
        self.offload_copy: dict[int, tuple[int, int]] = {}
        self.next_restore = n
        self.num_slots = num_slots
        self.choices = C.choices(profile)

    def emit(self, kind: str, key=None, amount: Term = ()) -> None:
        self.out.append(Event(kind, key, amount, scaled=kind == "compute"))

    def copy(self, direction: str, amount: Term, unit: int | None = None, what: str = "") -> int:
        """A copy issued now; what it costs the compute beside it (``copy_compute_s_per_byte``) counts as
        compute at the same position, outside ``compute_scale``."""
        self.copies += 1
        self.out.append(Event("copy", self.copies, amount, direction, unit, what))
        if (per_byte := self.p.copy_compute_s_per_byte) and amount:
            self.out.append(Event("compute", amount=tuple((c * per_byte, unit, ch) for c, unit, ch in amount)))
        return self.copies

    def per_choice(self, unit: int, amount: Callable[[Choice], float]) -> Term:
        """``amount(choice)`` for each of the block's choices (the zeros left out)."""
        return tuple((a, unit, c) for c in self.choices if (a := amount(c)))

    def moved(self, unit: int) -> Term:
        """What a block keeps off the device: the input of its recomputed rows and its swapped bytes."""
        return self.per_choice(unit, lambda c: C.input_bytes(self.p, c) + C.swapped_bytes(self.p, unit, c))

    def run(self) -> list[Event]:
        for slot in range(self.num_slots):
            self.emit("hold", ("slot", slot), _const(shared_slot_bytes(self.p, self.resident)))
        for i, unit in enumerate(self.resident):
            self.emit("hold", ("slot", self.num_slots + i), _const(self.p.units[unit].weight_bytes))
        for position in range(min(self.depth, len(self.order))):
            self.issue_weights(position)
        for position, unit in enumerate(self.order):
            self.emit("interval", position)
            if position + self.depth < len(self.order):
                self.issue_weights(position + self.depth)
            self.issue_restores(position)
            for copy_id in self.ready.pop(position, []):
                self.emit("wait", copy_id)
            if position < len(self.p.units):
                self.forward(unit)
            else:
                self.backward(unit)
        for unit in list(self.grads):
            self.wait_grad()
        return self.out

    def issue_weights(self, position: int) -> None:
        if self.uses[position].load:
            unit = self.order[position]
            self.ready.setdefault(position, []).append(
                self.copy("h2d", _const(self.p.units[unit].weight_bytes), unit, "weights"))

    def wait_offload(self, unit: int) -> None:
        self.offloads.remove(unit)
        for copy_id in self.offload_copy.pop(unit):
            self.emit("wait", copy_id)
        self.emit("release", ("offloading", unit))

    def issue_restores(self, position: int) -> None:
        while self.next_restore <= min(position + self.depth, len(self.order) - 1):
            unit = self.order[self.next_restore]
            if unit >= position:
                return
            if unit in self.offloads:
                self.wait_offload(unit)
            if unit in self.p.blocks:
                self.emit("hold", ("input", unit), self.moved(unit))
                self.ready.setdefault(self.next_restore, []).append(self.copy("h2d", self.moved(unit)))
            self.next_restore += 1

    def forward(self, unit: int) -> None:
        cost, last = self.p.units[unit], len(self.p.units) - 1
        if unit == 0:
            self.emit("compute", amount=_const(cost.fwd_s))
            self.emit("hold", ("hidden",), _const(self.p.hidden_bytes))
            return
        if unit == last:
            self.emit("compute", amount=_const(cost.fwd_s))
            self.land_grads(unit)
        else:
            before = self.copy("d2h", self.per_choice(unit, lambda c: C.input_bytes(self.p, c)))
            self.emit("compute", amount=self.per_choice(unit, lambda c: C.forward_s(self.p, unit, c)))
            after = self.copy("d2h", self.per_choice(unit, lambda c: C.swapped_bytes(self.p, unit, c)))
            self.emit("hold", ("kept", unit), self.per_choice(unit, lambda c: C.kept_bytes(self.p, unit, c)))
            self.emit("hold", ("offloading", unit), self.moved(unit))
            self.offload_copy[unit] = (before, after)
            self.offloads.append(unit)
        for earlier in [u for u in self.offloads if u < unit]:
            self.wait_offload(earlier)

    def backward(self, unit: int) -> None:
        cost = self.p.units[unit]
        if unit == 0:
            self.emit("compute", amount=_const(cost.bwd_s))
            self.emit("release", ("hidden",))
        else:
            self.emit("compute", amount=self.per_choice(unit, lambda c: C.backward_s(self.p, unit, c)))
            self.emit("release", ("kept", unit))
            self.emit("release", ("input", unit))
        self.land_grads(unit)

    def land_grads(self, unit: int) -> None:
        cost = self.p.units[unit]
        for owner, nbytes in cost.borrowed_grad_bytes:
            self.emit("hold", ("pending", owner, unit), _const(nbytes))
        for other in range(len(self.p.units)):
            if any(owner == unit for owner, _ in self.p.units[other].borrowed_grad_bytes):
                self.emit("release", ("pending", unit, other))
        while len(self.grads) >= GRADS_IN_FLIGHT:
            self.wait_grad()
        self.grad_copy[unit] = self.copy("d2h", _const(cost.grad_bytes), unit, "grad")
        self.grads.append(unit)
        self.emit("hold", ("grad", unit), _const(cost.grad_bytes))

    def wait_grad(self) -> None:
        unit = self.grads.pop(0)
        self.emit("wait", self.grad_copy.pop(unit))
        self.emit("release", ("grad", unit))
