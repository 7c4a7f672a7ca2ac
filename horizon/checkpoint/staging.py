"""The staging ring: a fixed number of host buffers a snapshot is copied into before the disk.

Why bounded and allocated once: staging is what lets the optimizer wait for a memcpy instead
of the disk, but an unbounded staging area is the host OOM users of other runtimes report. The
ring is one allocation of ``num_slots`` slots, each big enough for the largest unit's master,
m and v, reused by every checkpoint. Slots are granted in the order units will be updated
(lowest rank first), so a unit the optimizer is waiting for is never starved by a later one.
The ring is a fresh anonymous mapping (``horizon.io.aligned_empty``), not heap memory: its pages
take RAM only once a checkpoint writes them, and go back to the OS with the ring (the CPU device
never trims the heap: horizon/engine/cpu_heap.py).
"""

from __future__ import annotations

import threading

import torch

from horizon.io import ALIGN_BYTES, aligned_empty

__all__ = ["StagingRing"]


class StagingRing:
    def __init__(self, *, slot_bytes: int, num_slots: int) -> None:
        assert slot_bytes > 0 and slot_bytes % ALIGN_BYTES == 0 and num_slots >= 1
        self.slot_bytes, self.num_slots = slot_bytes, num_slots
        self.buffer = aligned_empty(slot_bytes * num_slots)
        self._free = list(range(num_slots))
        self._waiting: set[int] = set()
        self._cond = threading.Condition()
        self.peak_in_use = 0
        """Most slots held at once since the ring was made (tests check the bound)."""

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def slot(self, index: int) -> torch.Tensor:
        return self.buffer[index * self.slot_bytes:(index + 1) * self.slot_bytes]

    def acquire(self, rank: int, stop: threading.Event) -> int | None:
        """A free slot for the unit at position ``rank`` of the update order, once every lower-ranked
        waiter has one; None if ``stop`` is set first (the checkpoint was aborted)."""
        with self._cond:
            self._waiting.add(rank)
            try:
                while not stop.is_set() and not (self._free and rank == min(self._waiting)):
                    self._cond.wait(timeout=0.1)
                if stop.is_set():
                    return None
                index = self._free.pop()
                self.peak_in_use = max(self.peak_in_use, self.num_slots - len(self._free))
                return index
            finally:
                self._waiting.discard(rank)
                self._cond.notify_all()

    def release(self, index: int) -> None:
        with self._cond:
            assert index not in self._free
            self._free.append(index)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiter so it re-checks its stop event."""
        with self._cond:
            self._cond.notify_all()
