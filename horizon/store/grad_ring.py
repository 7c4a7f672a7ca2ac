"""Where streamed units' gradients land: a ring of a few aligned buffers instead of one per unit.

Why: with SSDConfig(weights=True) a gradient buffer per unit would pin 2-4 bytes per parameter of
host RAM, as much as the compute copy the SSD tier just took out of it. A gradient is needed only
until its unit's update has consumed it (the eager schedule: the update runs as it lands) or until
it is on SSD (the deferred schedule: global clipping waits for every gradient, and the update reads
it back with the unit's state). So a ring of ``num_buffers`` buffers suffices: a new gradient takes
the oldest buffer once what consumed the previous one (an update, a spill write) is done.

Used from one thread (the training loop's): the engine takes a buffer as a gradient leaves the
device; when it has landed, the updater hands the buffer to an update or to a spill and tells the
ring what to wait for before reuse.
"""

from __future__ import annotations

import torch

from horizon.io import ALIGN_BYTES, aligned_empty
from horizon.store.layout import UnitLayout

__all__ = ["GradRing", "grad_ring_bytes"]

NUM_BUFFERS = 3
"""Two gradients in flight from the device (horizon.engine) and one being consumed."""


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def grad_ring_bytes(layouts: list[UnitLayout], streamed: frozenset[int], dtype: torch.dtype) -> int:
    """Host bytes of the ring for these streamed units (0 without any)."""
    return NUM_BUFFERS * max((_aligned(layouts[u].numel * dtype.itemsize) for u in streamed), default=0)


class GradRing:
    def __init__(self, layouts: list[UnitLayout], streamed: frozenset[int], dtype: torch.dtype) -> None:
        assert streamed
        self.layouts, self.dtype = layouts, dtype
        self.pool_bytes = grad_ring_bytes(layouts, streamed, dtype)
        self.buffer_bytes = self.pool_bytes // NUM_BUFFERS
        self.pool = aligned_empty(self.pool_bytes)
        self._busy: list = [None] * NUM_BUFFERS  # per buffer: what must finish before it is reused
        self._held: dict[int, int] = {}           # unit -> buffer
        self._next = 0

    def take(self, unit: int) -> torch.Tensor:
        """A buffer for ``unit``'s gradient (flat, the compute dtype); waits for the oldest buffer's consumer."""
        index = self._next
        self._next = (index + 1) % NUM_BUFFERS
        waiter, self._busy[index] = self._busy[index], None
        if waiter is not None:
            waiter.result()
        self._held[unit] = index  # (replacing a buffer a step that raised midway never handed on)
        return self.held(unit)

    def held(self, unit: int) -> torch.Tensor:
        nbytes = self.layouts[unit].numel * self.dtype.itemsize
        start = self._held[unit] * self.buffer_bytes
        return self.pool[start:start + nbytes].view(self.dtype)

    def padded(self, unit: int) -> torch.Tensor:
        """``unit``'s buffer as aligned bytes, padded to 4 KiB (what a spill writes)."""
        start = self._held[unit] * self.buffer_bytes
        return self.pool[start:start + _aligned(self.layouts[unit].numel * self.dtype.itemsize)]

    def hand_on(self, unit: int, waiter) -> None:
        """``unit``'s gradient is consumed by ``waiter`` (anything with ``result()``); its buffer is reused after."""
        self._busy[self._held.pop(unit)] = waiter

    def drain(self) -> None:
        """Wait for every consumer (spills before the deferred updates read them, or close)."""
        for index, waiter in enumerate(self._busy):
            self._busy[index] = None
            if waiter is not None:
                waiter.result()
