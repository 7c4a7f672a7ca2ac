"""kill -9 of one rank while a sharded checkpoint is written (issues 6 and 9): the other rank fails with an
error instead of hanging, nothing half-written becomes visible, and two new ranks resume from the newest
committed step and end bit for bit where an uninterrupted run ends."""

import signal
from pathlib import Path

import pytest
import torch

from horizon.checkpoint.commit import committed_steps
from launch import start_ranks

WORLD_SIZE = 2
CHILD = Path(__file__).parent / "sharded_crash_child.py"
UNITS = 5  # the tiny decoder with 3 blocks: embedding, 3 blocks, head


def _wait(procs) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        results.append((proc.returncode, stdout, stderr))
    return results


def _launch(ckpt: Path, out: Path, *mode: str) -> list[tuple[int, str, str]]:
    return _wait(start_ranks([CHILD, ckpt, out, *mode], WORLD_SIZE))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("straight")
    for rank, (code, stdout, stderr) in enumerate(_launch(root / "ckpt", root / "out", "straight")):
        assert code == 0, f"rank {rank}:\n{stdout}\n{stderr}"
    return [torch.load(f"{root / 'out'}.rank{r}") for r in range(WORLD_SIZE)]


# (rank killed, protocol point, nth time): rank 0 with the step-4 manifest written but not renamed;
# rank 1 after its first shard file of the step-4 checkpoint.
KILLS = {"committer_before_rename": (0, "before_rename", 2), "writer_mid_checkpoint": (1, "shard_written", UNITS + 1)}


@pytest.mark.parametrize("kill", list(KILLS))
def test_a_rank_killed_while_checkpointing_resumes_to_the_uninterrupted_end(straight, tmp_path, kill):
    killed, point, nth = KILLS[kill]
    ckpt = tmp_path / "ckpt"
    results = _launch(ckpt, tmp_path / "killed", "kill", str(killed), point, str(nth))
    assert results[killed][0] == -signal.SIGKILL
    survivor_code, _, survivor_err = results[1 - killed]
    assert survivor_code != 0 and ("PeerFailure" in survivor_err or "CheckpointError" in survivor_err), survivor_err
    assert committed_steps(str(ckpt)) == [2]  # step 4 never became visible
    for rank, (code, stdout, stderr) in enumerate(_launch(ckpt, tmp_path / "resumed", "resume")):
        assert code == 0, f"rank {rank}:\n{stdout}\n{stderr}"
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".inflight")]  # the dead run's leftovers are gone
    for rank in range(WORLD_SIZE):
        resumed = torch.load(f"{tmp_path / 'resumed'}.rank{rank}")
        assert resumed["resumed_at"] == 2
        assert resumed["losses"] == straight[rank]["losses"][2:]
        assert all(torch.equal(resumed["state"][k], straight[rank]["state"][k]) for k in resumed["state"])
