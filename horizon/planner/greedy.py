"""A greedy planner with the MIP's signature: the fallback when PuLP is missing, and a cross-check.

Why: a MIP solver is an optional dependency at heart and can time out; a greedy plan is always
there. Start with every block KEEP (the fastest plan); while the device peak is over budget,
make the single move of one block to another choice (a split of its rows between KEEP, SWAP and RECOMPUTE) that frees the
most peak bytes per second it adds to the model step time (LoHan/Capuchin's bytes-per-second
ranking). Every move lowers the peak, so it ends. Peaks
and times are evaluated incrementally on the same ledger rows and intervals as the MIP, as
matrices, so a move costs one pass over the rows.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from horizon.engine.plan import ActivationPolicy as P
from horizon.planner.choice import Choice, as_choice, choices
from horizon.planner.mip import PlanInfeasible, Solution, _check_options, host_bytes, solution
from horizon.planner.profile import Profile
from horizon.planner.schedule import Term
from horizon.planner.simulate import intervals, memory_rows, peak_bytes

__all__ = ["solve_greedy"]

class _Linear:
    """Terms as ``const + coef @ x`` over one 0/1 column per (block, choice)."""

    def __init__(self, terms: list[Term], profile: Profile) -> None:
        self.column = {(u, c): j for j, (u, c) in enumerate((u, c) for u in profile.blocks for c in choices(profile))}
        self.const = np.zeros(len(terms))
        self.coef = np.zeros((len(terms), len(self.column)))
        for i, term in enumerate(terms):
            for c, unit, policy in term:
                if unit is None:
                    self.const[i] += c
                else:
                    self.coef[i, self.column[(unit, policy)]] += c

    def at(self, policies: dict[int, Choice]) -> np.ndarray:
        return self.const + self.coef[:, [self.column[(u, p)] for u, p in policies.items()]].sum(axis=1)

    def delta(self, unit: int, old: Choice, new: Choice) -> np.ndarray:
        return self.coef[:, self.column[(unit, new)]] - self.coef[:, self.column[(unit, old)]]


class _Evaluator:
    def __init__(self, profile: Profile, num_slots: int) -> None:
        self.memory = _Linear(memory_rows(profile, num_slots), profile)
        ivs = intervals(profile, num_slots)
        self.compute = _Linear([iv.compute for iv in ivs], profile)
        self.h2d = _Linear([iv.h2d for iv in ivs], profile)
        self.d2h = _Linear([iv.d2h for iv in ivs], profile)
        self.duplex, self.bw = profile.duplex, profile.link_bytes_per_s

    def step_s(self, compute: np.ndarray, h2d: np.ndarray, d2h: np.ndarray) -> float:
        link = np.maximum(h2d, d2h) if self.duplex else h2d + d2h
        return float(np.maximum(compute, link / self.bw).sum())


def _greedy(profile: Profile, budget_bytes: int, num_slots: int,
            host_budget_bytes: int | None) -> dict[int, Choice] | None:
    ev = _Evaluator(profile, num_slots)
    options = choices(profile)
    policies = {u: as_choice(P.KEEP) for u in profile.blocks}
    rows, comp, h2d, d2h = (lin.at(policies) for lin in (ev.memory, ev.compute, ev.h2d, ev.d2h))
    while rows.max() > budget_bytes:
        base_peak, base_s, best = rows.max(), ev.step_s(comp, h2d, d2h), None
        for u in profile.blocks:
            old = policies[u]
            for new in options:
                if new == old:
                    continue
                trial = [v + lin.delta(u, old, new) for v, lin in ((rows, ev.memory), (comp, ev.compute),
                                                                   (h2d, ev.h2d), (d2h, ev.d2h))]
                freed = base_peak - trial[0].max()
                if freed <= 0:
                    continue
                score = freed / (max(ev.step_s(*trial[1:]) - base_s, 0.0) + 1e-12)
                if best is None or score > best[0]:
                    best = (score, u, new, trial)
        if best is None:
            return None
        _, u, new, (rows, comp, h2d, d2h) = best
        policies[u] = new
    if host_budget_bytes is not None and host_bytes(profile, policies) > host_budget_bytes:
        return None
    return policies


def solve_greedy(profile: Profile, budget_bytes: int, *, num_slots: tuple[int, ...] = (2, 3),
                 host_budget_bytes: int | None = None, time_limit_s: float = 30.0, gap: float = 1e-4) -> Solution:
    """Same signature and result as ``solve_mip`` (``time_limit_s`` and ``gap`` are unused)."""
    _check_options(budget_bytes, host_budget_bytes, num_slots)
    start, best = time.perf_counter(), None
    for slots in num_slots:
        policies = _greedy(profile, budget_bytes, slots, host_budget_bytes)
        if policies is None:
            continue
        candidate = solution(profile, policies, slots, False)
        if best is None or candidate.step_s < best.step_s:
            best = candidate
    if best is None:
        all_recompute = {u: P.RECOMPUTE for u in profile.blocks}
        raise PlanInfeasible(budget_bytes, min(peak_bytes(profile, all_recompute, s) for s in num_slots))
    return dataclasses.replace(best, solve_s=time.perf_counter() - start)
