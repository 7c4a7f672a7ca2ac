"""The activation plan as a mixed-integer program, solved with PuLP (CBC bundled; HiGHS when present).

Why a MIP: per block, KEEP costs device bytes until backward, SWAP costs link time (and the
bytes in flight), RECOMPUTE costs a second forward; the link is shared with the weights and
gradients, so one block's choice changes what the others can hide. Variables: x[u, c] ∈ {0, 1},
one choice per block (KEEP, SWAP, RECOMPUTE, or a split of its batch rows between them at the
profile's fractions: ``choice.py``); τ_t ≥ 0, the length of position t of the
step. Every cost is a constant per choice, so fractions add columns, not nonlinearity. Constraints:

- [Constraint] one choice per block: Σ_c x[u, c] = 1;
- [Constraint] τ_t ≥ compute of position t (forward, recompute, backward, by policy);
- [Constraint] τ_t ≥ link time of the copies issued at t (weights ahead, restores, offloads, gradients);
  one row for a shared queue, one per direction on a duplex link (CUDA; the CPU's ``cpu_link_duplex``);
- [Constraint] every ledger row (the device bytes held after each hold, ``memory_rows``) ≤ budget;
- [Constraint] optional: host bytes of swapped activations and offloaded inputs ≤ the host budget.

Objective: min Σ_t τ_t (seconds, as ``model_step_s``); then, among plans no slower than the one
found, the least link time (a second solve with Σ τ capped, started from the first plan): when the link is hidden under compute
many plans tie, and moving bytes is never free in practice (host memory bandwidth; on CPU the copy
itself takes a core), so the tie goes to the plan that moves least. Bytes are in MiB and times in ms inside
the solver, so coefficients stay in a range CBC and HiGHS solve without tolerance trouble. The
slot count is enumerated outside the MIP (its index sets depend on it); the best is returned.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

from horizon.engine.plan import ActivationPolicy as P
from horizon.planner.choice import Choice, as_choice, choices, host_bytes_of
from horizon.planner.profile import Profile
from horizon.planner.schedule import Term
from horizon.planner.simulate import intervals, memory_rows, model_step_s, peak_bytes

__all__ = ["Solution", "PlanInfeasible", "solve_mip", "host_bytes", "POLICIES"]

POLICIES = (P.KEEP, P.SWAP, P.RECOMPUTE)
_MIB, _MS = 2.0 ** 20, 1e-3


class PlanInfeasible(ValueError):
    """No plan fits the budget; ``smallest_budget_bytes`` is the least device budget that would."""

    def __init__(self, budget_bytes: int, smallest_budget_bytes: int) -> None:
        self.budget_bytes, self.smallest_budget_bytes = budget_bytes, smallest_budget_bytes
        super().__init__(f"no activation plan fits device_memory_budget_bytes={budget_bytes:,}: the smallest "
                         f"budget that works for this model and batch is {smallest_budget_bytes:,} bytes "
                         f"({smallest_budget_bytes / 2**20:.1f} MiB); raise the budget or shrink the batch")


@dataclasses.dataclass(frozen=True)
class Solution:
    choices: dict[int, Choice]
    """The rows each block keeps, swaps and recomputes (a ``RowSplit``), by unit index."""
    num_slots: int
    step_s: float
    """The model's step time (``model_step_s``) for this plan."""
    peak_bytes: int
    """The predicted device ledger peak."""
    optimal: bool
    """False when a time limit stopped the solver with a feasible plan."""
    solve_s: float
    resident: tuple[int, ...] = ()
    """Units with a device buffer of their own (``residency.add_resident``; the solvers leave it empty)."""



def solution(profile: Profile, chosen: dict[int, Choice], num_slots: int, optimal: bool) -> Solution:
    """A ``Solution`` for these choices, with its model step time and peak (``solve_s`` left 0)."""
    return Solution(dict(chosen), num_slots, model_step_s(profile, chosen, num_slots),
                    peak_bytes(profile, chosen, num_slots), optimal, 0.0)


def host_bytes(profile: Profile, policies: dict[int, P | Choice]) -> int:
    """Host staging the plan needs for activations (swapped bytes and the inputs of recomputed rows)."""
    return sum(host_bytes_of(profile, u, as_choice(p)) for u, p in policies.items())


def _check_options(budget_bytes: int, host_budget_bytes: int | None, num_slots: tuple[int, ...]) -> None:
    """The checks both solvers make of their arguments, before any work."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"device memory budget must be a positive int of bytes, got {budget_bytes!r}")
    if host_budget_bytes is not None and (not isinstance(host_budget_bytes, int) or host_budget_bytes < 0):
        raise ValueError(f"host_budget_bytes must be a non-negative int of bytes or None, got {host_budget_bytes!r}")
    if not num_slots or any(s < 2 for s in num_slots):
        raise ValueError(f"num_slots options must be integers >= 2, got {num_slots!r}")


def _solver(time_limit_s: float, gap: float, *, warm_start: bool = False):
    import pulp

    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        highs = _warm_highs() if warm_start else pulp.HiGHS
        return highs(msg=False, timeLimit=time_limit_s, gapRel=gap, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap, threads=1, warmStart=warm_start)


def _warm_highs():
    """``pulp.HiGHS`` that starts from the variables' current values. PuLP's highspy interface ignores
    ``warmStart`` (only HiGHS_CMD reads it): without this, the 80-block tie-break solve started cold and
    spent its whole time limit without finding a plan."""
    import numpy as np
    import pulp

    class WarmHiGHS(pulp.HiGHS):
        def callSolver(self, lp):
            columns = lp.variables()  # in the order buildSolverModel added them (their ``index``)
            lp.solverModel.setSolution(len(columns), np.arange(len(columns), dtype=np.int32),
                                       np.array([v.varValue or 0.0 for v in columns], dtype=np.float64))
            super().callSolver(lp)

    return WarmHiGHS


def _build(profile: Profile, num_slots: int, budget_bytes: int | None, host_budget_bytes: int | None):
    """The model for one slot count; ``budget_bytes=None`` builds the min-peak variant instead."""
    with warnings.catch_warnings():  # PuLP 3.3 announces its 4.0 API on every variable
        warnings.simplefilter("ignore", DeprecationWarning)
        return _build_model(profile, num_slots, budget_bytes, host_budget_bytes)


class _Expressions:
    """Terms as linear expressions over the 0/1 variables ``x[(unit, choice)]``, kept sparse.

    A block's part of a term is a vector over its choices (its kept bytes, say), and the same
    vector recurs in every ledger row while the block's activations are held. Each distinct
    vector becomes one continuous variable, defined once (``y = Σ_c v_c · x[u, c]``), so a row has
    one entry per block instead of one per choice: with 15 choices HiGHS solves 80 blocks several
    times faster. Expressions are built from coefficient dicts in one step: summing PuLP
    expressions term by term copies them, which is quadratic in the terms."""

    def __init__(self, m, x, profile: Profile) -> None:
        self.m, self.x, self.options = m, x, choices(profile)
        self._defined: dict[tuple, object] = {}

    def __call__(self, term: Term, unit_scale: float):
        """``term / unit_scale``; a number if no choice moves it."""
        import pulp

        const, by_unit = 0.0, {}
        for c, unit, choice in term:
            if unit is None:
                const += c
            else:
                vector = by_unit.setdefault(unit, {})
                vector[choice] = vector.get(choice, 0.0) + c
        coefs = {}
        for unit, vector in by_unit.items():
            var, coef = self._variable(unit, vector, unit_scale)
            coefs[var] = coefs.get(var, 0.0) + coef
        if not coefs:
            return const / unit_scale
        return pulp.LpAffineExpression(list(coefs.items()), constant=const / unit_scale)

    def _variable(self, unit: int, vector: dict, unit_scale: float):
        """(variable, coefficient) standing for ``Σ_c vector[c] · x[unit, c] / unit_scale``.

        Vectors equal up to a factor share one variable (a block's moved bytes are link time in one
        row and, through ``copy_compute_s_per_byte``, compute in another)."""
        import pulp

        nonzero = [(c, a) for c, a in vector.items() if a]
        if len(nonzero) == 1:
            return self.x[(unit, nonzero[0][0])], nonzero[0][1] / unit_scale
        scale = max(abs(a) for _, a in nonzero)
        key = (unit, tuple(round(vector.get(c, 0.0) / scale, 12) for c in self.options))
        if key not in self._defined:
            y = self._defined[key] = pulp.LpVariable(f"y_{unit}_{len(self._defined)}")
            self.m += y == pulp.LpAffineExpression([(self.x[(unit, c)], a / scale) for c, a in nonzero])
        return self._defined[key], scale / unit_scale


def _build_model(profile: Profile, num_slots: int, budget_bytes: int | None, host_budget_bytes: int | None):
    import pulp

    m = pulp.LpProblem(f"plan_S{num_slots}", pulp.LpMinimize)
    options = choices(profile)
    x = {(u, c): pulp.LpVariable(f"x_{u}_{i}", cat=pulp.LpBinary)
         for u in profile.blocks for i, c in enumerate(options)}
    expr = _Expressions(m, x, profile)
    for u in profile.blocks:
        m += pulp.lpSum(x[(u, c)] for c in options) == 1
    rows = [expr(row, _MIB) for row in memory_rows(profile, num_slots)]
    if budget_bytes is None:
        peak = pulp.LpVariable("peak_mib", 0)
        for row in rows:
            m += peak >= row
        m += peak
        return m, x, None
    for row in rows:
        if isinstance(row, (int, float)):  # a row no policy changes (slots, gradients)
            if row > budget_bytes / _MIB:
                return None, x, None
            continue
        m += row <= budget_bytes / _MIB
    if host_budget_bytes is not None:
        m += pulp.lpSum(x[(u, c)] * host_bytes_of(profile, u, c) / _MIB for u in profile.blocks for c in options) \
            <= host_budget_bytes / _MIB
    bw_ms = profile.link_bytes_per_s * _MS
    taus, link = [], []
    for t, iv in enumerate(intervals(profile, num_slots)):
        tau = pulp.LpVariable(f"tau_{t}", 0)
        taus.append(tau)
        m += tau >= expr(iv.compute, _MS)
        h2d, d2h = expr(iv.h2d, bw_ms), expr(iv.d2h, bw_ms)
        link += [h2d, d2h]
        if profile.duplex:
            m += tau >= h2d
            m += tau >= d2h
        else:
            m += tau >= h2d + d2h
    step_ms = pulp.lpSum(taus)
    m += step_ms
    return m, x, (step_ms, pulp.lpSum(link))


def _policies(x, profile: Profile) -> dict[int, Choice]:
    return {u: max(choices(profile), key=lambda c: x[(u, c)].value() or 0.0) for u in profile.blocks}


_TIGHTEN_TRIES = 3
"""Solves per slot count when the rounded plan lands over the budget by the solver's tolerance."""

_TIE_BREAK_S = 0.5
"""Time limit of the second solve: a tie-break, so its best plan so far is good enough."""


def _least_link(m, x, objective, profile: Profile, num_slots: int, gap: float) -> dict[int, Choice]:
    """Second solve: the plan with the least link time among those no slower than the one ``m`` holds.

    Warm-started from that plan; if the time-limited solve ends without one, the first plan stands."""
    import pulp

    first = _policies(x, profile)
    step_ms, link_ms = objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m += step_ms <= step_ms.value() * (1 + 1e-9) + 1e-6, "no_slower"
        m.setObjective(link_ms)
        m.solve(_solver(_TIE_BREAK_S, gap, warm_start=True))
    if m.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return first
    second = _policies(x, profile)
    # Within the solver's tolerance "no slower" may admit a hair slower: then the first plan stands.
    return second if model_step_s(profile, second, num_slots) <= model_step_s(profile, first, num_slots) else first


def smallest_budget_bytes(profile: Profile, num_slots: int, *, time_limit_s: float = 30.0) -> int:
    """The least device peak any plan reaches at this slot count (a MIP on the ledger rows alone)."""
    m, x, _ = _build(profile, num_slots, None, None)
    m.solve(_solver(time_limit_s, 0.0))
    return peak_bytes(profile, _policies(x, profile), num_slots)


def solve_mip(profile: Profile, budget_bytes: int, *, num_slots: tuple[int, ...] = (2, 3),
              host_budget_bytes: int | None = None, time_limit_s: float = 30.0, gap: float = 1e-4) -> Solution:
    """The plan with the least model step time whose device peak fits ``budget_bytes``."""
    import pulp

    _check_options(budget_bytes, host_budget_bytes, num_slots)
    start, best = time.perf_counter(), None
    for slots in num_slots:
        candidate, target = None, budget_bytes
        for _ in range(_TIGHTEN_TRIES):
            m, x, objective = _build(profile, slots, target, host_budget_bytes)
            if m is None:
                break
            m.solve(_solver(time_limit_s, gap))
            if m.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
                break
            optimal = m.sol_status == pulp.LpSolutionOptimal
            candidate = solution(profile, _least_link(m, x, objective, profile, slots, gap), slots, optimal)
            if candidate.peak_bytes <= budget_bytes:
                break
            # Within its integrality tolerance the solver may pass a plan a few bytes over: ask again, tighter.
            target, candidate = target - (candidate.peak_bytes - budget_bytes), None
        if candidate is None:
            continue
        if best is None or candidate.step_s < best.step_s:
            best = candidate
    if best is None:
        smallest = min(smallest_budget_bytes(profile, s) for s in num_slots)
        if smallest <= budget_bytes:
            raise ValueError(f"host_budget_bytes={host_budget_bytes:,} cannot hold the activations any plan "
                             f"within the device budget must move to the host; raise it")
        raise PlanInfeasible(budget_bytes, smallest)
    return dataclasses.replace(best, solve_s=time.perf_counter() - start)
