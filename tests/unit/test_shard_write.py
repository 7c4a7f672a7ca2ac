"""The shard writer: O_DIRECT, page-aligned data, chunked parallel writes, CRCs, all checked against
safetensors' own reader and zlib."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from horizon.checkpoint import Disk, shard
from horizon.checkpoint.staging import aligned_empty
from horizon.store.layout import ALIGN_BYTES


def _tiled(buffer: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
    """fp32 tensors of ``shapes`` back to back from the start of ``buffer``, filled with random bits."""
    out, offset = [], 0
    for i, shape in enumerate(shapes):
        numel = torch.Size(shape).numel()
        t = buffer[offset:offset + 4 * numel].view(torch.float32).view(shape)
        t.view(torch.int32).copy_(torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32))
        out.append((f"t{i}", t))
        offset += 4 * numel
    return out


@pytest.mark.parametrize("chunk_bytes", [ALIGN_BYTES, shard.WRITE_CHUNK_BYTES])
def test_shard_round_trips_through_safetensors_with_zlib_crcs(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(shard, "WRITE_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    shapes = [(3, 5), (1000,), (17, 33), (0,), (2049,)]  # sizes that end mid-page: the truncate path
    buffer = aligned_empty(-(-4 * sum(torch.Size(s).numel() for s in shapes) // ALIGN_BYTES) * ALIGN_BYTES)
    tensors = _tiled(buffer, shapes)
    path = str(tmp_path / "s.safetensors")
    with ThreadPoolExecutor(shard.QUEUE_DEPTH) as writers:
        nbytes, records = shard.write_shard(path, tensors, buffer=buffer, metadata={"step": "7"}, disk=Disk(),
                                            writers=writers, deadline_s=time.monotonic() + 60)
    assert nbytes == os.path.getsize(path)
    header_bytes = 8 + int.from_bytes(open(path, "rb").read(8), "little")
    assert header_bytes % ALIGN_BYTES == 0  # data starts on a page: O_DIRECT-able
    assert nbytes == header_bytes + sum(t.numel() * 4 for _, t in tensors)
    loaded = load_file(path)
    for (name, t), record in zip(tensors, records):
        assert torch.equal(loaded[name].view(torch.int32), t.view(torch.int32))
        assert record.crc32 == zlib.crc32(t.numpy().tobytes()) and record.nbytes == t.numel() * 4


def test_shards_are_opened_with_o_direct_where_the_file_system_allows(tmp_path):
    fd = Disk().open_new(str(tmp_path / "f"), direct=True)
    try:
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert direct, "ext4 and tmpfs accept O_DIRECT; a shard written through the page cache costs a copy and a long fsync"


def test_a_failed_chunk_fails_the_shard_and_no_write_outlives_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shard, "WRITE_CHUNK_BYTES", ALIGN_BYTES)
    calls = []

    class FailingDisk(Disk):
        def write(self, fd, data, offset):
            calls.append(offset)
            if offset == 8 * ALIGN_BYTES:
                raise OSError(28, "No space left on device (injected)")
            time.sleep(0.001)
            super().write(fd, data, offset)

    buffer = aligned_empty(16 * ALIGN_BYTES)
    tensors = _tiled(buffer, [(16 * ALIGN_BYTES // 4,)])
    with ThreadPoolExecutor(shard.QUEUE_DEPTH) as writers, pytest.raises(OSError, match="No space"):
        shard.write_shard(str(tmp_path / "s"), tensors, buffer=buffer, metadata={}, disk=FailingDisk(),
                          writers=writers, deadline_s=time.monotonic() + 60)
    assert len(calls) == 17  # the header and every chunk ran to completion before the file was closed


def test_trainer_close_stops_the_writer_threads(tmp_path):
    import threading

    import horizon
    from ckpt_helpers import config, data, model

    def io_threads():
        return [t for t in threading.enumerate() if t.name.startswith("horizon-ckpt-io")]

    before = len(io_threads())
    with horizon.Trainer(model(), config(horizon.CheckpointConfig(dir=tmp_path))) as trainer:
        trainer.step(data(1)[0])
        trainer.save(wait=True)
        assert len(io_threads()) > before  # the pool did the writing
    assert len(io_threads()) == before


def test_the_next_shard_is_queued_before_the_previous_one_is_fsynced(tmp_path):
    """The disk's queue does not drain between shards: shard k+1's writes are submitted before shard k is
    fsynced (asserted from shard 1 on; shard 1 may not be staged yet when shard 0 is queued)."""
    import horizon
    from ckpt_helpers import config, data, model

    events, lock = [], threading.Lock()

    class LoggingDisk(Disk):  # writes take 20 ms: the copier stages every unit while shard 0 is written
        names: dict[int, str] = {}

        def open_new(self, path, *, direct=False):
            fd = super().open_new(path, direct=direct)
            self.names[fd] = os.path.basename(path)
            return fd

        def write(self, fd, data, offset):  # logged when the request starts: it is in flight from here
            with lock:
                events.append(("write", self.names[fd]))
            time.sleep(0.02)
            super().write(fd, data, offset)

        def fsync(self, fd):
            with lock:
                events.append(("fsync", self.names[fd]))
            super().fsync(fd)

    ckpt = horizon.CheckpointConfig(dir=tmp_path / "ckpt", final_save=False)
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=LoggingDisk()) as trainer:
        for b in data(2):
            trainer.step(b)
        trainer.updater.wait_all()
        assert trainer.save(wait=True)
    shards = sorted({name for _, name in events if name.startswith("shard-")})
    assert len(shards) == 4
    for k in (1, 2):
        first_write_next = events.index(("write", shards[k + 1]))
        assert first_write_next < events.index(("fsync", shards[k])), (k, events)
