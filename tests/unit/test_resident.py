"""Resident units (``Plan.resident``): a device buffer of their own, loaded once a step. Training is bit
for bit the same, the weights cross the link less by exactly the reloads saved, the ledger is the
simulator's, and the planner spends device memory a plan leaves over on them where the link is slow."""

import copy
import dataclasses
import random

import pytest
import torch

import horizon
from helpers import batches, horizon_run, tiny_decoder
from horizon.engine.slots import assign_slots
from horizon.engine.transfer import CpuTransfer
from horizon.planner import simulate, solve_greedy, solve_mip
from horizon.planner.apply import load_plan, save_plan, to_plan
from horizon.planner.choice import choices
from horizon.planner.residency import add_resident, reloaded_units
from horizon.planner.simulate import model_step_s
from test_planner import _budget_between, synthetic
from test_planner_engine import BATCH, SEQ, model_and_profile  # noqa: F401  (the fixture: a measured tiny decoder)

P = horizon.ActivationPolicy
NAMES = ["embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3", "lm_head"]


def _chain(num_units):
    return list(range(num_units)) + list(range(num_units - 2, -1, -1))


@pytest.mark.parametrize("num_slots", [2, 3])
@pytest.mark.parametrize("resident_units", [[0], [2], [0, 3, 5], [4], list(range(6))])
def test_a_resident_unit_is_loaded_once_into_its_own_slot(num_slots, resident_units):
    order = _chain(6)
    resident = {u: num_slots + i for i, u in enumerate(resident_units)}
    uses = assign_slots(order, num_slots, resident)
    holder = {}
    for j, (unit, use) in enumerate(zip(order, uses)):
        if unit in resident:
            assert use.slot == resident[unit] and use.load == (order.index(unit) == j)
            continue
        assert use.slot < num_slots
        if use.load:  # never into a shared slot that a position of the prefetch window uses
            assert use.slot not in {uses[k].slot for k in range(max(0, j - num_slots + 1), j)}
            holder[use.slot] = unit
        else:
            assert holder[use.slot] == unit
    base = assign_slots(order, num_slots)
    saved = sum(use.load for unit, use in zip(order, base) if unit in resident) - len(resident)
    assert sum(use.load for use in uses) <= sum(use.load for use in base) - saved


class _CountingTransfer(CpuTransfer):
    """Bytes copied to the device, all of them (weights, and restores when the plan has any)."""

    def __init__(self) -> None:
        super().__init__()
        self.h2d_bytes = 0

    def h2d(self, dsts, srcs, after=()):
        self.h2d_bytes += sum(s.numel() * s.element_size() for s in srcs)
        return super().h2d(dsts, srcs, after)


def _unit_bytes(model):
    """fp32 bytes of each unit of an untied decoder: embedding, blocks, head (final norm and lm_head)."""
    sizes = [sum(p.numel() for p in unit.parameters()) * 4 for unit in (model.embed_tokens, *model.layers)]
    return sizes + [sum(p.numel() for p in model.parameters()) * 4 - sum(sizes)]


def _load_bytes(model, num_slots, resident_units):
    """Weight bytes one step copies in, from ``assign_slots`` and the units' sizes."""
    sizes = _unit_bytes(model)
    order = _chain(len(sizes))
    uses = assign_slots(order, num_slots, {u: num_slots + i for i, u in enumerate(resident_units)})
    return sum(sizes[u] for u, use in zip(order, uses) if use.load)


PLANS = {
    "keep": dict(default=P.KEEP),
    "recompute": dict(default=P.RECOMPUTE),
    "mixed": dict(per_unit={"layers.0": P.SWAP, "layers.1": P.KEEP},
                  splits={"layers.2": horizon.RowSplit(keep=0.5)}, num_slots=3),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("resident", [("embed_tokens",), ("layers.1", "layers.3"), tuple(NAMES)])
def test_resident_units_train_bit_for_bit_as_streamed_ones(plan, resident):
    model = tiny_decoder(num_layers=4)
    data = batches(3, batch=BATCH, seq=SEQ)
    config = lambda **kw: horizon.TrainConfig(plan=horizon.Plan(**PLANS[plan], **kw), grad_clip_norm=1.0)  # noqa: E731
    with horizon.Trainer(copy.deepcopy(model), config()) as t:
        losses = [t.step(b).loss for b in data]
        state, evaluated = t.state_dict(), t.evaluate(data[:1]).loss
    counting = _CountingTransfer()
    with horizon.Trainer(copy.deepcopy(model), config(resident=resident), transfer=counting) as t:
        assert [t.step(b).loss for b in data] == losses
        assert all(torch.equal(v, state[k]) for k, v in t.state_dict().items())
        assert t.evaluate(data[:1]).loss == evaluated
        memory = t.memory()
    assert memory.resident_bytes == sum(b for b, name in zip(_unit_bytes(model), NAMES) if name in resident)
    if plan == "keep":  # no restores: every byte in is a weight load (3 steps, then one evaluation: every unit once)
        steps = 3 * _load_bytes(model, 2, [u for u, n in enumerate(NAMES) if n in resident])
        evaluation = sum(p.numel() for p in model.parameters()) * 4
        assert counting.h2d_bytes == steps + evaluation


def test_bad_resident_names_are_value_errors(tmp_path):
    model = tiny_decoder(num_layers=2)
    with pytest.raises(ValueError, match="does not have.*layers.7"):
        horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(plan=horizon.Plan(resident=("layers.7",))))
    with pytest.raises(ValueError, match="twice"):
        horizon.Plan(resident=("layers.0", "layers.0"))
    with pytest.raises(ValueError, match="tuple of unit names"):
        horizon.Plan(resident=["layers.0"])
    path = tmp_path / "plan.json"
    path.write_text('{"format": "horizon-plan/1", "resident": "layers.0"}')
    with pytest.raises(ValueError, match="resident must be a list"):
        load_plan(path)


@pytest.mark.parametrize("seed", range(6))
def test_the_ledger_with_resident_units_is_the_simulators(model_and_profile, seed):
    model, profile = model_and_profile
    rng = random.Random(seed)
    policies = {u: rng.choice(choices(profile)) for u in profile.blocks}
    slots = rng.choice([2, 3])
    resident = sorted(rng.sample(range(len(profile.units)), rng.randint(1, len(profile.units))))
    plan = horizon.Plan(splits={profile.units[u].name: c for u, c in policies.items()}, num_slots=slots,
                        resident=tuple(profile.units[u].name for u in resident))
    _, _, memory = horizon_run(model, batches(2, batch=BATCH, seq=SEQ), config=horizon.TrainConfig(plan=plan))
    assert memory.device_peak_bytes == simulate(profile, policies, slots, resident).peak_bytes


def _link_bound(rng, num_blocks):
    """A synthetic profile whose copies take far longer than its compute (a slow link)."""
    return synthetic(rng, num_blocks, link=rng.uniform(2e6, 2e7), duplex=rng.random() < 0.5)


@pytest.mark.parametrize("seed", range(30))
def test_residency_never_slows_a_plan_and_fits_its_budget(seed):
    rng = random.Random(seed)
    profile = (_link_bound if seed % 2 else synthetic)(rng, rng.randint(2, 6))
    budget = _budget_between(rng, profile)
    solve = solve_mip if seed % 3 else solve_greedy
    try:
        base = solve(profile, budget)
    except horizon.planner.PlanInfeasible:
        return
    spare = budget + rng.choice([0, 1, 4]) * max(u.weight_bytes for u in profile.units)
    out = add_resident(profile, base, spare)
    assert out.choices == base.choices and out.num_slots == base.num_slots
    assert set(out.resident) <= set(reloaded_units(profile, base.num_slots))
    before = simulate(profile, base.choices, base.num_slots)
    after = simulate(profile, out.choices, out.num_slots, out.resident)
    assert after.peak_bytes <= spare and after.peak_bytes == out.peak_bytes
    assert after.step_s <= before.step_s
    assert out.step_s == model_step_s(profile, out.choices, out.num_slots, out.resident)
    if out.resident:
        assert after.step_s < before.step_s


def test_a_slow_link_with_memory_to_spare_makes_every_reloaded_unit_resident():
    rng = random.Random(7)
    profile = synthetic(rng, 4, link=1e6, compute=False)  # copies only: every copy saved is time saved
    base = solve_mip(profile, 10**12)
    out = add_resident(profile, base, 10**12)
    assert list(out.resident) == reloaded_units(profile, base.num_slots) != []
    # the step is the link's: exactly the saved copies' bytes less on the queue that carries the weights
    saved = sum(profile.units[u].weight_bytes for u in out.resident)
    before = simulate(profile, base.choices, base.num_slots)
    after = simulate(profile, out.choices, out.num_slots, out.resident)
    assert after.link_busy_s == pytest.approx(before.link_busy_s - saved / profile.link_bytes_per_s)
    assert add_resident(profile, base, base.peak_bytes).peak_bytes <= base.peak_bytes


def test_a_plan_file_keeps_its_resident_units(tmp_path, model_and_profile):
    model, profile = model_and_profile
    base = solve_mip(profile, 10**12)
    solution = add_resident(profile, base, 10**12)
    solution = solution if solution.resident else dataclasses.replace(base, resident=(1, 2))
    plan = to_plan(profile, solution)
    assert plan.resident == tuple(profile.units[u].name for u in solution.resident)
    save_plan(tmp_path / "p.json", plan, profile=profile, budget_bytes=10**12, solution=solution)
    assert load_plan(tmp_path / "p.json") == plan


def test_with_accumulation_a_resident_unit_is_loaded_once_per_update():
    """Between the micro-batches of one update the weights do not change, so a resident unit is loaded by
    the window's first step only; after the window's updates (and across an evaluation) it is loaded
    again. Bit for bit the streamed run's numbers, and exactly the bytes counted from ``assign_slots``."""
    model = tiny_decoder(num_layers=4)
    data = batches(6, batch=BATCH, seq=SEQ)
    resident = ("embed_tokens", "layers.2", "lm_head")
    config = lambda **kw: horizon.TrainConfig(plan=horizon.Plan(default=P.KEEP, **kw), grad_accum_steps=3)  # noqa: E731

    def run(trainer):
        out = [trainer.step(b).loss for b in data[:3]]
        out.append(trainer.evaluate(data[:1]).loss)  # right after the window: its updates are pending
        out += [trainer.step(b).loss for b in data[3:5]]
        out.append(trainer.evaluate(data[:1]).loss)  # inside a window
        out.append(trainer.step(data[5]).loss)
        return out, trainer.state_dict()

    with horizon.Trainer(copy.deepcopy(model), config()) as t:
        want, state = run(t)
    counting = _CountingTransfer()
    with horizon.Trainer(copy.deepcopy(model), config(resident=resident), transfer=counting) as t:
        got, got_state = run(t)
    assert got == want and all(torch.equal(v, state[k]) for k, v in got_state.items())
    units = [u for u, n in enumerate(NAMES) if n in resident]
    step, again = _load_bytes(model, 2, units), sum(_unit_bytes(model)[u] for u in units)
    evaluation = sum(_unit_bytes(model))
    assert counting.h2d_bytes == (step + 2 * (step - again)  # the first window: resident units loaded once
                                  + evaluation                 # after it: loaded again (new weights)
                                  + step                       # the second window's first step loads them again
                                  + (step - again)
                                  + (evaluation - again)       # an evaluation inside the window does not
                                  + (step - again))


def test_a_resume_loads_resident_units_again(tmp_path):
    """A resume writes every weight: an evaluation after it sees the checkpoint's weights, not those an
    evaluation before it left in the resident buffers."""
    model = tiny_decoder(num_layers=2)
    data = batches(4, batch=BATCH, seq=SEQ)

    def run(plan, where):
        ckpt = horizon.CheckpointConfig(dir=str(tmp_path / where), every_steps=1000)
        with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(plan=plan, checkpoint=ckpt)) as t:
            for b in data[:2]:
                t.step(b)
            t.save(wait=True)
            for b in data[2:]:
                t.step(b)
            before = t.evaluate(data[:1]).loss
            t.resume()
            return before, t.evaluate(data[:1]).loss

    streamed = run(horizon.Plan(), "streamed")
    resident = run(horizon.Plan(resident=tuple(NAMES[:2]) + ("lm_head",)), "resident")
    assert resident == streamed and streamed[0] != streamed[1]
