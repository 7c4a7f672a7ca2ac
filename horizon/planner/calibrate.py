"""Fold measured steps back into a profile: one compute scale, fitted on a few plans.

Why: a unit timed alone runs with its inputs and graph hot in cache and the cores to itself. In
a real step the optimizer and transfer threads share the cores, a kept graph is read long after
it was made, and each unit pays the engine's Python bookkeeping. On the 2-core development
machine that made the simulator predict 14-19% too little (bench/results/planner.json before
calibration). ``calibrate`` finds the one factor on compute seconds (``Profile.compute_scale``)
that best reproduces measured steps of a few plans (least squares on log(predicted/measured));
the link stays as measured, since the throttle or the copy engine is timed directly. The plans
it was not fitted on check it (tests/unit/test_simulator_timing.py). This is the research note's
"efficiency factor" calibration of the simulator, with one resource calibrated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from horizon.engine.plan import ActivationPolicy
from horizon.planner.profile import Profile
from horizon.planner.schedule import events
from horizon.planner.simulate import check_offered, priced, replay

__all__ = ["calibrate", "MeasuredStep"]

MeasuredStep = tuple[Mapping[int, ActivationPolicy], int, float]
"""(policies, num_slots, measured seconds per step) of one plan."""

_LOWEST, _HIGHEST = 0.1, 10.0
"""Scales outside this range mean the profile was measured on another machine or batch shape."""


def calibrate(profile: Profile, measured: Sequence[MeasuredStep]) -> Profile:
    """``profile`` with the ``compute_scale`` whose simulated steps best match ``measured``."""
    if not measured:
        raise ValueError("calibrate needs at least one measured step (policies, num_slots, seconds)")
    for _, _, seconds in measured:
        if not seconds > 0:
            raise ValueError(f"measured step times must be positive seconds, got {seconds!r}")

    plans = []  # each measured plan priced once; only the scale changes from one trial to the next
    for policies, slots, seconds in measured:
        check_offered(profile, policies)
        plans.append((priced(events(profile, slots), policies), seconds))

    def loss(scale: float) -> float:
        scaled = dataclasses.replace(profile, compute_scale=scale)
        return sum(math.log(replay(scaled, plan).step_s / seconds) ** 2 for plan, seconds in plans)

    # Each term is unimodal in the scale (the simulated step is non-decreasing in it): a log grid,
    # then golden-section search between the best point's neighbours.
    grid = [_LOWEST * (_HIGHEST / _LOWEST) ** (i / 64) for i in range(65)]
    best = min(range(len(grid)), key=lambda i: loss(grid[i]))
    if best in (0, len(grid) - 1):
        raise ValueError(f"the measured steps need a compute scale outside [{_LOWEST}, {_HIGHEST}]: the profile "
                         "was measured at another batch shape, link bandwidth or machine; measure it again "
                         "where you train")
    lo, hi = grid[best - 1], grid[best + 1]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if loss(a) <= loss(b) else (a, hi)
    return dataclasses.replace(profile, compute_scale=(lo + hi) / 2)
