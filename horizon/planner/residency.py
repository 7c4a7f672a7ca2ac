"""Which units stay resident on the device: the device memory a plan leaves unused, spent on the link.

Why after the solve, not inside it: a streamed unit crosses the link twice a step (its forward and
its backward, unless the slots still hold it at the turn), a resident one once (its new weights,
after their update); a resident unit costs its weights' bytes for the whole step. That trade only
pays where the link, not the compute, sets a position's length, which is the exception on a large
batch: the activation plan is chosen first (``solve_mip`` / ``solve_greedy``, every unit
streamed), then ``add_resident`` spends what the budget has left, one unit at a time, best first,
on the units whose residency the simulator says shortens the step (the research note's "spend
leftover GPU memory on residency, largest exposed H2D time first"). Making a unit resident never changes the
activation plan's choices, so every plan it returns is the solver's with fewer copies.
Inside the MIP, residency would change which positions load (``assign_slots``), which the
event list fixes per slot count; enumerating resident sets there multiplies the solves.
"""

from __future__ import annotations

import dataclasses

from horizon.engine.slots import assign_slots
from horizon.planner.mip import Solution
from horizon.planner.profile import Profile
from horizon.planner.simulate import model_step_s, simulate

__all__ = ["add_resident", "reloaded_units"]

_GAIN_S = 1e-9
"""A resident unit must shorten the simulated step by more than this (a tie keeps the memory free)."""
_WORTH = 0.01
"""Residency is searched only if every candidate resident at once saves this share of the step: below
it the link hardly sets the step, and a search costs two replays per candidate (~30 ms each at 80 blocks)."""


def reloaded_units(profile: Profile, num_slots: int) -> list[int]:
    """The units a step copies to the device more than once with every unit streamed: the only ones
    whose residency saves a copy (the head runs once; a unit the slots hold at the turn is not reloaded)."""
    n = len(profile.units)
    order = list(range(n)) + list(range(n - 2, -1, -1))
    loads = [u for u, use in zip(order, assign_slots(order, num_slots)) if use.load]
    return sorted({u for u in loads if loads.count(u) > 1})


def add_resident(profile: Profile, solution: Solution, budget_bytes: int) -> Solution:
    """``solution`` with resident units added while the simulated step gets shorter and the device peak
    stays within ``budget_bytes``. Candidates are ranked once by what each alone saves (then by fewer
    bytes), and taken in that order where they still shorten the step: 2 replays per candidate."""
    slots, choices = solution.num_slots, solution.choices
    resident: list[int] = sorted(solution.resident)
    best = simulate(profile, choices, slots, resident)
    candidates = [u for u in reloaded_units(profile, slots) if u not in resident]
    # In the replay a copy fewer delays nothing (its queues are FIFO), and with fewer units in the shared
    # slots the others are loaded no more often (tests/unit/test_resident.py): if every candidate at once
    # does not shorten the step by ``_WORTH``, no subset does. The usual case (the compute sets the step)
    # costs one replay.
    every = simulate(profile, choices, slots, sorted(resident + candidates)) if candidates else best
    if every.step_s > best.step_s * (1 - _WORTH):
        return solution
    ranked = []
    for unit in candidates:
        alone = simulate(profile, choices, slots, sorted(resident + [unit]))
        if alone.step_s < best.step_s - _GAIN_S:
            ranked.append((alone.step_s, profile.units[unit].weight_bytes, unit))
    for _, _, unit in sorted(ranked):
        trial = simulate(profile, choices, slots, sorted(resident + [unit]))
        if trial.peak_bytes <= budget_bytes and trial.step_s < best.step_s - _GAIN_S:
            resident, best = sorted(resident + [unit]), trial
    if resident == sorted(solution.resident):
        return solution
    return dataclasses.replace(solution, resident=tuple(resident), peak_bytes=best.peak_bytes,
                               step_s=model_step_s(profile, choices, slots, resident))
