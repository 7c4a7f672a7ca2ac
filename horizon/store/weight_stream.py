"""Streamed weights: the compute copies of SSD-resident units read ahead of the engine, a window at a time.

Why: with SSDConfig(weights=True) no unit's compute copy stays in host RAM, so each load of a unit
onto the device first needs its bytes read from SSD. The engine knows a step's order of loads in
advance (embedding, blocks, head, blocks in reverse, embedding), so the reads run up to
``num_buffers`` loads ahead on a reader thread, into a ring of aligned buffers: host RAM holds that
window, never the model. Each compute copy is read afresh for every load (twice per step for a block):
the optimizer rewrites it on SSD after every update, so a copy kept from an earlier read could be stale.

A read of unit u waits for (1) the copy out of its buffer of the load ``num_buffers`` before it, (2)
u's pending update (the future the engine's load would wait for anyway) and (3) that update's write
back to SSD. In fp32 the compute copy is the master itself, so the engine reads the master's extent.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import torch

from horizon.io import DirectIO, aligned_empty
from horizon.store.ssd import SSDTier

__all__ = ["WeightStream", "weight_window_bytes"]


def weight_window_bytes(padded_bytes: list[int], num_buffers: int) -> int:
    """Host bytes of the window: ``num_buffers`` buffers of the largest streamed unit's padded copy."""
    return num_buffers * max(padded_bytes, default=0)


class WeightStream:
    def __init__(self, tier: SSDTier, *, dtype: torch.dtype, num_buffers: int, io_backend: str) -> None:
        assert tier.streamed
        self.tier, self.dtype, self.num_buffers = tier, dtype, num_buffers
        self.buffer_bytes = max(tier.weight_extent(u)[1] for u in tier.streamed)
        self.pool_bytes = weight_window_bytes([self.buffer_bytes], num_buffers)
        self.pool = aligned_empty(self.pool_bytes)
        self.io = DirectIO(backend=io_backend)  # its own engine: the optimizer thread drives the tier's
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="horizon-weights")
        self._copies: list = [None] * num_buffers  # per buffer: the handle of the last copy out of it
        self._count = 0                              # reads issued so far (buffer = count % num_buffers)
        self._loads: list[tuple[int, int]] = []
        self._index_of: dict[int, int] = {}       # position -> index in _loads
        self._next = 0                             # the next load to read for
        self._issued: dict[int, tuple[int, concurrent.futures.Future]] = {}  # position -> (buffer, read)
        self._load_after: Callable = lambda unit: None

    def start(self, loads: list[tuple[int, int]], load_after: Callable[[int], concurrent.futures.Future | None]):
        """A new step: ``loads`` are the (position, unit) of its loads of streamed units, in order."""
        for _, future in self._issued.values():  # a step that raised midway: its reads end before buffers are reused
            future.exception()
        self._issued.clear()
        self._loads, self._load_after, self._next = list(loads), load_after, 0
        self._index_of = {position: k for k, (position, _) in enumerate(self._loads)}

    def _buffer(self, index: int, unit: int) -> torch.Tensor:
        return self.pool[index * self.buffer_bytes:][:self.tier.weight_extent(unit)[1]]

    def _issue(self) -> None:
        position, unit = self._loads[self._next]
        self._next += 1
        index = self._count % self.num_buffers
        self._count += 1
        before, after = self._copies[index], self._load_after(unit)
        self._issued[position] = (index, self._reader.submit(self._read, unit, index, before, after))

    def _read(self, unit: int, index: int, before, after) -> None:
        if before is not None:
            before.host_waiter()()  # the slot's previous copy out of this buffer has finished
        if after is not None:
            after.result()
        self.tier.wait_written(unit)
        offset, _ = self.tier.weight_extent(unit)
        self.io.read(self.tier.file, self._buffer(index, unit), offset).result()

    def take(self, position: int) -> tuple[torch.Tensor, concurrent.futures.Future]:
        """The buffer that will hold the compute copy for the load at ``position`` and the read's future;
        reads for the loads after it are issued up to the window."""
        k = self._index_of[position]
        while self._next < min(len(self._loads), k + self.num_buffers):
            self._issue()
        index, future = self._issued.pop(position)
        unit = self._loads[k][1]
        numel = self.tier.layouts[unit].numel
        return self._buffer(index, unit)[:numel * self.dtype.itemsize].view(self.dtype), future

    def copying(self, position: int, handle, buffer: torch.Tensor) -> None:
        """The copy out of ``buffer`` (from ``take(position)``) was issued; the buffer is reused after it."""
        index = (buffer.data_ptr() - self.pool.data_ptr()) // self.buffer_bytes
        self._copies[index] = handle

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self.io.close()
