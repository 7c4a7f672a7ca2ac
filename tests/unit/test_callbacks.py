"""Callbacks and the JSONL metrics log: what they receive equals what step() returned and what was committed."""

import json
import os

import pytest

import horizon
from helpers import batches, tiny_decoder


class Recorder(horizon.Callback):
    def __init__(self):
        self.events = []

    def on_step_end(self, trainer, metrics):
        self.events.append(("step", metrics.step, trainer.global_step, metrics))

    def on_checkpoint(self, trainer, step, path):
        self.events.append(("checkpoint", step, os.path.isfile(os.path.join(path, "manifest.json")), path))


def test_jsonl_has_one_line_per_update_equal_to_the_returned_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recorder = Recorder()
    config = horizon.TrainConfig(grad_accum_steps=2, grad_clip_norm=1.0, metrics_jsonl=str(path))
    with horizon.Trainer(tiny_decoder(), config, callbacks=[recorder]) as trainer:
        returned = [trainer.step(b) for b in batches(6)]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    updates = [m for m in returned if m.updated]
    assert [line["step"] for line in lines] == [1, 2, 3] == [m.step for m in updates]
    for line, m in zip(lines, updates):
        assert line["loss"] == m.loss and line["tokens"] == m.tokens and line["grad_norm"] == m.grad_norm
        assert line["tokens_per_s"] == pytest.approx(m.tokens / m.seconds)
    assert [(e[1], e[2]) for e in recorder.events] == [(1, 1), (2, 2), (3, 3)]  # after each update, not mid-way
    assert [e[3] for e in recorder.events] == updates


def test_on_checkpoint_once_per_committed_checkpoint(tmp_path):
    recorder = Recorder()
    ckpt = horizon.CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=2, keep_last=10)
    trainer = horizon.Trainer(tiny_decoder(), horizon.TrainConfig(checkpoint=ckpt,
                                                                  metrics_jsonl=str(tmp_path / "m.jsonl")),
                              callbacks=[recorder])
    for b in batches(5):
        trainer.step(b)
    trainer.close()  # the final checkpoint (step 5) is announced too
    announced = [e for e in recorder.events if e[0] == "checkpoint"]
    committed = sorted(int(name.split("-")[1]) for name in os.listdir(tmp_path / "ckpt") if name.startswith("step-"))
    assert [e[1] for e in announced] == committed and committed[-1] == 5
    assert all(e[2] for e in announced)  # the manifest existed when the callback ran
    logged = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("event") == "checkpoint"] == committed


def test_bad_callbacks_and_paths(tmp_path):
    with pytest.raises(ValueError, match="has none of"):
        horizon.Trainer(tiny_decoder(), callbacks=[object()])
    with pytest.raises(ValueError, match="does not exist; create it first"):
        horizon.Trainer(tiny_decoder(), horizon.TrainConfig(metrics_jsonl=str(tmp_path / "no" / "m.jsonl")))
    with pytest.raises(ValueError, match="is a directory"):
        horizon.TrainConfig(metrics_jsonl=str(tmp_path))


def test_tensorboard_scalars_equal_the_returned_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = horizon.TrainConfig(grad_clip_norm=1.0, tensorboard_dir=str(tmp_path / "tb"))
    with horizon.Trainer(tiny_decoder(), config) as trainer:
        returned = [trainer.step(b) for b in batches(3)]
        evaluated = trainer.evaluate(batches(1, seed=5))
        memory = trainer.memory()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    assert scalars("train/loss") == [(m.step, pytest.approx(m.loss)) for m in returned]
    assert scalars("train/grad_norm") == [(m.step, pytest.approx(m.grad_norm)) for m in returned]
    assert scalars("eval/loss") == [(3, pytest.approx(evaluated.loss))]
    assert scalars("memory/host_bytes")[-1] == (3, memory.host_bytes)


def test_tensorboard_dir_without_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match="pip install tensorboard"):
        horizon.TrainConfig(tensorboard_dir=str(tmp_path / "tb"))
    assert not (tmp_path / "tb").exists()
