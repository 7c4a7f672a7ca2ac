"""Shards: safetensors files streamed from staging buffers, with a CRC-32 per tensor.

Why stream by hand: the safetensors header depends only on names, dtypes and shapes, so it is
written first and each tensor follows straight from its staging buffer, while ``zlib.crc32``
runs over the same bytes: no second copy of the shard in memory, and the CRC covers exactly
what was written. Reading goes through the ``safetensors`` package itself, so every shard is
a file any safetensors user can open.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
import zlib

import torch
from safetensors import safe_open

from horizon.checkpoint.disk import Disk

__all__ = ["TensorRecord", "write_shard", "read_tensor", "crc32_of"]

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
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: str, tensors: list[tuple[str, torch.Tensor]], *, metadata: dict[str, str], disk: Disk,
                deadline_s: float) -> tuple[int, list[TensorRecord]]:
    """Write ``tensors`` (contiguous CPU tensors) to a new safetensors file, fsync it; (file bytes, records).

    Raises ``TimeoutError`` once ``time.monotonic()`` passes ``deadline_s`` (checked between tensors).
    """
    file = os.path.basename(path)
    fd = disk.open_new(path)
    try:
        header = _header(tensors, metadata)
        disk.write(fd, memoryview(header))
        total, records = len(header), []
        for name, t in tensors:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"checkpoint timed out while writing {file}")
            data = t.view(torch.uint8).numpy() if t.numel() else memoryview(b"")
            crc = zlib.crc32(data)
            disk.write(fd, memoryview(data).cast("B"))
            nbytes = t.numel() * t.element_size()
            total += nbytes
            records.append(TensorRecord(name=name, file=file, dtype=_DTYPES[t.dtype], shape=tuple(t.shape),
                                        nbytes=nbytes, crc32=crc))
        disk.at("shard_written")
        disk.fsync(fd)
        disk.at("shard_synced")
    finally:
        os.close(fd)
    return total, records


def read_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor of a shard, through the safetensors package."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)
