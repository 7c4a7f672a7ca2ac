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
    """The copier and writer threads serve every checkpoint (a request starts no thread); close stops them
    and the I/O pool."""
    import horizon
    from ckpt_helpers import config, data, model

    def threads(prefix):
        return [t for t in threading.enumerate() if t.name.startswith(prefix)]

    before = len(threads("horizon-ckpt"))
    with horizon.Trainer(model(), config(horizon.CheckpointConfig(dir=tmp_path))) as trainer:
        for b in data(2):
            trainer.step(b)
            trainer.save(wait=True)
        assert len(threads("horizon-ckpt-io")) > 0  # the pool did the writing
        assert len(threads("horizon-ckpt-copier")) == len(threads("horizon-ckpt-writer")) == 1  # two checkpoints
    assert len(threads("horizon-ckpt")) == before


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


class _RecordingPool:
    """A writer pool that notes, for every write it is handed, its file offset, its length and how many
    bytes the copy had staged at that moment."""

    def __init__(self, pool: ThreadPoolExecutor, progress: list[int]) -> None:
        self.pool, self.progress, self.submitted = pool, progress, []

    def submit(self, fn, fd, data, offset):
        self.submitted.append((offset, len(data), self.progress[0]))
        return self.pool.submit(fn, fd, data, offset)


@pytest.mark.parametrize("step_bytes", [ALIGN_BYTES + 100, 3 * ALIGN_BYTES - 8, 1 << 20])
def test_a_shard_streamed_behind_a_running_copy_never_reads_ahead_of_it(tmp_path, monkeypatch, step_bytes):
    """``staged``: a copy into the slot advances ``step_bytes`` at a time (pieces that end mid-page and
    mid-tensor) each time the writer asks. Every write must cover only bytes copied before it was queued
    (the slot starts as 0xFF garbage, so an early write or CRC would differ), the writes must start before
    the copy ends, and the file must equal the source with zlib's CRCs."""
    monkeypatch.setattr(shard, "MIN_WRITE_BYTES", ALIGN_BYTES)
    monkeypatch.setattr(shard, "WRITE_CHUNK_BYTES", 4 * ALIGN_BYTES)
    torch.manual_seed(0)
    shapes = [(3, 5), (1000,), (17, 33), (0,), (2049,), (300, 7), (5000,)]
    slot_bytes = -(-4 * sum(torch.Size(s).numel() for s in shapes) // ALIGN_BYTES) * ALIGN_BYTES
    source = _tiled(aligned_empty(slot_bytes), shapes)
    buffer = aligned_empty(slot_bytes)
    buffer.fill_(0xFF)
    tensors, offset = [], 0
    for name, t in source:
        tensors.append((name, buffer[offset:offset + t.numel() * 4].view(torch.float32).view(t.shape)))
        offset += t.numel() * 4
    data_bytes, flat_source = offset, torch.cat([t.reshape(-1) for _, t in source]).view(torch.uint8)
    progress = [0]

    def staged(nbytes: int) -> int:
        while progress[0] < min(nbytes, data_bytes):
            end = min(data_bytes, progress[0] + step_bytes)
            buffer[progress[0]:end].copy_(flat_source[progress[0]:end])
            progress[0] = end
        return slot_bytes if progress[0] == data_bytes else progress[0]

    path = str(tmp_path / "s.safetensors")
    with ThreadPoolExecutor(shard.QUEUE_DEPTH) as pool:
        writers = _RecordingPool(pool, progress)
        pending = shard.start_shard(path, tensors, buffer=buffer, metadata={}, disk=Disk(), writers=writers,
                                    deadline_s=time.monotonic() + 60, staged=staged)
        nbytes, records = pending.finish()
    header_bytes = 8 + int.from_bytes(open(path, "rb").read(8), "little")
    data_writes = [w for w in writers.submitted if w[0] >= header_bytes]
    for offset, length, copied in data_writes:
        end = offset - header_bytes + length
        assert end <= copied or copied == data_bytes, (offset, length, copied)
    if 3 * step_bytes <= data_bytes:  # (a 1 MiB step copies it all at once)
        assert sum(1 for w in data_writes if w[2] < data_bytes) >= 2  # streamed: queued while the copy ran
    assert sum(length for _, length, _ in data_writes) == -(-data_bytes // ALIGN_BYTES) * ALIGN_BYTES
    assert nbytes == os.path.getsize(path) == header_bytes + data_bytes
    loaded = load_file(path)
    for (name, t), record in zip(source, records):
        assert torch.equal(loaded[name].view(torch.int32), t.view(torch.int32))
        assert record.name == name and record.crc32 == zlib.crc32(t.numpy().tobytes())


def test_the_manifest_is_written_while_the_last_shards_are_in_flight(tmp_path):
    """One process knows every size and CRC once the last shard is queued: its manifest is written and
    fsynced before that shard's fsync (overlapping its writes), and the rename still comes after every
    fsync of the in-flight directory's files."""
    import horizon
    from ckpt_helpers import config, data, model

    events, lock = [], threading.Lock()

    class LoggingDisk(Disk):
        names: dict[int, str] = {}

        def open_new(self, path, *, direct=False):
            fd = super().open_new(path, direct=direct)
            self.names[fd] = os.path.basename(path)
            return fd

        def write(self, fd, data, offset):
            if self.names[fd].startswith("shard-"):
                time.sleep(0.02)
            super().write(fd, data, offset)

        def fsync(self, fd):
            super().fsync(fd)
            with lock:
                events.append(("fsync", self.names[fd]))

        def rename_new(self, src, dst):
            with lock:
                events.append(("rename", os.path.basename(dst)))
            super().rename_new(src, dst)

    ckpt = horizon.CheckpointConfig(dir=tmp_path / "ckpt", final_save=False)
    with horizon.Trainer(model(), config(ckpt), checkpoint_disk=LoggingDisk()) as trainer:
        trainer.step(data(1)[0])
        assert trainer.save(wait=True)
    fsyncs = [name for kind, name in events if kind == "fsync"]
    shards = sorted(n for n in fsyncs if n.startswith("shard-"))
    assert len(shards) == 4 and "manifest.json" in fsyncs
    assert fsyncs.index("manifest.json") < fsyncs.index(shards[-1])
    assert events[-1][0] == "rename" and len(fsyncs) == len(events) - 1
