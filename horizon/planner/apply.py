"""From a solution to what the engine executes: a ``horizon.Plan``, saved as JSON with its inputs.

Why JSON with inputs: a plan is only as good as the costs it was chosen from. The file keeps
the profile, the budget and the prediction beside the decision, so a plan can be read,
reviewed, edited by hand and loaded back (``TrainConfig(plan="plan.json")``), and a stale one
is recognisable. ``auto_plan`` is the whole path the trainer takes for ``plan="auto"``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable

import torch

from horizon.engine.plan import ActivationPolicy, Plan, RowSplit
from horizon.engine.transfer import Transfer
from horizon.models.units import UnitSpec
from horizon.planner.mip import Solution, solve_mip
from horizon.planner.profile import Profile
from horizon.planner.residency import add_resident
from horizon.planner.simulate import simulate
from horizon.store.host_store import HostStore

__all__ = ["to_plan", "save_plan", "load_plan", "auto_plan", "describe"]

FORMAT = "horizon-plan/1"

log = logging.getLogger("horizon.planner")


def to_plan(profile: Profile, solution: Solution, *, loss_chunk_tokens: int | None = None) -> Plan:
    """The plan for ``solution``: a policy per block, a ``RowSplit`` for the blocks that split their rows."""
    whole = {RowSplit.of(p): p for p in ActivationPolicy}
    per_unit = {profile.units[u].name: whole[c] for u, c in solution.choices.items() if c in whole}
    splits = {profile.units[u].name: c for u, c in solution.choices.items() if c not in whole}
    return Plan(default=ActivationPolicy.RECOMPUTE, per_unit=per_unit, splits=splits,
                num_slots=solution.num_slots, loss_chunk_tokens=loss_chunk_tokens, round_rows=True,
                resident=tuple(profile.units[u].name for u in solution.resident))


def save_plan(path: str | os.PathLike, plan: Plan, *, profile: Profile | None = None,
              budget_bytes: int | None = None, solution: Solution | None = None) -> None:
    record = {"format": FORMAT, "default": plan.default.value, "num_slots": plan.num_slots,
              "resident": list(plan.resident), "loss_chunk_tokens": plan.loss_chunk_tokens,
              "round_rows": plan.round_rows,
              "per_unit": {name: p.value for name, p in plan.per_unit.items()}, 
              "splits": {name: {"keep": c.keep, "swap": c.swap}
                         | ({"input_on_device": True} if c.input_on_device else {}) for name, c in plan.splits.items()},
              "inputs": {"device_memory_budget_bytes": budget_bytes,
                         "profile": profile.to_dict() if profile is not None else None}}
    if solution is not None and profile is not None:
        sim = simulate(profile, solution.choices, solution.num_slots, solution.resident)
        record["prediction"] = {"model_step_s": solution.step_s, "simulated_step_s": sim.step_s,
                                "peak_bytes": solution.peak_bytes, "optimal": solution.optimal,
                                "solve_s": solution.solve_s}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def read_record(path: str | os.PathLike, fmt: str, what: str, hint: str = "") -> dict:
    """The JSON object in ``path`` whose "format" is ``fmt``; a ValueError that names the file otherwise."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise ValueError(f"{path} is not a horizon {what}: expected a JSON object with \"format\": \"{fmt}\"{hint}")
    return record


def load_plan(path: str | os.PathLike) -> Plan:
    """The ``Plan`` in a file written by ``save_plan`` (or by hand: format, per_unit, splits, num_slots, resident)."""
    record = read_record(path, FORMAT, "plan")
    words = {p.value for p in ActivationPolicy}
    per_unit = record.get("per_unit", {})
    bad = {k: v for k, v in per_unit.items() if v not in words}
    if bad:
        raise ValueError(f"{path}: per_unit policies must be one of {sorted(words)}, got {bad}")
    splits = record.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(v, dict) and set(v) <= {"keep", "swap", "input_on_device"}
                                               for v in splits.values()):
        raise ValueError(f"{path}: splits must map unit names to {{\"keep\": fraction, \"swap\": fraction}} "
                         f"(the rest of the rows recomputed; \"input_on_device\": true keeps their input on the "
                         f"device), got {splits!r}")
    resident = record.get("resident", [])
    if not isinstance(resident, list) or not all(isinstance(n, str) for n in resident):
        raise ValueError(f"{path}: resident must be a list of unit names (e.g. [\"layers.0\"]), got {resident!r}")
    return Plan(default=ActivationPolicy(record.get("default", "recompute")),
                per_unit={k: ActivationPolicy(v) for k, v in per_unit.items()},
                splits={k: RowSplit(**v) for k, v in splits.items()},
                num_slots=record.get("num_slots", 2), loss_chunk_tokens=record.get("loss_chunk_tokens"),
                round_rows=record.get("round_rows", False), resident=tuple(resident))


def auto_plan(specs: list[UnitSpec], store: HostStore, *, device: torch.device, transfer: Transfer,
              batch_size: int, seq_len: int, budget_bytes: int,
              recompute_step_s: Callable[[], float] | None = None, compute_scale: float | None = None,
              cache_dir: str | os.PathLike | None = None, update_schedule: str = "none",
              accumulation: int = 1) -> tuple[Plan, Profile, Solution]:
    """Measure (or load from ``cache_dir``), calibrate, solve (the MIP; greedy if PuLP is not installed),
    spend the budget left on resident units (``residency.py``), and return the plan to execute.

    ``recompute_step_s()``: the measured seconds of one real step of the all-RECOMPUTE, 2-slot plan;
    when given, the profile's compute scale is fitted to it (``calibrate.py``), as ``horizon profile`` does.
    ``compute_scale``: a scale fitted before (at another batch shape), used as it is instead.
    ``cache_dir``: where measured profiles are kept per model shape and machine (``cache.py``); None = off.
    ``update_schedule``, ``accumulation``: how the run's optimizer meets its steps (``TrainConfig.update_schedule``,
    ``grad_accum_steps``), simulated."""
    from horizon.planner.calibrate import calibrate

    profile = _measured_profile(specs, store, device=device, transfer=transfer, batch_size=batch_size,
                                seq_len=seq_len, cache_dir=cache_dir)
    if compute_scale is not None:
        profile = dataclasses.replace(profile, compute_scale=compute_scale)
    elif recompute_step_s is not None:
        recompute = {u: ActivationPolicy.RECOMPUTE for u in profile.blocks}
        try:
            profile = calibrate(profile, [(recompute, 2, recompute_step_s())])
        except ValueError as e:  # a step far from its units' sum: plan from the units alone, and say so
            warnings.warn(f"plan='auto' could not calibrate the profile ({e}); planning from the uncalibrated "
                          "unit timings", stacklevel=3)
    try:
        import pulp  # noqa: F401
        solve = solve_mip
    except ImportError:
        from horizon.planner.greedy import solve_greedy as solve
    # Calibrated on steps timed with no update pending (above), the profile now meets the run's optimizer.
    profile = dataclasses.replace(profile, update_schedule=update_schedule, accumulation=accumulation)
    solution = add_resident(profile, solve(profile, budget_bytes), budget_bytes)
    log.info("plan='auto': %s", describe(solution, budget_bytes))
    return to_plan(profile, solution), profile, solution


def _kind(choice) -> str:
    if choice.keep == 1 or choice.swap == 1:
        return "KEEP" if choice.keep == 1 else "SWAP"
    if choice.recompute == 1:
        return "RECOMPUTE (input on the device)" if choice.input_on_device else "RECOMPUTE"
    return "split"


def describe(solution: Solution, budget_bytes: int) -> str:
    """One line: how many blocks take each policy, and the predicted step time and device peak."""
    counts = collections.Counter(_kind(c) for c in solution.choices.values())
    blocks = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    resident = f" and {len(solution.resident)} resident units" if solution.resident else ""
    return (f"{blocks} blocks, {solution.num_slots} slots{resident}; predicted {solution.step_s:.4g} s/step and "
            f"a device peak of {solution.peak_bytes:,} of {budget_bytes:,} bytes (solved in {solution.solve_s:.2f} s)")


def _measured_profile(specs: list[UnitSpec], store: HostStore, *, device: torch.device, transfer: Transfer,
                      batch_size: int, seq_len: int, cache_dir: str | os.PathLike | None) -> Profile:
    from horizon.planner import cache, measure

    identity = None
    if cache_dir is not None:
        identity = cache.profile_identity(specs, store, device=device, transfer=transfer, batch_size=batch_size,
                                          seq_len=seq_len, fractions=measure.FRACTIONS)
        cached = cache.load_cached(cache_dir, identity)
        if cached is not None:
            return cached
    profile = measure.measure_profile(specs, store, device=device, transfer=transfer, batch_size=batch_size,
                                      seq_len=seq_len)
    if identity is not None:
        cache.save_cached(cache_dir, identity, profile)
    return profile
