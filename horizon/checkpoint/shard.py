"""Shards: safetensors files streamed from staging buffers, with a CRC-32 per tensor.

Why stream by hand: the safetensors header depends only on names, dtypes and shapes, so it is
written first and the tensors follow straight from their staging slot, in large O_DIRECT
requests several at a time, while ``zlib.crc32`` (which releases the GIL) runs over the same
bytes: no second copy of the shard in memory, no page cache, and the CRC covers exactly what
was written. The header is padded with spaces to a whole page so the data is page-aligned. Reading goes through the ``safetensors`` package itself, so every shard is
a file any safetensors user can open.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
import zlib

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from safetensors import safe_open

from horizon.checkpoint.disk import Disk
from horizon.checkpoint.staging import aligned_empty
from horizon.store.layout import ALIGN_BYTES

__all__ = ["TensorRecord", "write_shard", "read_tensor", "crc32_of", "WRITE_CHUNK_BYTES", "QUEUE_DEPTH"]

WRITE_CHUNK_BYTES = 16 << 20
"""Bytes per write request: large enough for the device, small enough to spread over the queue."""
QUEUE_DEPTH = 4
"""Writes in flight at once (threads in the writer's pool); a single synchronous stream leaves an SSD idle."""

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
           torch.uint8: "U8"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorRecord:
    """One tensor as the manifest lists it."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    crc32: int

    def to_json(self) -> dict:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape), "bytes": self.nbytes,
                "crc32": self.crc32}


def crc32_of(tensor: torch.Tensor, crc: int = 0) -> int:
    """IEEE CRC-32 of a contiguous tensor's bytes."""
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy(), crc)


def _header(tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """The safetensors header, padded with spaces so the data starts on a page (O_DIRECT-aligned)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN_BYTES)  # safetensors allows trailing spaces in the header
    return struct.pack("<Q", len(raw)) + raw


def _data_bytes(tensors: list[tuple[str, torch.Tensor]], buffer: torch.Tensor) -> int:
    """Bytes the tensors cover; they must lie back to back from the start of ``buffer``."""
    nbytes = 0
    for _, t in tensors:
        assert t.numel() == 0 or (t.is_contiguous() and t.data_ptr() == buffer.data_ptr() + nbytes), \
            "tensors must tile the buffer"
        nbytes += t.numel() * t.element_size()
    return nbytes


def _submit_writes(fd: int, data: memoryview, offset: int, *, disk: Disk, writers: ThreadPoolExecutor) -> list[Future]:
    return [writers.submit(disk.write, fd, data[o:o + WRITE_CHUNK_BYTES], offset + o)
            for o in range(0, len(data), WRITE_CHUNK_BYTES)]


def write_shard(path: str, tensors: list[tuple[str, torch.Tensor]], *, buffer: torch.Tensor, metadata: dict[str, str],
                disk: Disk, writers: ThreadPoolExecutor, deadline_s: float) -> tuple[int, list[TensorRecord]]:
    """Write ``tensors`` to a new safetensors file, fsync it; (file bytes, records).

    The tensors are views lying back to back from the start of ``buffer`` (a staging slot: uint8,
    page-aligned, a whole number of pages). The header and the buffer go to disk as page-aligned
    O_DIRECT writes of ``WRITE_CHUNK_BYTES`` on the ``writers`` threads (the last page padded, then
    the file cut to size) while this thread computes each tensor's CRC-32 from the same bytes.
    Raises ``TimeoutError`` once ``time.monotonic()`` passes ``deadline_s`` (checked between tensors).
    """
    file = os.path.basename(path)
    data_bytes = _data_bytes(tensors, buffer)
    padded = -(-data_bytes // ALIGN_BYTES) * ALIGN_BYTES
    assert buffer.data_ptr() % ALIGN_BYTES == 0 and buffer.numel() >= padded
    header = _header(tensors, metadata)
    header_buf = aligned_empty(len(header))
    header_buf.numpy()[:] = np.frombuffer(header, dtype=np.uint8)
    fd = disk.open_new(path, direct=True)
    pending: list[Future] = []
    try:
        pending = _submit_writes(fd, memoryview(header_buf.numpy()), 0, disk=disk, writers=writers)
        pending += _submit_writes(fd, memoryview(buffer[:padded].numpy()), len(header), disk=disk, writers=writers)
        records = []
        for name, t in tensors:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"checkpoint timed out while writing {file}")
            records.append(TensorRecord(name=name, file=file, dtype=_DTYPES[t.dtype], shape=tuple(t.shape),
                                        nbytes=t.numel() * t.element_size(), crc32=crc32_of(t)))
        for future in pending:
            future.result()
        if padded != data_bytes:
            disk.truncate(fd, len(header) + data_bytes)
        disk.at("shard_written")
        disk.fsync(fd)
        disk.at("shard_synced")
    finally:
        for future in pending:  # never close the file under a write still running
            future.exception()
        os.close(fd)
    return len(header) + data_bytes, records


def read_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor of a shard, through the safetensors package."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)
