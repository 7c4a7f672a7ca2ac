"""Recycled shard files (``checkpoint/recycle.py``): later checkpoints are written over the files of the
ones retention deleted and hold exactly their own bytes; the pool never holds more than one checkpoint's
files; ``recycle_files=False`` deletes them. The power-loss test covers recycling's fsyncs."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load_file

import horizon
from horizon.checkpoint import Disk, shard
from horizon.checkpoint.commit import committed_steps, step_dir_name
from horizon.checkpoint.recycle import POOL, FilePool
from horizon.io import ALIGN_BYTES, aligned_empty
from ckpt_helpers import checkpoint_state, config, data, model, reference_states, states_equal


def _shard_inodes(directory: str) -> set[int]:
    return {os.stat(os.path.join(directory, n)).st_ino for n in os.listdir(directory) if n.endswith(".safetensors")}


def test_later_checkpoints_are_written_over_retired_files_and_load_bit_exact(tmp_path):
    _, states = reference_states(6)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=1, keep_last=2, final_save=False)
    inodes = {}
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        for b in data(6):
            trainer.step(b)
            flight = trainer.checkpointer.wait()
            inodes[trainer.global_step] = _shard_inodes(flight.path)
            pool = os.path.join(tmp_path, POOL)
            assert not os.path.isdir(pool) or len(os.listdir(pool)) <= len(inodes[1])  # one checkpoint's files
    # The commit of step s + 2 retires step s into the pool; checkpoint s + 3 takes its files.
    assert [inodes[s + 3] == inodes[s] for s in (1, 2, 3)] == [True] * 3, inodes
    assert len(inodes[1]) == len(inodes[2]) > 0 and not inodes[1] & inodes[2]
    assert committed_steps(tmp_path) == [5, 6]
    for s in (5, 6):
        assert states_equal(checkpoint_state(os.path.join(tmp_path, step_dir_name(s))), states[s])


def test_without_recycling_retired_files_are_deleted(tmp_path):
    _, states = reference_states(4)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, every_steps=1, keep_last=2, final_save=False, recycle_files=False)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        for b in data(4):
            trainer.step(b)
            trainer.checkpointer.wait()
    assert committed_steps(tmp_path) == [3, 4] and not os.path.exists(os.path.join(tmp_path, POOL))
    assert os.listdir(os.path.join(tmp_path, ".trash")) == []  # retention's deletes went through
    assert states_equal(checkpoint_state(os.path.join(tmp_path, step_dir_name(4))), states[4])


def _pool_with(tmp_path, sizes: list[int]) -> FilePool:
    """A pool holding one file of each size (random bytes), as retention leaves it."""
    retired = tmp_path / "retired"
    retired.mkdir()
    for i, size in enumerate(sizes):
        (retired / f"shard-{i}.safetensors").write_bytes(os.urandom(size))
    pool = FilePool(str(tmp_path), Disk())
    assert pool.retire(str(retired)) == len(sizes)
    return pool


def test_take_prefers_the_smallest_file_that_fits_else_the_largest(tmp_path):
    pool = _pool_with(tmp_path, [10_000, 100_000, 1_000_000])
    got = []
    for i, nbytes in enumerate([50_000, 5_000_000, 1]):
        fd, size = pool.take(str(tmp_path / f"taken-{i}"), nbytes)
        os.close(fd)
        got.append((size, os.path.getsize(tmp_path / f"taken-{i}")))
    assert got == [(100_000, 100_000), (1_000_000, 1_000_000), (10_000, 10_000)]
    assert pool.take(str(tmp_path / "none"), 1) is None and os.listdir(pool.path) == []


def test_a_recycled_file_longer_or_shorter_than_the_shard_ends_up_exactly_the_shard(tmp_path):
    torch.manual_seed(0)
    numel = 3000  # 12000 bytes of data: ends mid-page
    buffer = aligned_empty(-(-4 * numel // ALIGN_BYTES) * ALIGN_BYTES)
    t = buffer[:4 * numel].view(torch.float32)
    t.copy_(torch.randn(numel))
    for old_bytes in (1 << 20, 5000):
        root = tmp_path / str(old_bytes)
        root.mkdir()
        pool = _pool_with(root, [old_bytes])
        (pooled,) = os.listdir(pool.path)
        inode = os.stat(os.path.join(pool.path, pooled)).st_ino
        path = str(root / "s.safetensors")
        with ThreadPoolExecutor(shard.QUEUE_DEPTH) as writers:
            pending = shard.start_shard(path, [("t", t)], buffer=buffer, metadata={}, disk=Disk(), writers=writers,
                                        deadline_s=time.monotonic() + 60, pool=pool)
            nbytes, _ = pending.finish()
        assert pending.recycled and os.stat(path).st_ino == inode
        assert os.path.getsize(path) == nbytes
        assert torch.equal(load_file(path)["t"].view(torch.int32), t.view(torch.int32))
