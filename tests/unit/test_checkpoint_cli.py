"""``horizon checkpoint list|verify|export``: against the trainer's own state and safetensors' loader."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

import horizon
from horizon.checkpoint.commit import step_dir_name
from horizon.cli.main import main
from horizon.models import Decoder, DecoderConfig
from horizon.store import format_bytes
from ckpt_helpers import config, data, model


def _train(root, steps=2):
    ckpt = horizon.CheckpointConfig(dir=root, every_steps=1)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        for b in data(steps):
            trainer.step(b)
        return {k: v.clone() for k, v in trainer.state_dict().items()}


def test_list_and_verify(tmp_path, capsys):
    _train(tmp_path, steps=3)  # retention moves step 1's files into the recycling pool
    assert main(["checkpoint", "list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step-000000002" in out and "step-000000003" in out and out.count("committed") == 2
    pool = next(line for line in out.splitlines() if line.startswith(".recycle"))
    assert "recycling pool" in pool and format_bytes(sum(
        os.path.getsize(os.path.join(tmp_path, ".recycle", f)) for f in os.listdir(tmp_path / ".recycle"))) in pool
    assert main(["checkpoint", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("ok ") == 2
    shard = os.path.join(tmp_path, step_dir_name(3), "shard-00001-of-00004.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    assert main(["checkpoint", "verify", str(tmp_path)]) == 1
    assert "CRC-32" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(tmp_path, step_dir_name(3)))  # verify only reads


def test_export_loads_back_into_the_model(tmp_path):
    state = _train(tmp_path / "ckpt")
    assert main(["checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    fresh = Decoder(DecoderConfig(**cfg))
    fresh.load_state_dict(weights)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)


def test_export_in_shards_with_an_index(tmp_path):
    state = _train(tmp_path / "ckpt", steps=1)
    assert main(["checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype",
                 "bfloat16", "--max-shard-bytes", "40000"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and set(index["weight_map"]) == set(state)
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / "hf" / f))
    assert all(torch.equal(loaded[k], state[k].to(torch.bfloat16)) for k in state)
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in state.values())
