"""Trainer.evaluate: the loss plain PyTorch computes on the same weights, and nothing changes."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import horizon
from helpers import batches, tiny_decoder
from test_parity import DropoutLM


def plain_eval_loss(model, state, data) -> float:
    """Token-weighted mean cross-entropy of ``model`` loaded with ``state`` over ``data`` (plain PyTorch)."""
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            logits = model(b["input_ids"])
            total += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((b["labels"] != -100).sum())
    return total / count


def snapshot(trainer):
    weights = {k: v.clone() for k, v in trainer.state_dict().items()}
    opt = trainer.optimizer_state_dict()["state"]
    return weights, {k: {r: v.clone() for r, v in s.items()} for k, s in opt.items()}


class Recorder(horizon.Callback):
    def __init__(self):
        self.evals = []

    def on_eval(self, trainer, metrics):
        self.evals.append(metrics)


@pytest.mark.parametrize("clip", [None, 1.0])  # eager updates, and updates pending when step() returns
@pytest.mark.parametrize("family", ["decoder", "dropout"])
def test_eval_loss_equals_plain_pytorch_and_changes_nothing(clip, family, tmp_path):
    model, vocab = (tiny_decoder(), 256) if family == "decoder" else (DropoutLM(), 64)
    # uneven shapes and ignored labels: the mean is weighted by counted tokens
    val = batches(3, vocab=vocab, seed=7, ignore_frac=0.3) + batches(1, vocab=vocab, batch=3, seq=9, seed=8)
    recorder = Recorder()
    config = horizon.TrainConfig(grad_clip_norm=clip, on_nonfinite="ignore" if clip is None else "skip",
                                 metrics_jsonl=str(tmp_path / "m.jsonl"))
    with horizon.Trainer(copy.deepcopy(model), config, callbacks=[recorder]) as trainer:
        for b in batches(3, vocab=vocab):
            trainer.step(b)
        result = trainer.evaluate(val)
        before = snapshot(trainer)
        again = trainer.evaluate(iter(val))  # any iterable
        after = snapshot(trainer)
        assert trainer.model.training  # the user's mode is back
    assert result.loss == pytest.approx(plain_eval_loss(model, before[0], val), rel=1e-6, abs=0)
    assert result.tokens == sum(int((b["labels"] != -100).sum()) for b in val)
    assert result.step == 3 and again.loss == result.loss  # dropout off: deterministic
    for name in before[0]:
        assert torch.equal(before[0][name], after[0][name]), name
        for role in before[1][name]:
            assert torch.equal(before[1][name][role], after[1][name][role]), (name, role)
    assert recorder.evals == [result, again]
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines if line.get("event") == "eval"] == [result.loss, again.loss]


def test_training_after_evaluation_is_unchanged():
    model = DropoutLM()
    config = horizon.TrainConfig(grad_clip_norm=1.0)
    data, val = batches(4, vocab=64), batches(2, vocab=64, seed=9)
    torch.manual_seed(3)
    with horizon.Trainer(copy.deepcopy(model), config) as trainer:
        plain = [trainer.step(b).loss for b in data]
    torch.manual_seed(3)
    with horizon.Trainer(copy.deepcopy(model), config) as trainer:
        interleaved = []
        for b in data:
            interleaved.append(trainer.step(b).loss)
            trainer.evaluate(val)
    assert interleaved == plain


def test_bad_eval_input():
    with horizon.Trainer(tiny_decoder(), horizon.TrainConfig()) as trainer:
        with pytest.raises(ValueError, match="no batches"):
            trainer.evaluate([])
        with pytest.raises(ValueError, match="labels"):
            trainer.evaluate([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_eval_with_padding_equals_the_hf_forward(family):
    """attention_mask and position_ids reach every unit: left-padded batches score as HF's own forward does."""
    pytest.importorskip("transformers")
    from test_hf import tiny_hf
    from test_hf_padding import left_padded, sequences

    model = tiny_hf(family)
    val = [left_padded(sequences(step)) for step in range(2)]
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(grad_clip_norm=1.0)) as trainer:
        trainer.step(left_padded(sequences(7)))
        result = trainer.evaluate(val)
        state = {k: v.clone() for k, v in trainer.state_dict().items()}
    model.load_state_dict(state)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in val:
            logits = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((b["labels"] != -100).sum())
    assert result.tokens == count and result.loss == pytest.approx(total / count, rel=1e-6, abs=0)
