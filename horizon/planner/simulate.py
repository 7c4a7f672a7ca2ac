"""Predict a plan's step time and device peak: a discrete-event replay, and the MIP's interval model.

Why both: ``simulate`` replays the engine's events for one plan, with a FIFO copy queue per
direction (one shared queue unless the link is duplex) and the compute thread waiting where
the engine waits; its ledger is the engine's ledger, byte for byte. The MIP cannot branch on
queue states, so it uses ``model_step_s``: per position of the step, the longer of its compute
and the link time of the copies issued there (the epigraph form of Checkmate/MEMO-style
planners). Brute force checks the MIP against ``model_step_s``; the simulator checks both.
With a profile's update times (``Profile.update_schedule``) the replay also runs the optimizer's
worker and replays three update windows (``Profile.accumulation`` steps each), so a unit's load waits
for its update as in a run; the MIP's model leaves the optimizer out (it is the same for every plan
but for what it hides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import NamedTuple

from horizon.engine.plan import ActivationPolicy as P
from horizon.optim.updater import WHOLE_CORE_UNITS
from horizon.planner.choice import Choice, as_choice, choices
from horizon.planner.profile import Profile
from horizon.planner.schedule import Event, Term, events, value

__all__ = ["Prediction", "simulate", "priced", "replay", "Priced", "model_step_s", "memory_rows", "peak_bytes",
           "intervals", "Interval", "chooser"]

Policies = Mapping[int, P | Choice]
"""A plan as the planner sees it: the policy (or policy and row fraction) of every block, by unit index."""


def chooser(policies: Policies):
    """``choose(unit, choice)`` for ``schedule.value``: 1 where the plan makes that choice, else 0."""
    chosen = {u: as_choice(p) for u, p in policies.items()}
    return lambda unit, choice: 1 if chosen[unit] == choice else 0


def check_offered(profile: Profile, policies: Policies) -> None:
    """A ValueError for a choice the profile does not price (the schedule's terms cover only ``choices``)."""
    offered = set(choices(profile))
    missing = {u: str(c) for u, p in policies.items() if (c := as_choice(p)) not in offered}
    if missing:
        raise ValueError(f"the planner cannot price these choices: {missing}; it prices whole policies, RECOMPUTE "
                         f"with its input on the device, and row splits at the profile's fractions "
                         f"{profile.fractions} with their input on the host")


@dataclasses.dataclass(frozen=True)
class Prediction:
    step_s: float
    """Time from the first weight copy to the last gradient on the host."""
    peak_bytes: int
    """The engine ledger's peak (slots, hidden states, kept/restored activations, gradients in flight)."""
    compute_s: float
    """Time the compute thread was busy."""
    link_busy_s: float
    """Time the copy queues were busy (summed over queues)."""


_STEADY_UPDATES = 3
"""Updates replayed when they are simulated: the first window meets no pending update, the second meets
the first's; the third's length is the steady state's (the eager schedule's backlog settles by then)."""


def simulate(profile: Profile, policies: Policies, num_slots: int, resident: Collection[int] = ()) -> Prediction:
    """One step of the plan replayed: with updates simulated, the mean step of the last of ``_STEADY_UPDATES``
    update windows (``Profile.accumulation`` steps each), each unit's next load waiting for its update;
    ``resident``: the units with a device buffer of their own (loaded by a window's first step only)."""
    check_offered(profile, policies)
    first = priced(events(profile, num_slots, resident), policies)
    if not resident or profile.accumulation == 1:
        return replay(profile, first)
    return replay(profile, first, priced(events(profile, num_slots, resident, fresh=True), policies))


class Priced(NamedTuple):
    """An event with its amount for one plan: bytes, or seconds (measured: ``scaled`` ones before the scale)."""

    kind: str
    key: object
    amount: float
    direction: str
    unit: int | None
    what: str
    scaled: bool


def priced(step_events: list[Event], policies: Policies) -> list[Priced]:
    """``step_events`` with their amounts for the plan ``policies``: what ``replay`` runs."""
    choose = chooser(policies)
    return [Priced(e.kind, e.key, value(e.amount, choose), e.direction, e.unit, e.what, e.scaled)
            for e in step_events]


def replay(profile: Profile, first: list[Priced], rest: list[Priced] | None = None) -> Prediction:
    """A plan's priced events replayed at the profile's compute scale, link and update schedule: ``first``
    for an update window's first step, ``rest`` (default: the same) for its other steps."""
    run, k = _Replay(profile), profile.accumulation
    for _ in range(1 if profile.update_schedule == "none" else _STEADY_UPDATES):
        start = run.now
        run.compute = run.busy = 0.0
        for micro in range(k):
            run.step(first if micro == 0 or rest is None else rest, last=micro == k - 1)
    return Prediction(step_s=(run.now - start) / k, peak_bytes=int(round(run.peak)), compute_s=run.compute / k,
                      link_busy_s=run.busy / k)


class _Replay:
    """The engine's compute thread, its copy queues and the optimizer's worker, event by event."""

    def __init__(self, profile: Profile) -> None:
        self.p = profile
        self.now = self.peak = self.compute = self.busy = 0.0
        self.free = {"h2d": 0.0, "d2h": 0.0}
        self.updater_free = 0.0
        self.updated: dict[int, float] = {}  # by unit: when its last update ends (its next load waits)

    def step(self, step_events: list[Priced], *, last: bool) -> None:
        """One step's events (``last``: the update window's last, whose deferred updates follow it)."""
        ends: dict[int, float] = {}
        held: dict[object, float] = {}
        current = 0.0
        scale = self.p.compute_scale
        for e in step_events:
            if e.kind == "compute":
                dt = e.amount * scale if e.scaled else e.amount
                self.now += dt
                self.compute += dt
            elif e.kind == "copy":
                ends[e.key] = self._copy(e)
                if e.what == "grad" and self.p.update_schedule == "eager":
                    self._update(e.unit, ends[e.key])
            elif e.kind == "wait":
                self.now = max(self.now, ends[e.key])
            elif e.kind == "hold":
                held[e.key] = e.amount
                current += held[e.key]
                self.peak = max(self.peak, current)
            elif e.kind == "release":
                current -= held.pop(e.key)
        if last and self.p.update_schedule == "deferred":  # the norm is known: every update, in forward order
            for unit in range(len(self.p.units)):
                self._update(unit, self.now)

    def _copy(self, e: Priced) -> float:
        """When the copy ends; a unit's weights wait for its pending update first."""
        nbytes = e.amount
        if nbytes == 0:
            return self.now  # the engine issues no copy (or a DONE handle)
        queue = e.direction if self.p.duplex else "h2d"
        start = max(self.now, self.free[queue])
        if e.what == "weights":
            start = max(start, self.updated.get(e.unit, 0.0))
        self.free[queue] = start + nbytes / self.p.link_bytes_per_s
        self.busy += nbytes / self.p.link_bytes_per_s
        return self.free[queue]

    def _update(self, unit: int, ready: float) -> None:
        cost = self.p.units[unit]
        seconds = cost.update_overlap_s if self.p.update_schedule == "eager" and unit not in WHOLE_CORE_UNITS \
            else cost.update_s
        self.updater_free = self.updated[unit] = max(ready, self.updater_free) + seconds


def memory_rows(profile: Profile, num_slots: int, resident: Collection[int] = ()) -> list[Term]:
    """The ledger at each of its local maxima, as terms: a plan's peak is the largest row's value.

    Every amount is bytes (coefficients >= 0), so the ledger after a hold that another hold follows
    is at most the ledger after that one, for every plan: only the row before each release counts."""
    held: dict[object, Term] = {}
    rows: list[Term] = []
    rising = False
    for e in events(profile, num_slots, resident):
        if e.kind == "hold":
            held[e.key], rising = e.amount, True
        elif e.kind == "release":
            if rising:
                rows.append(tuple(t for term in held.values() for t in term))
            held.pop(e.key)
            rising = False
    if rising:
        rows.append(tuple(t for term in held.values() for t in term))
    return _dedupe(rows)


def _dedupe(rows: list[Term]) -> list[Term]:
    out, seen = [], set()
    for row in rows:
        merged: dict[tuple, float] = {}
        for c, unit, policy in row:
            merged[(unit, policy)] = merged.get((unit, policy), 0.0) + c
        key = frozenset((k, c) for k, c in merged.items() if c)
        if key not in seen:
            seen.add(key)
            out.append(tuple((c, u, p) for (u, p), c in merged.items() if c))
    return out


@dataclasses.dataclass(frozen=True)
class Interval:
    """One position of the step: its compute and the bytes of the copies issued during it."""

    compute: Term
    h2d: Term
    d2h: Term


def intervals(profile: Profile, num_slots: int, resident: Collection[int] = ()) -> list[Interval]:
    """Position by position (a prologue first: the weights issued before the first unit)."""
    out: list[dict[str, list]] = [{"compute": [], "h2d": [], "d2h": []}]
    for e in events(profile, num_slots, resident):
        if e.kind == "interval":
            out.append({"compute": [], "h2d": [], "d2h": []})
        elif e.kind == "compute":
            scale = profile.compute_scale if e.scaled else 1.0
            out[-1]["compute"].extend((c * scale, unit, choice) for c, unit, choice in e.amount)
        elif e.kind == "copy":
            out[-1][e.direction].extend(e.amount)
    return [Interval(tuple(d["compute"]), tuple(d["h2d"]), tuple(d["d2h"])) for d in out]


def model_step_s(profile: Profile, policies: Policies, num_slots: int, resident: Collection[int] = ()) -> float:
    """The MIP's objective for one plan: Σ over positions of max(compute, link time)."""
    check_offered(profile, policies)
    choose, bw = chooser(policies), profile.link_bytes_per_s
    total = 0.0
    for iv in intervals(profile, num_slots, resident):
        h2d, d2h = value(iv.h2d, choose) / bw, value(iv.d2h, choose) / bw
        link = max(h2d, d2h) if profile.duplex else h2d + d2h
        total += max(value(iv.compute, choose), link)
    return total


def peak_bytes(profile: Profile, policies: Policies, num_slots: int, resident: Collection[int] = ()) -> int:
    """The plan's device peak: the largest ``memory_rows`` value, which the replay tracks as it goes."""
    return simulate(profile, policies, num_slots, resident).peak_bytes
