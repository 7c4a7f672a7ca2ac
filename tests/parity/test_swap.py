"""SWAP: saved activations go to host after forward and come back before backward, bitwise KEEP."""

import pytest
import torch

import horizon
from helpers import batches, horizon_run, plain_run, rel_err, tiny_decoder
from horizon.engine.transfer import CpuTransfer

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
P = horizon.ActivationPolicy


def _run(model, data, plan, **kwargs):
    return horizon_run(model, data, config=horizon.TrainConfig(optimizer=OPT, grad_clip_norm=1.0, plan=plan), **kwargs)


def _equal(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("num_slots", [2, 3])
def test_swap_is_bitwise_keep_and_recompute(num_slots):
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    data = batches(3)
    runs = {p: _run(model, data, horizon.Plan.uniform(p, num_slots=num_slots)) for p in ("keep", "swap", "recompute")}
    assert _equal(runs["swap"], runs["keep"]) and _equal(runs["swap"], runs["recompute"])


def test_swap_matches_plain_pytorch():
    model = tiny_decoder(num_layers=3)
    data = batches(5, ignore_frac=0.2)
    ref_losses, ref_state = plain_run(model, data, opt=OPT, clip=1.0)
    losses, state, _ = _run(model, data, "swap")
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(losses, ref_losses))
    assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)


@pytest.mark.parametrize("duplex", [False, True])
def test_mixed_plan_with_swap_and_a_slow_link_is_bitwise_keep(duplex):
    """A throttled link with random delays reorders every copy against compute; no number moves.
    Duplex: swaps out and restores run on two threads, each direction at the full bandwidth."""
    import random

    rng = random.Random(0)
    model = tiny_decoder(num_layers=5)
    data = batches(2)
    mixed = horizon.Plan(per_unit={"layers.0": P.SWAP, "layers.1": P.KEEP, "layers.2": P.SWAP,
                                   "layers.3": P.RECOMPUTE, "layers.4": P.SWAP})
    slow = CpuTransfer(bandwidth_bytes_per_s=50e6, delay_s=lambda: rng.uniform(0, 0.002), duplex=duplex)
    assert _equal(_run(model, data, mixed, transfer=slow), _run(model, data, "keep"))


def test_swap_holds_host_bytes_and_less_device_memory_than_keep():
    model = tiny_decoder(num_layers=8, dim=128, ffn_dim=256)
    data = batches(1, batch=4, seq=64)
    keep, swap = _run(model, data, "keep"), _run(model, data, "swap")
    assert swap[2].device_peak_bytes < keep[2].device_peak_bytes
    # every block's saved bytes wait on the host: as many as KEEP's graphs held on the device
    assert swap[2].host_bytes_by_role["activations"] >= 8 * 4 * 64 * 128 * 4
