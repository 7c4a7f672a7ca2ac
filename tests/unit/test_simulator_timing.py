"""The simulator against the clock: predicted vs measured step time across plans, CPU, throttled link.

Robust to a shared, noisy machine: the plans take turns step by step (a burst of load slows them
all alike), medians after a generous warm-up, and the one calibration (``calibrate``: a compute
scale) is fitted on all-RECOMPUTE and all-KEEP from the same run; every plan is checked, SWAP
and the mixed plan were not fitted on.
"""

import copy
import random
import dataclasses
import statistics

import pytest
import torch

import horizon
from helpers import batches
from horizon.models import Decoder, decoder_config
from horizon.planner import simulate
from horizon.planner.calibrate import calibrate
from horizon.planner.measure import measure_profile, median_profile

P = horizon.ActivationPolicy
BATCH, SEQ, VOCAB, LINK_BYTES_PER_S = 4, 128, 1024, 0.25e9
WARMUP, STEPS = 3, 7
FITTED = ("recompute", "keep")  # the two extremes; swap and mixed are held out


def _plans(blocks):
    mixed = {u: (P.KEEP, P.SWAP, P.RECOMPUTE)[i % 3] for i, u in enumerate(blocks)}
    return {"recompute": ({u: P.RECOMPUTE for u in blocks}, 2), "keep": ({u: P.KEEP for u in blocks}, 2),
            "swap": ({u: P.SWAP for u in blocks}, 2), "mixed": (mixed, 3)}


def measure_plans(duplex: bool = False):
    """(profile, calibrated profile, predicted s, measured s by plan name); ``duplex``: the CPU link
    carries both directions at once (TrainConfig.cpu_link_duplex), as a GPU's copy engines do.

    Every round measures the profile once and then runs one step of each plan, so a burst of load
    from other processes lands on profile and steps alike; medians over the rounds after warm-up."""
    torch.manual_seed(0)
    model = Decoder(decoder_config("small", dim=128, num_layers=4, vocab_size=VOCAB, num_heads=4, num_kv_heads=2,
                                   ffn_dim=None))
    link = {"cpu_link_bytes_per_s": LINK_BYTES_PER_S, "cpu_link_duplex": duplex}
    profiler = horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(**link))
    blocks = range(1, len(profiler.engine.specs) - 1)
    plans = _plans(blocks)
    trainers = {}
    for name, (policies, slots) in plans.items():
        plan = horizon.Plan(per_unit={profiler.engine.specs[u].name: p for u, p in policies.items()}, num_slots=slots)
        trainers[name] = horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(**link, plan=plan))
    times, profiles = {name: [] for name in plans}, []
    for i, batch in enumerate(batches(WARMUP + STEPS, vocab=VOCAB, batch=BATCH, seq=SEQ)):
        profile = measure_profile(profiler.engine.specs, profiler.store, device=profiler.device,
                                  transfer=profiler.transfer, batch_size=BATCH, seq_len=SEQ, reps=3, warmup=1)
        for name, trainer in trainers.items():
            seconds = trainer.step(batch).seconds
            if i >= WARMUP:
                times[name].append(seconds)
        if i >= WARMUP:
            profiles.append(profile)
    for trainer in (profiler, *trainers.values()):
        trainer.close()
    profile = median_profile(profiles)
    assert profile.duplex == duplex
    measured = {name: statistics.median(ts) for name, ts in times.items()}
    fitted = calibrate(profile, [(*plans[name], measured[name]) for name in FITTED])
    predicted = {name: simulate(fitted, *plans[name]).step_s for name in plans}
    return profile, fitted, predicted, measured


@pytest.fixture(scope="module", params=[False, True], ids=["one-queue", "duplex"])
def predicted_and_measured(request):
    return measure_plans(duplex=request.param)


@pytest.mark.parametrize("name", ["recompute", "keep", "swap", "mixed"])
def test_simulator_is_within_15_percent_of_the_measured_step(predicted_and_measured, name):
    _, fitted, predicted, measured = predicted_and_measured
    error = predicted[name] / measured[name] - 1
    assert abs(error) <= 0.15, (f"{name}: simulated {predicted[name]:.4f} s, measured {measured[name]:.4f} s "
                                f"({error:+.1%}; compute scale {fitted.compute_scale:.2f}); all: {measured}")


def test_calibration_fits_one_plan_exactly_and_scales_compute_only():
    profile = _synthetic_profile()
    policies = {u: P.RECOMPUTE for u in profile.blocks}
    target = simulate(dataclasses.replace(profile, compute_scale=1.7), policies, 2).step_s
    fitted = calibrate(profile, [(policies, 2, target)])
    assert fitted.compute_scale == pytest.approx(1.7, rel=1e-6)
    # With the link free, the prediction is Σ compute × scale.
    free = dataclasses.replace(fitted, link_bytes_per_s=1e18)
    assert simulate(free, policies, 2).step_s == pytest.approx(
        simulate(dataclasses.replace(free, compute_scale=1.0), policies, 2).step_s * 1.7, rel=1e-6)


def test_calibrate_rejects_impossible_measurements():
    profile = _synthetic_profile()
    policies = {u: P.RECOMPUTE for u in profile.blocks}
    with pytest.raises(ValueError, match="positive"):
        calibrate(profile, [(policies, 2, 0.0)])
    with pytest.raises(ValueError, match="measure it again"):
        calibrate(profile, [(policies, 2, 1e6)])
    with pytest.raises(ValueError, match="at least one"):
        calibrate(profile, [])


def _synthetic_profile():
    from test_planner import synthetic

    return synthetic(random.Random(0), 3)
