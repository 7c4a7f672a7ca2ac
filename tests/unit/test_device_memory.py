"""Invariant 2: device memory is bounded by the plan, not by depth (the engine's own ledger on CPU)."""

import pytest

import horizon
from helpers import batches, horizon_run, tiny_decoder

BATCH, SEQ = 2, 16


def _peak(num_layers, plan, **overrides):
    model = tiny_decoder(num_layers=num_layers, **overrides)
    _, _, memory = horizon_run(model, batches(2, batch=BATCH, seq=SEQ),
                               config=horizon.TrainConfig(plan=plan))
    return model, memory


def _block_grad_bytes(model):
    return 4 * sum(p.numel() for p in model.layers[0].parameters())


def test_recompute_peak_does_not_grow_with_depth_and_equals_the_formula():
    model4, m4 = _peak(4, "recompute")
    _, m16 = _peak(16, "recompute")
    assert m4.device_peak_bytes == m16.device_peak_bytes
    hidden_bytes = BATCH * SEQ * model4.config.dim * 4
    # slots + three hidden states (gradient flowing back, restored input, prefetched input)
    # + two units of gradients on their way to the host
    formula = m4.num_slots * m4.slot_bytes + 3 * hidden_bytes + 2 * _block_grad_bytes(model4)
    assert m4.device_peak_bytes == formula
    assert m4.slot_bytes == 4 * max(sum(p.numel() for p in model4.layers[0].parameters()),
                                    model4.embed_tokens.weight.numel(),
                                    model4.lm_head.weight.numel() + model4.norm.weight.numel())


def test_keep_peak_grows_by_the_kept_activations_only():
    _, recompute = _peak(4, "recompute")
    _, keep4 = _peak(4, "keep")
    _, keep8 = _peak(8, "keep")
    per_block = (keep8.device_peak_bytes - keep4.device_peak_bytes) / 4
    assert per_block > 0 and keep4.device_peak_bytes > recompute.device_peak_bytes
    _, keep12 = _peak(12, "keep")
    assert keep12.device_peak_bytes - keep8.device_peak_bytes == 4 * per_block  # linear in kept blocks


@pytest.mark.parametrize("num_slots", [2, 3])
def test_more_slots_cost_exactly_one_slot_each(num_slots):
    model = tiny_decoder(num_layers=4)
    _, _, base = horizon_run(model, batches(1), config=horizon.TrainConfig(plan=horizon.Plan(num_slots=2)))
    _, _, more = horizon_run(model, batches(1), config=horizon.TrainConfig(plan=horizon.Plan(num_slots=num_slots)))
    assert more.device_peak_bytes - base.device_peak_bytes == (num_slots - 2) * base.slot_bytes
