"""The planner against the engine: measured profile, exact ledger prediction, plan="auto", plan files."""

import copy
import dataclasses
import logging
import random

import pytest

import horizon
from helpers import batches, forbid_host_store, horizon_run, rel_err, tiny_decoder
from horizon.planner import Profile, simulate
from horizon.planner.apply import auto_plan, load_plan, save_plan, to_plan
from horizon.planner.choice import DEVICE_INPUT_RECOMPUTE, choices
import horizon.planner.measure
from horizon.planner.measure import measure_profile

P = horizon.ActivationPolicy
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def model_and_profile():
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig()) as t:
        profile = measure_profile(t.engine.specs, t.store, device=t.device, transfer=t.transfer,
                                  batch_size=BATCH, seq_len=SEQ)
    return model, profile


def test_measured_bytes_are_exact(model_and_profile):
    model, profile = model_and_profile
    assert profile.hidden_bytes == BATCH * SEQ * model.config.dim * 4
    block = sum(p.numel() for p in model.layers[0].parameters()) * 4
    assert all(profile.units[u].weight_bytes == profile.units[u].grad_bytes == block for u in profile.blocks)
    assert all(profile.units[u].swap_bytes >= profile.units[u].keep_bytes > profile.hidden_bytes
               for u in profile.blocks)
    assert profile.units[-1].borrowed_grad_bytes == ((0, model.embed_tokens.weight.numel() * 4),)
    # a split's own copies and sums were timed (two rows: halves), and cost less than the block itself
    assert profile.fractions == (0.5,)
    assert all(0 < profile.units[u].split_fwd_s < profile.units[u].fwd_grad_s
               and 0 < profile.units[u].split_bwd_s < profile.units[u].bwd_s for u in profile.blocks)


class _BlockingCopies(horizon.engine.transfer.CpuTransfer):
    """A copy to the host that holds the issuing thread ``hold_s`` (as a copy sharing the compute's
    cores would slow it), so what it costs the compute beside it is known."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s

    def d2h(self, dsts, srcs):
        import time

        time.sleep(self.hold_s)
        return super().d2h(dsts, srcs)


def test_the_profile_measures_what_a_copy_costs_the_compute_beside_it(model_and_profile):
    model, plain = model_and_profile
    hold_s = 0.02
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig()) as t:
        profile = measure_profile(t.engine.specs, t.store, device=t.device, transfer=_BlockingCopies(hold_s),
                                  batch_size=BATCH, seq_len=SEQ, reps=3, warmup=1)
    per_copy_s = profile.copy_compute_s_per_byte * profile.units[1].swap_bytes  # one copy of the block's swap
    assert 0.75 * hold_s <= per_copy_s <= 3 * hold_s  # the sleep is a floor; the ceiling allows a loaded machine
    assert profile.units[1].swap_bytes == plain.units[1].swap_bytes
    assert Profile.from_dict(profile.to_dict()) == profile
    old_file = {k: v for k, v in profile.to_dict().items() if k != "copy_compute_s_per_byte"}
    assert Profile.from_dict(old_file).copy_compute_s_per_byte == 0.0  # profiles saved before it: no cost


def test_measuring_leaks_no_graph(model_and_profile):
    """The profile prices SWAP by packing a graph it never runs backward on; it must let it go (a graph
    and its hooks hold each other through autograd's C++ nodes): it leaked ~60 MB a call on the bench."""
    import gc

    from horizon.engine.activations import KeptGraph

    def live() -> int:
        gc.collect()
        return sum(issubclass(type(o), KeptGraph) for o in gc.get_objects())

    model, _ = model_and_profile
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig()) as t:
        before = live()
        measure_profile(t.engine.specs, t.store, device=t.device, transfer=t.transfer, batch_size=BATCH,
                        seq_len=SEQ, reps=1, warmup=0)
        assert live() == before


@pytest.mark.parametrize("seed", range(8))
def test_engine_ledger_peak_equals_the_prediction(model_and_profile, seed):
    model, profile = model_and_profile
    rng = random.Random(seed)
    assert profile.fractions == (0.5,)  # of the quarter levels, the whole rows of a batch of 2
    policies = {u: rng.choice(choices(profile)) for u in profile.blocks}
    slots = rng.choice([2, 3])
    plan = horizon.Plan(splits={profile.units[u].name: c for u, c in policies.items()}, num_slots=slots)
    _, _, memory = horizon_run(model, batches(2, batch=BATCH, seq=SEQ), config=horizon.TrainConfig(plan=plan))
    assert memory.device_peak_bytes == simulate(profile, policies, slots).peak_bytes


def test_inputs_left_on_the_device_are_held_as_predicted(model_and_profile):
    model, profile = model_and_profile
    policies = {u: DEVICE_INPUT_RECOMPUTE for u in profile.blocks}
    plan = horizon.Plan(splits={profile.units[u].name: c for u, c in policies.items()})
    _, _, memory = horizon_run(model, batches(2, batch=BATCH, seq=SEQ), config=horizon.TrainConfig(plan=plan))
    assert memory.device_peak_bytes == simulate(profile, policies, 2).peak_bytes
    # A split whose recomputed rows keep their input on the device runs (tests/parity/test_device_input.py),
    # but the planner does not offer it, so it cannot price it either.
    with pytest.raises(ValueError, match="cannot price"):
        simulate(profile, {u: horizon.RowSplit(keep=0.5, input_on_device=True) for u in profile.blocks}, 2)


def test_auto_plan_fits_its_budget_and_keeps_the_numerics(model_and_profile, caplog):
    model, profile = model_and_profile
    data = batches(3, batch=BATCH, seq=SEQ)
    keep = horizon_run(model, data, config=horizon.TrainConfig(plan="keep"))
    recompute = horizon_run(model, data, config=horizon.TrainConfig(plan="recompute"))
    budget = (keep[2].device_peak_bytes + recompute[2].device_peak_bytes) // 2
    config = horizon.TrainConfig(plan="auto", device_memory_budget_bytes=budget)
    with horizon.Trainer(copy.deepcopy(model), config) as t, caplog.at_level(logging.INFO, logger="horizon.planner"):
        losses = [t.step(b).loss for b in data]
        state = {k: v.clone() for k, v in t.state_dict().items()}
        solution, peak = t.plan_solution, t.memory().device_peak_bytes
        assert t.engine.plan == to_plan(t.plan_profile, solution)
    assert peak == solution.peak_bytes <= budget
    (line,) = [r.getMessage() for r in caplog.records if " slots; predicted " in r.getMessage()]
    assert f"a device peak of {solution.peak_bytes:,} of {budget:,} bytes" in line
    counted = sum(int(part.split()[0]) for part in line.removeprefix("plan='auto': ").split(" blocks,")[0].split(", "))
    assert counted == len(profile.blocks)
    assert any(c.recompute < 1 for c in solution.choices.values())  # the budget leaves room to keep or swap some
    # Row fractions change the summation order: 1e-6 on the losses, 1e-5 on weights after 3 AdamW steps.
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(losses, keep[0]))
    assert all(rel_err(state[k], keep[1][k]) <= 1e-5 for k in state)


def test_auto_plan_plans_again_for_a_larger_batch_and_runs_a_smaller_one_within_budget(model_and_profile,
                                                                                     monkeypatch):
    """The plan is for the largest batch yet: a longer sequence is planned for before it runs (its profile
    measured at the new shape, the first step's compute scale kept), shorter or narrower batches run on
    the plan as it is (a split's rows rounded down), and every step stays within the budget."""
    model, _ = model_and_profile
    measured, real = [], horizon.planner.measure.measure_profile

    def counting(*args, **kwargs):
        measured.append((kwargs["batch_size"], kwargs["seq_len"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(horizon.planner.measure, "measure_profile", counting)
    shapes = [(4, 16), (4, 64), (4, 16), (3, 64), (4, 64)]
    data = [batches(1, batch=b, seq=t, seed=i)[0] for i, (b, t) in enumerate(shapes)]
    keep = horizon_run(model, data, config=horizon.TrainConfig(plan="keep"))
    recompute = horizon_run(model, data, config=horizon.TrainConfig(plan="recompute"))
    budget = (keep[2].device_peak_bytes + recompute[2].device_peak_bytes) // 2
    config = horizon.TrainConfig(plan="auto", device_memory_budget_bytes=budget, profile_cache_dir=None)
    with horizon.Trainer(copy.deepcopy(model), config) as t:
        losses, peaks, plans = [], [], []
        for b in data:
            losses.append(t.step(b).loss)
            peaks.append(t.engine.ledger.peak_bytes)
            plans.append((t.planned_shape, t.plan_profile.compute_scale))
        state = {k: v.clone() for k, v in t.state_dict().items()}
    assert measured == [(4, 16), (4, 64)]
    assert [p[0] for p in plans] == [(4, 16), (4, 64), (4, 64), (4, 64), (4, 64)]
    assert plans[1][1] == plans[0][1]  # the scale fitted at the first step
    assert max(peaks) <= budget, (peaks, budget)
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(losses, keep[0]))
    assert all(rel_err(state[k], keep[1][k]) <= 1e-5 for k in state)


def test_a_plan_may_round_a_splits_rows_down_for_a_smaller_batch():
    plan = horizon.Plan(splits={"layers.0": horizon.RowSplit(keep=0.5),
                                "layers.1": horizon.RowSplit(keep=0.75, swap=0.25)}, round_rows=True)
    assert plan.rows("layers.0", 4) == (2, 0) and plan.rows("layers.0", 3) == (1, 0)
    assert plan.rows("layers.1", 4) == (3, 1) and plan.rows("layers.1", 3) == (2, 0)
    with pytest.raises(ValueError, match=r"Plan\(round_rows=True\) to round down"):
        dataclasses.replace(plan, round_rows=False).rows("layers.0", 3)
    with pytest.raises(ValueError, match="round_rows must be True or False"):
        horizon.Plan(round_rows=1)


def test_auto_plan_calibrates_on_the_measured_step(model_and_profile, monkeypatch):
    model, profile = model_and_profile
    # A compute-bound profile: the fixture's link is measured with copies of a few hundred KB, which in
    # one loaded CI run read 48 MB/s and left the simulated step link-bound, so that no compute scale in
    # range could double it (calibration then warns and falls back, as it should).
    profile = dataclasses.replace(profile, link_bytes_per_s=1e15)
    monkeypatch.setattr(horizon.planner.measure, "measure_profile", lambda *args, **kwargs: profile)
    recompute = {u: P.RECOMPUTE for u in profile.blocks}
    target_s = 2 * simulate(profile, recompute, 2).step_s
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig()) as t:
        _, calibrated, _ = auto_plan(t.engine.specs, t.store, device=t.device, transfer=t.transfer, batch_size=BATCH,
                                     seq_len=SEQ, budget_bytes=10**9, recompute_step_s=lambda: target_s)
    assert simulate(calibrated, recompute, 2).step_s == pytest.approx(target_s, rel=1e-6)


def test_plan_file_round_trip_drives_the_trainer(tmp_path, model_and_profile):
    model, profile = model_and_profile
    plan = horizon.Plan(per_unit={"layers.0": P.SWAP},
                        splits={"layers.1": horizon.RowSplit(keep=0.5, swap=0.5), "layers.3": horizon.RowSplit(swap=0.5),
                                "layers.2": horizon.RowSplit(input_on_device=True)},
                        num_slots=3)
    path = tmp_path / "plan.json"
    save_plan(path, plan, profile=profile, budget_bytes=10**7)
    assert load_plan(path) == plan
    cfg = horizon.TrainConfig(plan=str(path))
    assert cfg.resolved_plan == plan
    run = horizon_run(model, batches(1, batch=BATCH, seq=SEQ), config=cfg)
    assert run[2].num_slots == 3


def test_bad_plan_configs_are_value_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="device_memory_budget_bytes"):
        horizon.TrainConfig(plan="auto")
    with pytest.raises(ValueError, match="positive int"):
        horizon.TrainConfig(plan="auto", device_memory_budget_bytes=-1)
    with pytest.raises(ValueError, match="no such plan file"):
        horizon.TrainConfig(plan=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "horizon-plan/1", "per_unit": {"layers.0": "sometimes"}}')
    with pytest.raises(ValueError, match="per_unit policies"):
        load_plan(bad)
    bad.write_text('{"format": "horizon-plan/1", "splits": {"layers.0": 0.5}}')
    with pytest.raises(ValueError, match="splits must map unit names"):
        load_plan(bad)
    bad.write_text('{"format": "horizon-plan/1", "splits": {"layers.0": {"keep": 0.75, "swap": 0.5}}}')
    with pytest.raises(ValueError, match="at most 1"):
        load_plan(bad)
    bad.write_text('{"format": "horizon-plan/1", "splits": {"layers.0": {"input_on_device": "yes"}}}')
    with pytest.raises(ValueError, match="input_on_device must be True or False"):
        load_plan(bad)
    with pytest.raises(ValueError, match="needs rows to recompute"):
        horizon.RowSplit(keep=0.5, swap=0.5, input_on_device=True)
    forbid_host_store(monkeypatch)  # a budget too small fails before allocating
    with pytest.raises(ValueError, match="two weight slots"):
        horizon.Trainer(tiny_decoder(), horizon.TrainConfig(plan="auto", device_memory_budget_bytes=1000))
