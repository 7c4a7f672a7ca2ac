"""Power loss at every point of four checkpoints with retention: in every disk state POSIX allows
(``power_loss.crash_states``), resume loads the newest committed step or a newer complete one, byte
for byte as written, never a corrupt one, never an older one. Step 4 is written over the
recycled files of step 1, which retention deleted. Negative controls: the same trace without one of the
protocol's fsyncs must produce a state that loses a committed step."""

from __future__ import annotations

import os

import pytest

import horizon
from horizon.checkpoint.load import NoValidCheckpoint, find_valid
from horizon.checkpoint.recycle import POOL
from ckpt_helpers import config, data, model
from power_loss import ROOT_INO, RecordingDisk, crash_states, materialize, without

STEPS = 4  # keep_last=2: retention deletes steps 1 and 2 along the way


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The trace of a run that checkpoints every step, the layout hash, and each step directory as written."""
    root = str(tmp_path_factory.mktemp("recorded"))
    disk = RecordingDisk(root)
    ckpt = horizon.CheckpointConfig(dir=root, every_steps=1, keep_last=2, final_save=False)
    written = {}
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=disk) as trainer:
        for b in data(STEPS):
            trainer.step(b)
            flight = trainer.checkpointer.wait()
            written[os.path.basename(flight.path)] = _read_dir(flight.path)  # before retention can delete it
        layout_hash = trainer.checkpointer.layout_hash
    return disk.trace, layout_hash, written


def _read_dir(directory: str) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def _violations(trace, layout_hash, written, scratch: str, *, stop_at_first: bool) -> tuple[list[str], dict]:
    """Every crash state checked with the real loader; (what went wrong, counts of what was loaded)."""
    problems, loaded = [], {}
    for n, (tree, committed) in enumerate(crash_states(trace)):
        root = os.path.join(scratch, f"state-{n}")
        materialize(tree, root)
        try:
            found = find_valid(root, layout_hash=layout_hash, allow_fresh_start=False)
        except NoValidCheckpoint as e:
            found, problem = None, f"refused to start: {e}"
        else:
            problem = None
        got = os.path.basename(found[0]) if found else None
        loaded[got] = loaded.get(got, 0) + 1
        if problem is None and committed is not None and (got is None or got < committed):
            problem = f"loaded {got}, but {committed} was committed before the power cut"
        if problem is None and got is not None and _read_dir(found[0]) != written[got]:
            problem = f"loaded {got}, whose files differ from what was written"
        if problem is not None:
            problems.append(f"{problem} (state: {sorted(p for p in tree if p.count('/') < 1)})")
            if stop_at_first:
                break
    return problems, loaded


def test_every_power_loss_state_resumes_from_the_newest_committed_step(recorded, tmp_path):
    trace, layout_hash, written = recorded
    kinds = {op.kind for op in trace}
    assert {"create", "write", "truncate", "fsync", "fsync_dir", "rename", "unlink", "committed"} <= kinds, kinds
    assert sum(op.kind == "committed" for op in trace) == STEPS
    problems, loaded = _violations(trace, layout_hash, written, str(tmp_path), stop_at_first=False)
    assert not problems, problems[:5]
    # Not vacuous: the states include cuts before any commit (nothing to load) and every step loaded
    # in some state (each one also as the fallback while the next one's rename was not yet durable).
    assert None in loaded and all(name in loaded for name in written), loaded
    assert sum(loaded.values()) > 500, loaded


def _pool_dirs(trace) -> set[int]:
    """The inodes the recycling pool's directory had (retention empties it by recreating it)."""
    return {op.arg[0] for op in trace if op.kind == "create" and op.name == POOL}


def test_later_checkpoints_are_written_over_recycled_files(recorded):
    """Not vacuous for recycling: step 4 is written over the files of step 1, which retention moved into the pool."""
    trace, _, _ = recorded
    pools = _pool_dirs(trace)
    taken = [op for op in trace if op.kind == "rename" and op.ino in pools]
    assert pools and len(taken) >= 4, (pools, taken)


def test_a_pool_without_its_fsyncs_loses_a_committed_step(recorded, tmp_path):
    """Negative control for the pool's fsyncs (retention's after filling it, the writer's after taking
    from it): without them the rename of a recycled file into a committed step may be lost."""
    trace, layout_hash, written = recorded
    pools = _pool_dirs(trace)
    broken = without(trace, lambda op, i: op.kind == "fsync_dir" and op.ino in pools)
    assert len(broken) < len(trace)
    problems, _ = _violations(broken, layout_hash, written, str(tmp_path), stop_at_first=True)
    assert problems, "without the pool's fsyncs, some power cut must lose a committed checkpoint"


NEGATIVE_CONTROLS = {
    "no fsync of the shards and the manifest": lambda op, i: op.kind == "fsync",
    "no fsync of the in-flight directory": lambda op, i: op.kind == "fsync_dir" and op.ino != ROOT_INO,
    "no fsync of the root after the rename": lambda op, i: op.kind == "fsync_dir" and op.ino == ROOT_INO,
}


@pytest.mark.parametrize("omitted", list(NEGATIVE_CONTROLS))
def test_a_protocol_missing_an_fsync_loses_a_committed_step(recorded, tmp_path, omitted):
    trace, layout_hash, written = recorded
    broken = without(trace, NEGATIVE_CONTROLS[omitted])
    assert len(broken) < len(trace)
    problems, _ = _violations(broken, layout_hash, written, str(tmp_path), stop_at_first=True)
    assert problems, f"with {omitted}, some power cut must lose a committed checkpoint"
