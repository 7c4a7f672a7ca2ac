"""Every subcommand that prints a table prints exactly one JSON document with --json."""

from __future__ import annotations

import json
import os

import horizon
from horizon.checkpoint.commit import step_dir_name
from horizon.cli.main import main
from ckpt_helpers import config, data, model


def _one_document(capsys, argv, code=0):
    assert main(argv + ["--json"]) == code
    return json.loads(capsys.readouterr().out)  # fails on anything but exactly one document


def test_checkpoint_list_verify_export(tmp_path, capsys):
    with horizon.Trainer(model(), config(horizon.CheckpointConfig(dir=tmp_path / "ckpt", every_steps=1))) as trainer:
        for b in data(2):
            trainer.step(b)
    root = str(tmp_path / "ckpt")
    listed = _one_document(capsys, ["checkpoint", "list", root])
    committed = [c for c in listed["checkpoints"] if c["state"] == "committed"]
    assert [(c["name"], c["step"]) for c in committed] == [(step_dir_name(1), 1), (step_dir_name(2), 2)]
    assert all(c["bytes"] == sum(os.path.getsize(os.path.join(root, c["name"], f))
                                 for f in os.listdir(os.path.join(root, c["name"]))) for c in committed)
    verified = _one_document(capsys, ["checkpoint", "verify", root])
    assert verified["ok"] and [c["step"] for c in verified["checkpoints"]] == [1, 2]
    shard = os.path.join(root, step_dir_name(2), "shard-00001-of-00004.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    verified = _one_document(capsys, ["checkpoint", "verify", root], code=1)
    assert not verified["ok"] and [c["ok"] for c in verified["checkpoints"]] == [True, False]
    assert "CRC-32" in verified["checkpoints"][1]["error"]
    exported = _one_document(capsys, ["checkpoint", "export", root, "--step", "1", "--out", str(tmp_path / "hf")])
    assert sorted(exported["files"]) == sorted(os.listdir(tmp_path / "hf"))


def test_profile_plan_estimate(tmp_path, capsys):
    out = tmp_path / "profile.json"
    profile = _one_document(capsys, ["profile", "--model", "tiny", "--num-layers", "2", "--seq-len", "8",
                                     "--device", "cpu", "--rounds", "1", "--out", str(out)])
    assert profile["out"] == str(out) and {**json.loads(out.read_text()), "out": str(out)} == profile
    plan = _one_document(capsys, ["plan", "--profile", str(out), "--budget", "1GiB", "--solver", "greedy"])
    assert [u["unit"] for u in plan["units"]] == [b["name"] for b in profile["profile"]["units"]][1:-1]
    estimate = _one_document(capsys, ["estimate", "--model", "tiny", "--seq-len", "8"])
    assert estimate["host_bytes"] == sum(estimate["host_bytes_by_role"].values())
