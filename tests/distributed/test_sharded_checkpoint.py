"""Checkpoints of a sharded run (issues 6 and 9): every rank writes its shards, rank 0 commits; resume on
2 ranks bit for bit, reshard 2 -> 1 and 1 -> 2 from the manifest's slices; failures reach every rank."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import horizon
from dp_cases import CASES, WEIGHT_RTOL, global_batches
from helpers import horizon_run, rel_err, tiny_decoder
from horizon.checkpoint.commit import step_dir_name
from horizon.cli.main import main
from launch import start_ranks

WORLD_SIZE = 2
STEP5 = step_dir_name(5)


def _within(got: list[float], want: list[float], tol: float = 1e-6) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= tol * abs(w) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """One process on the global batches: its losses and weights, and its checkpoint of step 5."""
    root = tmp_path_factory.mktemp("one")
    config = dataclasses.replace(CASES["clip"], checkpoint=horizon.CheckpointConfig(dir=str(root / "ckpt"),
                                                                                    every_steps=5))
    losses, state, _ = horizon_run(tiny_decoder(num_layers=3, tie_embeddings=True), global_batches(), config=config)
    return {"losses": losses, "state": state, "step5": root / "ckpt" / STEP5}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, one_process) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("sharded_ckpt")
    procs = start_ranks([Path(__file__).parent / "sharded_ckpt_child.py", out, one_process["step5"]], WORLD_SIZE)
    for rank, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"rank {rank} failed:\n{stdout}\n{stderr}"
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_the_sharded_run_equals_one_process(ranks, one_process):
    _, results = ranks
    for result in results:
        assert _within(result["straight"]["losses"], one_process["losses"])


def test_every_rank_wrote_its_shards_and_rank0_committed_one_manifest(ranks):
    out, _ = ranks
    manifest = json.loads((out / "ckpt" / STEP5 / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["world_size"] == WORLD_SIZE
    files = sorted(os.listdir(out / "ckpt" / STEP5))
    num_units = len(manifest["layout"])
    assert len(files) == 1 + WORLD_SIZE * num_units
    assert sum(f"rank-{r:05d}-of-00002" in f for f in files for r in range(WORLD_SIZE)) == WORLD_SIZE * num_units
    # Every unit's master, m and v are covered exactly once by the ranks' slices of ceil(n / W) elements.
    for index, unit in enumerate(manifest["layout"]):
        piece = -(-unit["numel"] // WORLD_SIZE)
        for role in ("master", "exp_avg", "exp_avg_sq"):
            slices = sorted((r["offset"], r["shape"][0]) for r in manifest["tensors"].values()
                            if r["unit"] == index and r["role"] == role)
            assert slices == [(rank * piece, piece) for rank in range(WORLD_SIZE)], (unit["name"], role)
    assert not [n for n in os.listdir(out / "ckpt") if n.startswith(".inflight")]


@pytest.mark.parametrize("case", [None, "sharded_eager", "sharded_bf16"])
def test_two_ranks_resume_two_ranks_bit_for_bit(ranks, case):
    _, results = ranks
    for result in results:
        result = result if case is None else result[case]
        straight, resumed = result["straight"], result["two_to_two"]
        assert resumed["resumed_at"] == 5
        assert resumed["losses"] == straight["losses"][5:]
        assert all(torch.equal(resumed["state"][k], straight["state"][k]) for k in straight["state"])


def test_one_process_resumes_a_two_rank_checkpoint(ranks, one_process, tmp_path):
    out, _ = ranks
    shutil.copytree(out / "ckpt" / STEP5, tmp_path / STEP5)
    config = dataclasses.replace(CASES["clip"], checkpoint=horizon.CheckpointConfig(dir=str(tmp_path)), resume=True)
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True, seed=9), config) as trainer:
        assert trainer.global_step == 5
        losses = [trainer.step(b).loss for b in global_batches()[5:]]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    assert _within(losses, one_process["losses"][5:])
    for key, want in one_process["state"].items():
        assert rel_err(state[key], want) <= WEIGHT_RTOL, key


def test_two_ranks_resume_a_one_process_checkpoint(ranks, one_process):
    _, results = ranks
    for result in results:
        assert result["one_to_two"]["resumed_at"] == 5
        assert _within(result["one_to_two"]["losses"], result["straight"]["losses"][5:])
        assert _within(result["one_to_two"]["losses"], one_process["losses"][5:])


def test_cli_verifies_and_exports_a_sharded_checkpoint(ranks, tmp_path, capsys):
    out, results = ranks
    root = tmp_path / "ckpt"
    shutil.copytree(out / "ckpt", root)
    assert main(["checkpoint", "verify", str(root)]) == 0
    assert capsys.readouterr().out.count("ok ") == 2
    assert main(["checkpoint", "export", str(root), "--step", "5", "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    want = results[0]["straight"]["state_at_5"]
    assert set(want) - set(exported) == {"lm_head.weight"}  # tied to embed_tokens.weight: exported once
    assert all(torch.equal(exported[k], want[k]) for k in exported)
    rank1_file = next(f for f in os.listdir(root / STEP5) if "rank-00001" in f)
    with open(root / STEP5 / rank1_file, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    assert main(["checkpoint", "verify", str(root), "--step", "5"]) == 1
    assert "CRC-32" in capsys.readouterr().out


def test_a_write_failure_on_one_rank_fails_the_checkpoint_on_every_rank(ranks):
    _, results = ranks
    for result in results:
        failure = result["failure"]
        assert failure["error"] is not None and "rank 1" in failure["error"] and "No space left" in failure["error"]
        assert failure["listing"] == []  # nothing committed, the in-flight directory removed
        assert failure["path"] is not None and failure["path"].endswith(step_dir_name(3))
    assert results[0]["failure"]["path"] == results[1]["failure"]["path"]


def test_rank0_validates_and_every_rank_hears_its_verdict(ranks):
    """Only rank 0 reads every CRC; a checkpoint it rejects (another model's) raises on every rank."""
    _, results = ranks
    for result in results:
        assert result["wrong_model"] is not None and "holds a different model" in result["wrong_model"]
