"""Invariant 5: random delays in the transfer thread and in compute change no number."""

import random

import pytest
import torch

import horizon
from horizon.engine.transfer import CpuTransfer
from horizon.models import units as units_module
from helpers import batches, horizon_run, tiny_decoder


def _delayed(fn, rng):
    import time

    def call(module, x):
        time.sleep(rng.uniform(0, 0.003))
        return fn(module, x)

    return call


@pytest.mark.parametrize("plan,num_slots,duplex", [("recompute", 2, False), ("recompute", 3, False), ("keep", 2, False),
                                                   ("recompute", 2, True), ("swap", 3, True)])
def test_delays_change_no_number(monkeypatch, plan, num_slots, duplex):
    """``duplex``: copies to the host run on a thread of their own, as on a GPU's second copy engine,
    so only the engine's waits (not one queue's order) keep a restore behind its offload."""
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    data = batches(3)
    config = horizon.TrainConfig(grad_clip_norm=1.0, plan=horizon.Plan.uniform(plan, num_slots=num_slots))
    calm = horizon_run(model, data, config=config)
    rng = random.Random(0)
    monkeypatch.setattr(units_module, "_call_block", _delayed(units_module._call_block, rng))
    monkeypatch.setattr(units_module, "_call_module", _delayed(units_module._call_module, rng))
    transfer = CpuTransfer(delay_s=lambda: rng.uniform(0, 0.004), duplex=duplex)
    stormy = horizon_run(model, data, config=config, transfer=transfer)
    assert calm[0] == stormy[0]
    assert all(torch.equal(calm[1][k], stormy[1][k]) for k in calm[1])


def test_throttled_link_takes_the_time_its_bandwidth_says():
    import time

    transfer = CpuTransfer(bandwidth_bytes_per_s=100e6)
    src, dst = torch.ones(2_500_000), torch.empty(2_500_000)  # 10 MB → 0.1 s at 100 MB/s
    start = time.perf_counter()
    transfer.h2d([dst], [src]).wait_host()
    elapsed = time.perf_counter() - start
    transfer.close()
    assert torch.equal(dst, src)
    assert 0.1 <= elapsed < 2.0  # the lower bound is the throttle; the upper one only catches a hang


@pytest.mark.parametrize("duplex", [False, True])
def test_a_duplex_link_carries_both_directions_at_once_and_one_queue_does_not(duplex):
    """A load held back (its source's update still running) stalls a copy to the host behind it on one
    queue; on a duplex link the copy to the host goes ahead."""
    import concurrent.futures
    import threading

    transfer = CpuTransfer(duplex=duplex)
    down, up = torch.ones(1000), torch.full((1000,), 2.0)
    host, device = torch.zeros_like(up), torch.zeros_like(down)
    update = concurrent.futures.Future()
    release = threading.Timer(0.5, update.set_result, [None])  # frees one queue's thread after 0.5 s
    release.start()
    load = transfer.h2d([device], [down], after=[update])
    transfer.d2h([host], [up]).wait_host()
    assert update.done() is not duplex  # duplex: the copy out finished while the load still waited
    load.wait_host()
    release.join()
    transfer.close()
    assert torch.equal(device, down) and torch.equal(host, up)


@pytest.mark.parametrize("clip,nonfinite,accum", [(None, "ignore", 1), (None, "skip", 1), (1.0, "skip", 1),
                                                  (1.0, "skip", 2)])
def test_optimizer_delays_change_no_number(clip, nonfinite, accum):
    """Updates overlap the backward (eager) or the next forward (deferred); folds of accumulated
    gradients overlap the next micro-batch: loads and gradient landings must wait for them."""
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    data = batches(4)
    config = horizon.TrainConfig(grad_clip_norm=clip, plan="recompute", on_nonfinite=nonfinite,
                                 grad_accum_steps=accum)
    calm = horizon_run(model, data, config=config)
    rng = random.Random(1)
    import copy

    with horizon.Trainer(copy.deepcopy(model), config, optimizer_delay_s=lambda: rng.uniform(0, 0.004),
                         transfer=CpuTransfer(delay_s=lambda: rng.uniform(0, 0.002), duplex=accum == 2)) as trainer:
        losses = [trainer.step(b).loss for b in data]
        state = trainer.state_dict()
        assert losses == calm[0]
        assert all(torch.equal(calm[1][k], state[k]) for k in calm[1])
