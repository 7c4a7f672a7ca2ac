"""The planner's pieces against brute force, formulas and the engine's own ledger."""

import dataclasses
import itertools
import random

import numpy as np
import pytest

import horizon
from horizon.planner import (PlanInfeasible, Profile, UnitCost, UnitRole, model_step_s, peak_bytes, simulate,
                             solve_greedy, solve_mip)
from horizon.engine.plan import RowSplit
from horizon.planner.choice import DEVICE_INPUT_RECOMPUTE, Choice, choices
from horizon.planner.mip import POLICIES
from horizon.planner.simulate import chooser, intervals, memory_rows

P = horizon.ActivationPolicy


def synthetic(rng: random.Random, num_blocks: int, *, duplex=False, link=None, compute=True,
              fractions=(), copy_compute_s_per_byte=0.0, split_s=0.0) -> Profile:
    hidden = rng.randint(1, 8) * 4096
    t = (lambda lo, hi: rng.uniform(lo, hi)) if compute else (lambda lo, hi: 0.0)

    def block(i):
        fwd = t(1e-3, 5e-3)
        keep = hidden * rng.randint(2, 12)
        fixed = 1024 * rng.randint(0, 4)  # saved tensors that are not per row (a rotary table, say)
        keep_at = tuple(fixed + round(f * (keep - fixed)) for f in fractions)
        fwd_grad, bwd = fwd * rng.uniform(1.0, 1.3), fwd * rng.uniform(1.5, 2.5)
        part = lambda s: tuple(s * f * rng.uniform(1.0, 1.3) for f in fractions)  # noqa: E731  (small parts: slower per row)
        return UnitCost(name=f"layers.{i}", role=UnitRole.BLOCK, weight_bytes=rng.randint(1, 8) * 65536,
                        grad_bytes=rng.randint(1, 8) * 65536, fwd_s=fwd, fwd_grad_s=fwd_grad, bwd_s=bwd,
                        fwd_s_at=part(fwd), fwd_grad_s_at=part(fwd_grad), bwd_s_at=part(bwd),
                        keep_bytes=keep, swap_bytes=keep + 64 * rng.randint(0, 4),
                        keep_bytes_at=keep_at, swap_bytes_at=tuple(b + 64 * rng.randint(0, 4) for b in keep_at),
                        split_fwd_s=split_s, split_bwd_s=2 * split_s)

    units = [UnitCost(name="embed", role=UnitRole.EMBEDDING, weight_bytes=65536, grad_bytes=65536,
                      fwd_s=t(1e-4, 1e-3), bwd_s=t(1e-4, 1e-3))]
    units += [block(i) for i in range(num_blocks)]
    units.append(UnitCost(name="head", role=UnitRole.HEAD, weight_bytes=131072, grad_bytes=65536,
                          borrowed_grad_bytes=((0, 65536),), fwd_s=t(1e-3, 4e-3)))
    return Profile(units=tuple(units), hidden_bytes=hidden, slot_bytes=8 * 65536 + 131072,
                   link_bytes_per_s=link or rng.uniform(0.2e9, 2e9), duplex=duplex, fractions=tuple(fractions),
                   copy_compute_s_per_byte=copy_compute_s_per_byte)


def _every_plan(profile, terms):
    """``terms`` evaluated for every plan at once: [plans, terms], plans in itertools.product order."""
    options = choices(profile)
    combos = np.array(list(itertools.product(range(len(options)), repeat=len(profile.blocks))))
    out = np.zeros((len(combos), len(terms)))
    for j, term in enumerate(terms):
        for c, unit, choice in term:
            out[:, j] += c if unit is None else c * (combos[:, unit - 1] == options.index(choice))
    return out, [dict(zip(profile.blocks, (options[i] for i in row))) for row in combos]


def brute_force(profile, budget, slot_options=(2, 3)):
    """(least model step time, least peak) over every plan (every choice of every block) and slot count,
    evaluating the model's own definition (``model_step_s``, ``peak_bytes``) for all plans at once."""
    best, least_peak, bw = np.inf, np.inf, profile.link_bytes_per_s
    for slots in slot_options:
        peaks = _every_plan(profile, memory_rows(profile, slots))[0].max(axis=1)
        ivs = intervals(profile, slots)
        compute, h2d, d2h = (_every_plan(profile, [getattr(iv, f) for iv in ivs])[0] for f in ("compute", "h2d", "d2h"))
        link = np.maximum(h2d, d2h) / bw if profile.duplex else (h2d + d2h) / bw
        steps = np.maximum(compute, link).sum(axis=1)
        least_peak = min(least_peak, int(round(peaks.min())))
        fits = np.round(peaks) <= budget
        if fits.any():
            best = min(best, steps[fits].min())
    return (None if best == np.inf else best), least_peak


def _budget_between(rng, profile):
    low = peak_bytes(profile, {u: P.RECOMPUTE for u in profile.blocks}, 2)
    high = peak_bytes(profile, {u: P.KEEP for u in profile.blocks}, 3)
    return int(low + rng.random() * (high - low))


FRACTION_LEVELS = [(), (0.5,), (0.25, 0.5, 0.75)]


@pytest.mark.parametrize("seed", range(120))
def test_mip_equals_brute_force_and_greedy_is_never_better(seed):
    rng = random.Random(seed)
    fractions = FRACTION_LEVELS[seed % 3]
    # every fifth instance: copies slow the compute beside them (up to ~1 ms per MB, as on a CPU device)
    copy_cost = random.Random(-seed).uniform(0, 1e-9) if seed % 5 == 1 else 0.0
    split_s = random.Random(-seed).uniform(0, 5e-4) if seed % 2 else 0.0  # a split's own copies and sums
    profile = synthetic(rng, rng.randint(2, 4 if len(fractions) < 3 else 3), duplex=seed % 4 == 0, fractions=fractions,
                        copy_compute_s_per_byte=copy_cost, split_s=split_s)
    budget = _budget_between(rng, profile)
    want, _ = brute_force(profile, budget)
    mip = solve_mip(profile, budget, gap=0.0)
    assert mip.optimal and mip.step_s == pytest.approx(want, rel=1e-6)
    assert mip.peak_bytes <= budget
    assert simulate(profile, mip.choices, mip.num_slots).peak_bytes == mip.peak_bytes
    greedy = solve_greedy(profile, budget)
    assert greedy.peak_bytes <= budget and greedy.step_s >= mip.step_s * (1 - 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_more_memory_never_makes_the_optimum_worse(seed):
    rng = random.Random(100 + seed)
    profile = synthetic(rng, 4)
    low = peak_bytes(profile, {u: P.RECOMPUTE for u in profile.blocks}, 2)
    high = peak_bytes(profile, {u: P.KEEP for u in profile.blocks}, 3)
    steps = [solve_mip(profile, int(low + f * (high - low)), gap=0.0).step_s for f in (0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a >= b * (1 - 1e-9) for a, b in zip(steps, steps[1:]))
    assert steps[-1] == pytest.approx(min(model_step_s(profile, {u: P.KEEP for u in profile.blocks}, s)
                                          for s in (2, 3)), rel=1e-6)


def test_infeasible_budget_names_the_smallest_budget_that_works():
    profile = synthetic(random.Random(7), 3)
    _, least = brute_force(profile, float("inf"))
    with pytest.raises(PlanInfeasible) as info:
        solve_mip(profile, least - 1)
    assert info.value.smallest_budget_bytes == least
    assert f"{least:,}" in str(info.value)
    assert solve_mip(profile, least).peak_bytes == least


@pytest.mark.parametrize("budget", [0, -5, 1.5e6, True, "1GB"])
@pytest.mark.parametrize("solve", [solve_mip, solve_greedy])
def test_bad_budgets_are_value_errors(budget, solve):
    with pytest.raises(ValueError, match="budget"):
        solve(synthetic(random.Random(0), 2), budget)


def test_simulator_matches_formulas_at_the_extremes():
    rng = random.Random(3)
    fast_link = synthetic(rng, 5, link=1e18)
    for combo in [(P.KEEP,) * 5, (P.RECOMPUTE,) * 5, (P.SWAP, P.KEEP, P.RECOMPUTE, P.SWAP, P.KEEP)]:
        policies = dict(zip(fast_link.blocks, combo))
        compute = sum(u.fwd_s + u.bwd_s for u in (fast_link.units[0], fast_link.units[-1]))
        for u, p in policies.items():
            c = fast_link.units[u]
            compute += {P.KEEP: c.fwd_grad_s + c.bwd_s, P.SWAP: c.fwd_grad_s + c.bwd_s,
                        P.RECOMPUTE: c.fwd_s + c.fwd_grad_s + c.bwd_s}[p]
        assert simulate(fast_link, policies, 2).step_s == pytest.approx(compute, rel=1e-9)
    no_compute = synthetic(rng, 4, compute=False, link=1e9)
    policies = dict(zip(no_compute.blocks, (P.SWAP, P.RECOMPUTE, P.KEEP, P.SWAP)))
    sim = simulate(no_compute, policies, 2)
    assert sim.step_s == pytest.approx(sim.link_busy_s, rel=1e-9)  # a link-bound step: the queue never idles
    moved = 2 * sum(no_compute.units[u].swap_bytes for u in (1, 4)) + 2 * no_compute.hidden_bytes
    weights = sum(u.weight_bytes for u in no_compute.units) * 2 - no_compute.units[-1].weight_bytes \
        - no_compute.units[-2].weight_bytes  # the last block stays in its slot across the head
    grads = sum(u.grad_bytes for u in no_compute.units)
    assert sim.link_busy_s == pytest.approx((moved + weights + grads) / 1e9, rel=1e-9)


def test_each_part_of_a_split_after_the_first_costs_the_engines_copies_and_sums():
    from horizon.planner.choice import backward_s, forward_s

    plain = synthetic(random.Random(5), 2, fractions=(0.25, 0.5, 0.75))
    costly = synthetic(random.Random(5), 2, fractions=(0.25, 0.5, 0.75), split_s=1e-3)
    for c, extra in [(RowSplit.of(P.KEEP), 0), (RowSplit.of(P.RECOMPUTE), 0), (RowSplit(keep=0.5), 1),
                     (RowSplit(keep=0.25, swap=0.75), 1), (RowSplit(keep=0.25, swap=0.25), 2)]:
        assert forward_s(costly, 1, c) == pytest.approx(forward_s(plain, 1, c) + extra * 1e-3, rel=1e-12)
        assert backward_s(costly, 1, c) == pytest.approx(backward_s(plain, 1, c) + extra * 2e-3, rel=1e-12)


def test_a_copy_costs_the_compute_its_bytes_times_the_profiles_rate_outside_the_compute_scale():
    free = synthetic(random.Random(4), 4, link=1e18)
    policies = dict(zip(free.blocks, (P.SWAP, P.RECOMPUTE, P.KEEP, P.SWAP)))
    copied_bytes = simulate(free, policies, 2).link_busy_s * free.link_bytes_per_s
    for scale in (1.0, 2.0):
        plain = dataclasses.replace(free, compute_scale=scale)
        costly = dataclasses.replace(plain, copy_compute_s_per_byte=1e-9)
        want = simulate(plain, policies, 2).step_s + 1e-9 * copied_bytes
        assert simulate(costly, policies, 2).step_s == pytest.approx(want, rel=1e-9)
        assert simulate(costly, policies, 2).compute_s == pytest.approx(want, rel=1e-9)
        assert model_step_s(costly, policies, 2) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="copy_compute_s_per_byte"):
        dataclasses.replace(free, copy_compute_s_per_byte=-1.0)


def test_profile_round_trips_through_a_dict():
    profile = synthetic(random.Random(1), 3)
    assert Profile.from_dict(profile.to_dict()) == profile


def _link_s(profile, policies, slots):
    from horizon.planner.schedule import value
    from horizon.planner.simulate import intervals

    choose = chooser(policies)
    return sum(value(iv.h2d, choose) + value(iv.d2h, choose) for iv in intervals(profile, slots)) / profile.link_bytes_per_s


@pytest.mark.parametrize("seed", range(12))
def test_ties_go_to_the_plan_that_moves_the_fewest_bytes(seed):
    rng = random.Random(500 + seed)
    # A fast link hides every copy under compute, so KEEP and SWAP tie on step time wherever both fit.
    profile = synthetic(rng, 3, link=rng.uniform(50e9, 200e9))
    budget = _budget_between(rng, profile)
    mip = solve_mip(profile, budget, num_slots=(2,), gap=0.0)
    whole = [RowSplit.of(p) for p in POLICIES] + [DEVICE_INPUT_RECOMPUTE]
    plans = [dict(zip(profile.blocks, c)) for c in itertools.product(whole, repeat=3)]
    fitting = [p for p in plans if peak_bytes(profile, p, 2) <= budget]
    fastest = min(model_step_s(profile, p, 2) for p in fitting)
    least_link = min(_link_s(profile, p, 2) for p in fitting if model_step_s(profile, p, 2) <= fastest * (1 + 1e-9))
    assert mip.step_s == pytest.approx(fastest, rel=1e-9)
    assert _link_s(profile, mip.choices, 2) == pytest.approx(least_link, rel=1e-6)


def _without_fractions(profile):
    return dataclasses.replace(profile, fractions=(), units=tuple(
        dataclasses.replace(u, keep_bytes_at=(), swap_bytes_at=(), fwd_s_at=(), fwd_grad_s_at=(), bwd_s_at=())
        for u in profile.units))


@pytest.mark.parametrize("seed", range(6))
def test_fractions_never_make_the_optimum_worse(seed):
    rng = random.Random(900 + seed)
    profile = synthetic(rng, 4, fractions=(0.25, 0.5, 0.75))
    budget = _budget_between(rng, profile)
    with_fractions = solve_mip(profile, budget, gap=0.0)
    assert with_fractions.step_s <= solve_mip(_without_fractions(profile), budget, gap=0.0).step_s * (1 + 1e-9)
    assert with_fractions.peak_bytes <= budget


def test_a_budget_for_half_the_rows_keeps_half_the_rows():
    """One block, a budget that fits KEEP of half its rows and not all, a link too slow to swap: KEEP half
    the rows (and recompute the other half, which moves half the input) beats every whole policy, RECOMPUTE
    with its input left on the device included (it fits, and is slower here)."""
    profile = synthetic(random.Random(50), 1, fractions=(0.5,), link=1e8)
    half = {1: Choice(keep=0.5)}
    budget = peak_bytes(profile, half, 2)
    assert peak_bytes(profile, {1: P.KEEP}, 2) > budget
    mip = solve_mip(profile, budget, num_slots=(2,), gap=0.0)
    assert mip.choices == half
    assert peak_bytes(profile, {1: DEVICE_INPUT_RECOMPUTE}, 2) <= budget
    assert mip.step_s < solve_mip(_without_fractions(profile), budget, num_slots=(2,), gap=0.0).step_s
    assert solve_greedy(profile, budget, num_slots=(2,)).choices == half


def test_the_tie_break_solve_starts_from_the_first_solves_plan():
    """PuLP's highspy interface drops ``warmStart``; cold, the second solve of an 80-block model found no
    plan within its time limit, so the least-link tie-break silently never ran at that size."""
    import pulp

    from horizon.planner import mip

    rng = random.Random(11)
    one = synthetic(rng, 1, fractions=(0.25, 0.5, 0.75), duplex=True, link=0.5e9)
    block = one.units[1]
    profile = dataclasses.replace(one, units=(one.units[0], *(dataclasses.replace(block, name=f"layers.{i}")
                                                              for i in range(80)), one.units[-1]))
    m, x, (step_ms, link_ms) = mip._build(profile, 2, _budget_between(random.Random(0), profile), None)
    m.solve(mip._solver(30.0, 1e-3))
    first_step_ms = step_ms.value()
    m += step_ms <= first_step_ms * (1 + 1e-9) + 1e-6
    m.setObjective(link_ms)
    m.solve(mip._solver(0.05, 1e-3, warm_start=True))
    assert m.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    assert step_ms.value() <= first_step_ms * (1 + 1e-6)
