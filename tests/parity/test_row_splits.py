"""Row splits (MEMO-style token fractions): a block keeps some rows' activations, swaps others', recomputes the rest.

Splitting the batch changes only the summation order of the parameter gradients, so a split plan
agrees with KEEP and RECOMPUTE (and with plain PyTorch) within 1e-6 relative error per tensor.
"""

import copy

import pytest
import torch

import horizon
from helpers import batches, horizon_run, plain_run, rel_err, tiny_decoder

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
P = horizon.ActivationPolicy
S = horizon.RowSplit


def _run(model, data, plan):
    return horizon_run(model, data, config=horizon.TrainConfig(optimizer=OPT, grad_clip_norm=1.0, plan=plan))


def _close(a, b, tol):
    assert all(abs(x - y) <= 1e-6 * abs(y) for x, y in zip(a[0], b[0]))
    errors = {k: rel_err(a[1][k], b[1][k]) for k in b[1]}
    assert max(errors.values()) <= tol, max(errors.items(), key=lambda kv: kv[1])


MIXED = horizon.Plan(per_unit={"layers.2": P.SWAP}, splits={"layers.0": S(keep=0.25), "layers.1": S(swap=0.5),
                                                             "layers.3": S(keep=0.5, swap=0.25)}, num_slots=3)


def _grads(model, batch, plan) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every parameter's gradient of one forward and backward (no update)."""
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(plan=plan)) as t:
        ids, labels = batch["input_ids"], batch["labels"]
        loss_sum, _ = t.engine.forward_backward(ids, labels, int((labels != -100).sum()))
        grads = {f"{unit.layout.name}.{k}": v.clone() for unit in t.store.units for k, v in unit.views(unit.grad).items()}
    return float(loss_sum), grads


def test_split_gradients_are_those_of_the_whole_batch():
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    batch = batches(1, batch=4, ignore_frac=0.1)[0]
    keep_loss, keep = _grads(model, batch, "keep")
    recompute_loss, recompute = _grads(model, batch, "recompute")
    assert recompute_loss == keep_loss and all(torch.equal(recompute[k], keep[k]) for k in keep)
    for plan in (horizon.Plan(splits={f"layers.{i}": S(keep=0.5) for i in range(4)}), MIXED):
        loss, grads = _grads(model, batch, plan)
        assert abs(loss - keep_loss) <= 1e-6 * abs(keep_loss)
        errors = {k: rel_err(grads[k], keep[k]) for k in keep}
        assert 0 < max(errors.values()) <= 1e-6, max(errors.items(), key=lambda kv: kv[1])


def test_split_plan_trains_like_plain_pytorch():
    """Over 3 AdamW steps: losses to 1e-6, weights to 1e-5 (AdamW's first steps magnify the rounding
    of a different summation order, as in test_hf_padding)."""
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    data = batches(3, batch=4, ignore_frac=0.1)
    _close(_run(model, data, MIXED), plain_run(model, data, opt=OPT, clip=1.0), tol=1e-5)


def test_splits_hold_fewer_device_bytes_than_keep():
    model = tiny_decoder(num_layers=4, dim=128, ffn_dim=256)
    data = batches(1, batch=4, seq=64)
    peaks = [_run(model, data, horizon.Plan(splits={f"layers.{i}": S(keep=f) for i in range(4)}))[2]
             .device_peak_bytes for f in (0.25, 0.5, 1.0)]
    recompute = _run(model, data, "recompute")[2].device_peak_bytes
    assert recompute < peaks[0] < peaks[1] < peaks[2]


def test_splits_on_padded_hf_batches_match_plain_pytorch():
    """attention_mask and position_ids are per row: each part of the batch gets its own rows of them."""
    pytest.importorskip("transformers")
    from test_hf import tiny_hf
    from test_hf_padding import CLIP, assert_close, left_padded, sequences
    from test_hf_padding import plain_run as hf_plain_run

    model = tiny_hf("llama")  # 3 rows of different lengths, left padded: fractions of 1/3 and 2/3
    plan = horizon.Plan(splits={"model.layers.0": S(keep=1 / 3), "model.layers.1": S(swap=2 / 3),
                                "model.layers.2": S(keep=1 / 3, swap=1 / 3)})
    config = horizon.TrainConfig(optimizer=OPT, grad_clip_norm=CLIP, plan=plan)
    with horizon.Trainer(copy.deepcopy(model), config) as trainer:
        losses = [trainer.step(left_padded(sequences(step))).loss for step in range(3)]
        state = {k: v.clone() for k, v in trainer.state_dict().items()}
    assert_close(losses, state, *hf_plain_run(model, 3, padded=True), tol=1e-6)


def test_bad_splits_are_value_errors():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        S(keep=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        S(keep=0.75, swap=0.5)
    with pytest.raises(ValueError, match="RowSplit"):
        horizon.Plan(splits={"layers.0": 0.5})
    with pytest.raises(ValueError, match="does not have"):
        horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(plan=horizon.Plan(splits={"layers.9": S(keep=0.5)})))
    plan = horizon.Plan(splits={"layers.0": S(keep=0.25)})
    with horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(plan=plan)) as trainer:
        before = {k: v.clone() for k, v in trainer.state_dict().items()}
        with pytest.raises(ValueError, match="multiples of 1/2"):
            trainer.step(batches(1, batch=2)[0])
        assert all(torch.equal(v, before[k]) for k, v in trainer.state_dict().items())
