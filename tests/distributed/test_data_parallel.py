"""Two gloo ranks equal one process on the concatenated batch (issue 9), over 10 steps."""

from pathlib import Path

import pytest
import torch

from dp_cases import CASES, global_batches
from helpers import horizon_run, rel_err, tiny_decoder
from launch import start_ranks

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    procs = start_ranks(Path(__file__).parent / "dp_child.py", [str(out), "parity"], WORLD_SIZE)
    for rank, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"rank {rank} failed:\n{stdout}\n{stderr}"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_global_batch(ranks_out, name):
    model = tiny_decoder(num_layers=3, tie_embeddings=True)
    ref_losses, ref_state, _ = horizon_run(model, global_batches(), config=CASES[name])
    ranks = [torch.load(ranks_out / f"{name}-rank{r}.pt") for r in range(WORLD_SIZE)]
    for got in ranks:
        assert len(got["losses"]) == len(ref_losses)
        for loss, want in zip(got["losses"], ref_losses):
            assert abs(loss - want) <= 1e-6 * abs(want)
        for key, want in ref_state.items():
            assert rel_err(got["state"][key], want) <= 1e-6, key
    # Every rank applies the same update to the same gradient: the replicas are bitwise equal.
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ref_state)


def test_tokens_are_the_global_label_count(ranks_out):
    batches = global_batches()
    want = [int((b["labels"] != -100).sum()) for b in batches]
    got = torch.load(ranks_out / f"no_clip-rank0.pt")["tokens"]
    assert got == want


def test_gradient_bytes_are_one_model_per_step(ranks_out):
    """Each step all-reduces every unit's fp32 gradient once: 4 bytes per parameter per update."""
    model = tiny_decoder(num_layers=3, tie_embeddings=True)
    numel = sum(p.numel() for p in model.parameters())
    for name, config in CASES.items():
        updates = len(global_batches()) // config.grad_accum_steps
        got = torch.load(ranks_out / f"{name}-rank0.pt")["bytes_reduced"]
        assert got == 4 * numel * updates, name
