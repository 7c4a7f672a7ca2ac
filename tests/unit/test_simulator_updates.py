"""The optimizer in the simulator (``Profile.update_schedule``): each unit's next load waits for its update.

Against formulas on synthetic profiles whose updates are far slower than the compute (the step is then
the updates' chain), and against the clock: one trainer's steady state with a slow optimizer (a sleep
before each update, ``optimizer_delay_s``), which the simulator without the optimizer misses by far."""

import copy
import dataclasses
import random
import statistics

import pytest
import torch

import horizon
from helpers import batches
from horizon.models import Decoder, decoder_config
from horizon.planner import Profile, simulate, solve_mip
from horizon.planner.calibrate import calibrate
from horizon.planner.choice import as_choice
from horizon.planner.measure import measure_profile
from horizon.planner.residency import add_resident
from horizon.planner.schedule import value
from horizon.planner.simulate import chooser, intervals
from test_planner import synthetic

P = horizon.ActivationPolicy


def _with_updates(profile: Profile, schedule: str, seconds: float) -> Profile:
    units = tuple(dataclasses.replace(u, update_s=seconds, update_overlap_s=seconds) for u in profile.units)
    return dataclasses.replace(profile, units=units, update_schedule=schedule)


def _forward_compute_s(profile: Profile, policies, slots: int) -> float:
    """The compute of the forward positions before the head, as the simulator prices them."""
    choose = chooser({u: as_choice(p) for u, p in policies.items()})
    positions = intervals(profile, slots)[1:len(profile.units)]  # [0] is the prologue; the head is next
    return sum(value(iv.compute, choose) for iv in positions)


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("seed", range(8))
def test_a_deferred_step_is_the_update_chain_then_the_head_and_backward(seed, accumulation):
    """With a free link and every update longer than any forward, the forward of unit u starts when update
    u of the previous window ends: a window is Σ updates + (head and backward) + its other steps, exactly;
    the prediction is its mean step."""
    rng = random.Random(seed)
    base = dataclasses.replace(synthetic(rng, rng.randint(2, 5)), link_bytes_per_s=1e18)
    policies = {u: rng.choice([P.KEEP, P.RECOMPUTE, P.SWAP]) for u in base.blocks}
    slots = rng.choice([2, 3])
    c = 1.0  # seconds: far above any synthetic unit's compute
    alone = simulate(base, policies, slots).step_s
    slow = dataclasses.replace(_with_updates(base, "deferred", c), accumulation=accumulation)
    n, k = len(base.units), accumulation
    window = n * c + alone - _forward_compute_s(base, policies, slots) + (k - 1) * alone
    assert simulate(slow, policies, slots).step_s == pytest.approx(window / k, rel=1e-9)
    free = dataclasses.replace(_with_updates(base, "deferred", 0.0), accumulation=accumulation)
    assert simulate(free, policies, slots).step_s == pytest.approx(alone, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_with_accumulation_residency_pays_on_a_duplex_link(seed):
    """On a duplex link a backward position's gradient going out takes as long as the weights coming in,
    so residency saves little in one step; with 4 micro-batches per update a resident unit's copies are
    gone from 3 of them, forward and backward, and the planner prices that (``Profile.accumulation``)."""
    rng = random.Random(seed)
    profile = synthetic(rng, 4, link=2e7, duplex=True)
    base = solve_mip(profile, 10**12)
    one = add_resident(profile, base, 10**12)
    four = dataclasses.replace(profile, accumulation=4)
    out = add_resident(four, base, 10**12)
    assert out.resident and len(out.resident) >= len(one.resident)
    assert simulate(four, out.choices, out.num_slots, out.resident).step_s < \
        simulate(four, base.choices, base.num_slots).step_s
    # without resident units every micro-batch is the same step
    assert simulate(four, base.choices, base.num_slots).step_s == pytest.approx(
        simulate(profile, base.choices, base.num_slots).step_s, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_an_eager_step_is_bounded_by_the_updaters_work(seed):
    """Eager updates overlap the backward, but one worker runs them all: n·c ≤ step ≤ n·c + the compute."""
    rng = random.Random(seed)
    base = dataclasses.replace(synthetic(rng, rng.randint(2, 5)), link_bytes_per_s=1e18)
    policies = {u: rng.choice([P.KEEP, P.RECOMPUTE]) for u in base.blocks}
    c, n = 1.0, len(base.units)
    eager = simulate(_with_updates(base, "eager", c), policies, 2)
    assert n * c <= eager.step_s <= n * c + eager.compute_s + 1e-9
    assert eager.peak_bytes == simulate(base, policies, 2).peak_bytes  # host-side work holds no device bytes


def test_profiles_refuse_an_unknown_schedule_and_eager_accumulation():
    profile = synthetic(random.Random(0), 2)
    with pytest.raises(ValueError, match="update_schedule"):
        dataclasses.replace(profile, update_schedule="lazy")
    with pytest.raises(ValueError, match="accumulation=1"):
        dataclasses.replace(profile, update_schedule="eager", accumulation=2)
    with pytest.raises(ValueError, match="int >= 1"):
        dataclasses.replace(profile, accumulation=0)


BATCH, SEQ, VOCAB, LINK = 4, 64, 1024, 0.5e9
WARMUP, STEPS, DELAY_S = 3, 6, 0.03


def _steady_step_s(model, config, data, delay_s):
    """Median seconds of consecutive steps of one trainer (each meets the previous step's updates)."""
    with horizon.Trainer(copy.deepcopy(model), config,
                         optimizer_delay_s=(lambda: delay_s) if delay_s else None) as trainer:
        seconds = [trainer.step(b).seconds for b in data]
    return statistics.median(seconds[WARMUP:])


@pytest.mark.parametrize("schedule", ["eager", "deferred"])
def test_the_simulator_follows_a_slow_optimizer(schedule):
    torch.manual_seed(0)
    model = Decoder(decoder_config("small", dim=128, num_layers=4, vocab_size=VOCAB, num_heads=4, num_kv_heads=2,
                                   ffn_dim=None))
    kw = dict(grad_clip_norm=None, on_nonfinite="ignore") if schedule == "eager" else dict(grad_clip_norm=1.0)
    config = horizon.TrainConfig(plan="recompute", cpu_link_bytes_per_s=LINK, **kw)
    assert config.update_schedule == schedule
    with horizon.Trainer(copy.deepcopy(model), config) as t:
        profile = measure_profile(t.engine.specs, t.store, device=t.device, transfer=t.transfer, batch_size=BATCH,
                                  seq_len=SEQ, reps=3, warmup=1)
    data = batches(WARMUP + STEPS, vocab=VOCAB, batch=BATCH, seq=SEQ)
    policies = {u: P.RECOMPUTE for u in profile.blocks}
    fast = _steady_step_s(model, config, data, 0.0)
    fitted = calibrate(dataclasses.replace(profile, update_schedule=schedule), [(policies, 2, fast)])
    slow_profile = dataclasses.replace(fitted, units=tuple(
        dataclasses.replace(u, update_s=u.update_s + DELAY_S, update_overlap_s=u.update_overlap_s + DELAY_S)
        for u in fitted.units))
    slow = _steady_step_s(model, config, data, DELAY_S)
    predicted = simulate(slow_profile, policies, 2).step_s
    without = simulate(dataclasses.replace(slow_profile, update_schedule="none"), policies, 2).step_s
    assert abs(predicted / slow - 1) <= 0.15, (predicted, slow, fast)
    assert without / slow < 0.8, (without, slow)  # the optimizer is what sets this step
