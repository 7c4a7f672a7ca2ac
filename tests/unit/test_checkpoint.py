"""Checkpoints: bit-exact round trip, snapshot consistency under mutation (and its negative control),
resume equal to an uninterrupted run, corruption, retention, disk full, bounded staging."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest
import torch

import horizon
from horizon.checkpoint import NoValidCheckpoint, read_manifest
from horizon.checkpoint.commit import committed_steps, step_dir_name
from ckpt_helpers import (ROLES, FullDisk, SlowDisk, checkpoint_state, config, data, model, reference_states,
                          same_bytes, states_equal, unit_state)


class Cursor:
    """A stand-in data loader position (anything with state_dict / load_state_dict)."""

    def __init__(self) -> None:
        self.index = 0

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def test_round_trip_is_bit_exact(tmp_path):
    ckpt = horizon.CheckpointConfig(dir=tmp_path)
    cursor = Cursor()
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        trainer.register_data(cursor)
        for b in data(3):
            trainer.step(b)
            cursor.index += 1
        trainer.updater.wait_all()
        master = trainer.store.units[1].master  # payloads allclose would miss: -0.0 and a NaN with a payload
        master[0] = -0.0
        master[1:2].view(torch.int32).fill_(0x7FC01234)
        random.seed(7), np.random.seed(7)
        expected_rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
        saved = unit_state(trainer)
        path = trainer.save(wait=True)
        tokens_seen = trainer.tokens_seen
    assert path == os.path.join(tmp_path, step_dir_name(3))
    assert states_equal(checkpoint_state(path), saved)
    manifest = read_manifest(path)
    assert manifest["step"] == 3 and manifest["train_state"]["adam_steps"] == [3] * len(saved)
    assert manifest["model_config"]["num_layers"] == 2
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    cursor2 = Cursor()
    with horizon.Trainer(tiny_other(), config(ckpt, resume=True)) as resumed:
        resumed.register_data(cursor2)
        assert states_equal(unit_state(resumed), saved)
        assert (resumed.global_step, resumed.skipped_steps, resumed.tokens_seen) == (3, 0, tokens_seen)
        assert [int(s) for s in resumed.updater.steps] == [3] * len(saved)
        assert cursor2.index == 3
        assert random.getstate() == expected_rng[0]
        assert (np.random.get_state()[1] == expected_rng[1]).all()
        assert torch.equal(torch.get_rng_state(), expected_rng[2])


def tiny_other():
    from helpers import tiny_decoder

    return tiny_decoder(num_layers=2, seed=99)  # same shape, other weights: resume must overwrite them all


@pytest.mark.parametrize("eager", [False, True], ids=["deferred", "eager"])
def test_resume_gives_the_uninterrupted_losses_bit_for_bit(tmp_path, eager):
    losses, states = reference_states(6, eager=eager)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=2)
    batches = data(6)
    with horizon.Trainer(model(), config(ckpt, eager=eager)) as trainer:
        first = [trainer.step(b).loss for b in batches[:3]]  # checkpoint at 2; the final save at close: 3
    assert committed_steps(tmp_path) == [2, 3]
    with horizon.Trainer(tiny_other(), config(ckpt, eager=eager, resume=True)) as trainer:
        assert trainer.global_step == 3
        rest = [trainer.step(b).loss for b in batches[3:]]
        final = unit_state(trainer)
    assert first + rest == losses
    assert states_equal(final, states[6])


def _page_pieces(monkeypatch) -> None:
    """Copy units a page at a time and queue writes a page at a time: this model's units of a few KB are
    then streamed to disk piece by piece while their copy runs."""
    monkeypatch.setattr(horizon.checkpoint.snapshot, "COPY_PIECE_BYTES", 4096)
    monkeypatch.setattr(horizon.checkpoint.shard, "MIN_WRITE_BYTES", 4096)


@pytest.mark.parametrize("eager, pieces", [(False, False), (True, False), (False, True)],
                         ids=["deferred", "eager", "deferred-page-pieces"])
def test_snapshot_is_version_s_while_training_mutates_the_state(tmp_path, monkeypatch, eager, pieces):
    """A slow writer and a one-unit staging ring force the copy-on-write path while later steps run."""
    if pieces:
        _page_pieces(monkeypatch)
    _, states = reference_states(6, eager=eager)
    slot = horizon.checkpoint.manager.staging_plan(horizon.CheckpointConfig(dir=tmp_path),
                                                   [u.layout for u in _store_of(eager)])[0]
    ckpt = horizon.CheckpointConfig(dir=tmp_path, staging_bytes=slot, final_save=False)
    with horizon.Trainer(model(), config(ckpt, eager=eager), checkpoint_disk=SlowDisk(0.1)) as trainer:
        batches = data(6)
        for b in batches[:2]:
            trainer.step(b)
        trainer.save()
        flight, mutating_unix_s = trainer.checkpointer._flight, time.time()
        for b in batches[2:]:
            trainer.step(b)  # steps 3..6 update every unit while step 2 is being written
        assert trainer.checkpointer.ring.peak_in_use == 1
        path = trainer.save(wait=True)
        assert trainer.checkpointer.wait().error is None
    assert flight.error is None and flight.requested_unix_s + flight.durable_s > mutating_unix_s  # overlapped
    assert flight.snapshot.blocked_s > 0  # the optimizer did wait at the barrier (one slot, slow disk)
    assert states_equal(checkpoint_state(os.path.join(tmp_path, step_dir_name(2))), states[2])
    assert states_equal(checkpoint_state(path), states[6])


@pytest.mark.parametrize("pieces", [False, True], ids=["units", "page-pieces"])
def test_negative_control_without_the_barrier_the_snapshot_is_torn(tmp_path, monkeypatch, pieces):
    if pieces:
        _page_pieces(monkeypatch)
    _, states = reference_states(5)
    slot = horizon.checkpoint.manager.staging_plan(horizon.CheckpointConfig(dir=tmp_path),
                                                   [u.layout for u in _store_of(False)])[0]
    ckpt = horizon.CheckpointConfig(dir=tmp_path, staging_bytes=slot, final_save=False)
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=SlowDisk(0.1)) as trainer:
        trainer.checkpointer.barrier_enabled = False
        batches = data(5)
        for b in batches[:2]:
            trainer.step(b)
        trainer.save()
        for b in batches[2:]:
            trainer.step(b)
        trainer.checkpointer.wait()
    saved = checkpoint_state(os.path.join(tmp_path, step_dir_name(2)))
    torn = [(u, r) for u in range(len(saved)) for r in ROLES if not same_bytes(saved[u][r], states[2][u][r])]
    assert torn, "with the barrier off, later steps must leak into the snapshot (else the test proves nothing)"


def _store_of(eager):
    with horizon.Trainer(model(), config(eager=eager)) as trainer:
        return trainer.store.units


def _two_checkpoints(root):
    ckpt = horizon.CheckpointConfig(dir=root, every_steps=2, final_save=False)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        for b in data(4):
            trainer.step(b)
    assert committed_steps(root) == [2, 4]
    return ckpt


def _shard(directory):
    return os.path.join(directory, sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[1])


def _flip_byte(d):
    path = _shard(d)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def _truncate(d):
    path = _shard(d)
    os.truncate(path, os.path.getsize(path) - 8)


def _edit_manifest(d, **changes):
    path = os.path.join(d, "manifest.json")
    manifest = json.loads(open(path).read())
    manifest.update(changes)
    open(path, "w").write(json.dumps(manifest))


CORRUPTIONS = {
    "flipped_byte": _flip_byte,
    "truncated_shard": _truncate,
    "missing_shard": lambda d: os.remove(_shard(d)),
    "missing_manifest": lambda d: os.remove(os.path.join(d, "manifest.json")),
    "garbage_manifest": lambda d: open(os.path.join(d, "manifest.json"), "w").write("{not json"),
    "unknown_format_version": lambda d: _edit_manifest(d, format_version=99),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupt_newest_is_quarantined_and_the_older_one_loads(tmp_path, corrupt):
    _, states = reference_states(2)
    ckpt = _two_checkpoints(tmp_path)
    CORRUPTIONS[corrupt](os.path.join(tmp_path, step_dir_name(4)))
    with pytest.raises(horizon.checkpoint.CorruptCheckpoint):
        horizon.checkpoint.verify(os.path.join(tmp_path, step_dir_name(4)))
    with horizon.Trainer(tiny_other(), config(ckpt, resume=True)) as trainer:
        assert trainer.global_step == 2
        assert states_equal(unit_state(trainer), states[2])
    assert committed_steps(tmp_path) == [2]
    assert any(".corrupt-" in name and name.startswith(step_dir_name(4)) for name in os.listdir(tmp_path))


def test_all_corrupt_refuses_to_start_unless_allowed(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    for step in (2, 4):
        _flip_byte(os.path.join(tmp_path, step_dir_name(step)))
    with pytest.raises(NoValidCheckpoint, match="allow_fresh_start"):
        horizon.Trainer(tiny_other(), config(ckpt, resume=True))
    fresh = horizon.CheckpointConfig(dir=tmp_path, allow_fresh_start=True)
    with horizon.Trainer(tiny_other(), config(fresh, resume=True)) as trainer:
        assert trainer.global_step == 0


def test_a_different_model_is_refused_not_quarantined(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    from helpers import tiny_decoder

    with pytest.raises(ValueError, match="different model"):
        horizon.Trainer(tiny_decoder(num_layers=3), config(ckpt, resume=True))
    assert committed_steps(tmp_path) == [2, 4]


def test_retention_keeps_the_last_k_and_the_milestones(tmp_path):
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=1, keep_last=2, keep_every=3)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        for b in data(7):
            trainer.step(b)
            trainer.checkpointer.wait()
            steps = committed_steps(tmp_path)
            assert steps[-1] == trainer.global_step  # the newest always survives
    assert committed_steps(tmp_path) == [3, 6, 7]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".inflight")]


def test_disk_full_aborts_that_checkpoint_only(tmp_path):
    losses, states = reference_states(4)
    disk = FullDisk()
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=2)
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=disk) as trainer:
        batches, got, errors = data(4), [], []
        disk.full = True
        for i, b in enumerate(batches):
            m = trainer.step(b)
            got.append(m.loss)
            errors.append(m.checkpoint_errors)
            if i == 1:
                trainer.checkpointer.wait()
                disk.full = False
        final = unit_state(trainer)
    assert got == losses and states_equal(final, states[4])  # the barrier was released: no deadlock, no change
    assert errors[0] == errors[1] == errors[3] == ()
    assert len(errors[2]) == 1 and "No space left on device" in errors[2][0]
    assert committed_steps(tmp_path) == [4]
    assert states_equal(checkpoint_state(os.path.join(tmp_path, step_dir_name(4))), states[4])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".inflight")]


def test_staging_is_bounded_and_on_busy_skip_skips(tmp_path):
    units = _store_of(False)
    slot = horizon.checkpoint.manager.staging_plan(horizon.CheckpointConfig(dir=tmp_path), [u.layout for u in units])[0]
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=1, staging_bytes=2 * slot + 1, on_busy="skip",
                                    final_save=False, keep_last=100)
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=SlowDisk(0.01)) as trainer:
        for b in data(6):
            trainer.step(b)
        trainer.checkpointer.wait()
        ring, cp = trainer.checkpointer.ring, trainer.checkpointer
        assert ring.num_slots == 2 and ring.nbytes == 2 * slot and ring.peak_in_use <= 2
        assert cp.num_skipped > 0 and cp.num_taken + cp.num_skipped == 6
    assert len(committed_steps(tmp_path)) == cp.num_taken


def test_timeout_aborts_and_reports(tmp_path):
    ckpt = horizon.CheckpointConfig(dir=tmp_path, timeout_s=0.05, final_save=False)
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=SlowDisk(0.05)) as trainer:
        trainer.step(data(1)[0])
        with pytest.raises(horizon.checkpoint.CheckpointError, match="TimeoutError"):
            trainer.save(wait=True)
    assert committed_steps(tmp_path) == []


def test_leftovers_of_a_dead_run_are_cleaned_and_existing_checkpoints_need_resume(tmp_path):
    ckpt = _two_checkpoints(tmp_path)
    os.mkdir(os.path.join(tmp_path, ".inflight.step-000000006.dead"))
    with pytest.raises(ValueError, match="resume=True"):
        horizon.Trainer(model(), config(ckpt))
    with horizon.Trainer(model(), config(ckpt, resume=True)):
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".inflight")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_last=1), "keep_last"), (dict(every_steps=0), "every_steps"), (dict(on_busy="drop"), "on_busy"),
    (dict(staging_bytes=-1), "staging_bytes"), (dict(timeout_s=0), "timeout_s"), (dict(keep_every=0), "keep_every"),
    (dict(recycle_files="yes"), "recycle_files"),
])
def test_bad_checkpoint_config_says_what_to_fix(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        horizon.CheckpointConfig(dir=tmp_path, **kwargs)


def test_staging_too_small_and_resume_without_dir_are_refused_before_allocating(tmp_path):
    with pytest.raises(ValueError, match="staging_bytes"):
        horizon.Trainer(model(), config(horizon.CheckpointConfig(dir=tmp_path, staging_bytes=100)))
    with pytest.raises(ValueError, match="resume"):
        horizon.TrainConfig(resume=True)
    assert not os.listdir(tmp_path)


def test_an_abort_between_the_writers_wait_and_its_read_of_the_slot_reports_the_abort(tmp_path, monkeypatch):
    """The interleaving a CI run hit: the writer sees unit 0 staged, then the copier fails and its abort
    releases that slot before the writer reads it. The checkpoint must fail with the copier's error (it
    failed with ``KeyError: 0``), and the next one must commit."""
    from horizon.checkpoint.snapshot import Snapshot

    real_wait, aborted = Snapshot.wait_started, []

    def wait_then_abort(self, unit, deadline_s):
        real_wait(self, unit, deadline_s)
        if not aborted:
            aborted.append(unit)
            self.copier_error = "OSError: injected after the wait"
            self.abort()

    monkeypatch.setattr(Snapshot, "wait_started", wait_then_abort)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=2, timeout_s=30)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        for b in data(2):
            trainer.step(b)
        flight = trainer.checkpointer.wait()
        assert flight.path is None and "aborted: the copier failed: OSError: injected after the wait" in flight.error
        for b in data(4)[2:]:
            trainer.step(b)
        trainer.checkpointer.wait()
    assert committed_steps(str(tmp_path)) == [4]


def test_a_failing_copier_aborts_that_checkpoint_only(tmp_path, monkeypatch):
    """An exception in the copier thread must not leave a unit half-claimed (the optimizer and the writer
    would wait for it forever): that checkpoint fails with the copier's error, training is unchanged,
    and the next checkpoint commits."""
    from horizon.checkpoint.snapshot import Snapshot

    losses, states = reference_states(4)
    real_copy, calls = Snapshot._copy, []

    def copy_failing_once(self, unit):
        calls.append(unit)
        if len(calls) == 2:
            raise OSError("injected copy failure")
        return real_copy(self, unit)

    monkeypatch.setattr(Snapshot, "_copy", copy_failing_once)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=2, timeout_s=30)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        got = [trainer.step(b).loss for b in data(2)]
        flight = trainer.checkpointer.wait()
        assert flight.path is None and "the copier failed: OSError: injected copy failure" in flight.error
        got += [trainer.step(b).loss for b in data(4)[2:]]
        trainer.checkpointer.wait()
        final = unit_state(trainer)
    assert got == losses and states_equal(final, states[4])
    assert committed_steps(str(tmp_path)) == [4]
