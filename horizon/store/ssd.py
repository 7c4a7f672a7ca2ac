"""The SSD tier: the optimizer state (fp32 master, Adam m and v) of chosen units in one O_DIRECT file.

Why: master, m and v are 12 of the 16 bytes a parameter costs in host RAM, and the optimizer is
their only reader, once per step and unit, in an order known in advance. Streaming them through
a few aligned buffers lets a model whose state is far larger than RAM train: RAM then holds only
the compute copy, the gradient and ``io_buffers`` units' state.

One file per trainer (created in ``SSDConfig.dir``, preallocated so a full disk fails at start,
removed at close). Unit u's three roles sit back to back at ``offset[u]``, each padded to 4 KiB, so
one request reads or writes all of them. The pool is one page-aligned allocation of ``io_buffers``
slots of the largest unit's state; nothing is allocated per step.

The optimizer thread drives it: ``acquire(u)`` waits for u's state (read ahead by ``prefetch``), the
update runs on the slot's views, ``release(u)`` queues the write-back. A slot is reused only after
its write finished, and a unit still in a slot is taken from there instead of read again.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading

import torch

from horizon.io import ALIGN_BYTES, DirectFile, DirectIO, IOFuture, aligned_empty
from horizon.store.layout import UnitLayout
from horizon.store.ssd_config import SSDConfig

__all__ = ["SSDTier", "ROLES", "state_bytes"]

ROLES = ("master", "exp_avg", "exp_avg_sq")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def state_bytes(layout: UnitLayout) -> int:
    """Bytes of one unit's master, m and v on SSD and in an I/O slot (each role padded to 4 KiB)."""
    return len(ROLES) * _aligned(layout.numel * 4)


@dataclasses.dataclass(kw_only=True)
class _Slot:
    region: torch.Tensor              # uint8 view into the pool, the largest unit's state bytes
    unit: int | None = None           # whose state it holds (or is reading)
    read: IOFuture | None = None
    write: IOFuture | None = None
    in_use: bool = False              # the optimizer is updating it
    last_used: int = 0

    def settle(self) -> None:
        """Wait for this slot's I/O; afterwards its bytes are the unit's state and nothing reads or writes them."""
        for name in ("read", "write"):
            future = getattr(self, name)
            if future is not None:
                setattr(self, name, None)
                future.result()


class SSDTier:
    def __init__(self, config: SSDConfig, layouts: list[UnitLayout], units: frozenset[int]) -> None:
        assert units, "an SSD tier holds at least one unit"
        self.units = sorted(units)
        self.layouts = layouts
        self.offset_bytes, offset = {}, 0
        for unit in self.units:
            self.offset_bytes[unit] = offset
            offset += state_bytes(layouts[unit])
        self.file_bytes = offset
        slot_bytes = max(state_bytes(layouts[u]) for u in self.units)
        self.pool_bytes = config.io_buffers * slot_bytes
        fd, path = tempfile.mkstemp(prefix="horizon-optimizer-state-", suffix=".bin", dir=os.fspath(config.dir))
        os.close(fd)
        try:
            self.file = DirectFile(path, size_bytes=self.file_bytes)
        except OSError:
            os.remove(path)
            raise
        self.io = DirectIO(backend=config.io_backend)
        self.pool = aligned_empty(self.pool_bytes)
        self._slots = [_Slot(region=self.pool[i * slot_bytes:(i + 1) * slot_bytes]) for i in range(config.io_buffers)]
        self._lock = threading.RLock()
        self._slot_free = threading.Condition(self._lock)  # the checkpoint copier may hold a slot for a while
        self._tick = 0

    @property
    def bytes_by_role(self) -> dict[str, int]:
        """Bytes on SSD per role (4 KiB padding included)."""
        role_bytes = sum(_aligned(self.layouts[u].numel * 4) for u in self.units)
        return {role: role_bytes for role in ROLES}

    # -- slots --------------------------------------------------------------------------------

    def _find(self, unit: int) -> _Slot | None:
        return next((s for s in self._slots if s.unit == unit), None)

    def _take(self) -> _Slot:
        """A slot for a new unit: an empty one, else the least recently used one not being updated."""
        while not any(not s.in_use for s in self._slots):
            self._slot_free.wait()
        free = [s for s in self._slots if not s.in_use]
        slot = min(free, key=lambda s: (s.unit is not None, s.last_used))
        slot.settle()
        slot.unit = None
        return slot

    def _views(self, slot: _Slot, unit: int) -> dict[str, torch.Tensor]:
        numel, role_bytes = self.layouts[unit].numel, _aligned(self.layouts[unit].numel * 4)
        return {role: slot.region[i * role_bytes:i * role_bytes + numel * 4].view(torch.float32)
                for i, role in enumerate(ROLES)}

    def _extent(self, slot: _Slot, unit: int) -> torch.Tensor:
        return slot.region[:state_bytes(self.layouts[unit])]

    # -- the optimizer's side -----------------------------------------------------------------

    def prefetch(self, unit: int) -> None:
        """Start reading ``unit``'s state into a free slot, unless a slot holds it already."""
        with self._lock:
            if self._find(unit) is not None:
                return
            slot = self._take()
            slot.unit = unit
            slot.read = self.io.read(self.file, self._extent(slot, unit), self.offset_bytes[unit])

    def acquire(self, unit: int) -> dict[str, torch.Tensor]:
        """``unit``'s master, exp_avg and exp_avg_sq (fp32 views into a slot), to update in place; held
        by the caller alone until ``release`` (another thread's ``acquire`` of the unit waits)."""
        with self._lock:
            while True:
                self.prefetch(unit)
                slot = self._find(unit)
                if not slot.in_use:
                    break
                self._slot_free.wait()  # a reader (the checkpoint copier, state_dict) holds it
            slot.settle()
            slot.in_use = True
            return self._views(slot, unit)

    def release(self, unit: int, *, dirty: bool = True) -> None:
        """Done with ``unit``: queue its write-back (``dirty``) and let the slot be reused after it."""
        with self._lock:
            slot = self._find(unit)
            assert slot is not None and slot.in_use
            slot.in_use = False
            self._tick += 1
            slot.last_used = self._tick
            if dirty:
                slot.write = self.io.write(self.file, self._extent(slot, unit), self.offset_bytes[unit])
            self._slot_free.notify_all()

    def next_unit(self, unit: int, *, descending: bool) -> int:
        """The SSD unit the optimizer updates after ``unit`` (cyclic: the next step starts over)."""
        order = self.units[::-1] if descending else self.units
        later = [u for u in order if (u < unit if descending else u > unit)]
        return later[0] if later else order[0]

    # -- outside the step ----------------------------------------------------------------------

    def stage(self, unit: int) -> torch.Tensor:
        """A slot for ``unit``'s initial state, moments zeroed: fill the returned fp32 master, then ``release``."""
        with self._lock:
            slot = self._find(unit) or self._take()
            slot.settle()
            slot.unit, slot.in_use = unit, True
            views = self._views(slot, unit)
            views["exp_avg"].zero_()
            views["exp_avg_sq"].zero_()
            return views["master"]

    def initialize(self, unit: int, master: torch.Tensor) -> None:
        """Write ``unit``'s initial state: ``master`` (flat, any float dtype; stored as fp32) and zero moments."""
        with self._lock:
            self.stage(unit).copy_(master)
            self.release(unit)

    def read_state(self, unit: int) -> dict[str, torch.Tensor]:
        """Copies of ``unit``'s master, exp_avg and exp_avg_sq as they are on SSD (after pending writes)."""
        out = {role: torch.empty(self.layouts[unit].numel) for role in ROLES}
        self.copy_state(unit, out)
        return out

    def copy_state(self, unit: int, out: dict[str, torch.Tensor]) -> None:
        """Copy roles of ``unit``'s state into ``out`` (role -> flat tensor, any float dtype). The slot keeps
        the state afterwards, so the update that follows (a checkpoint's copy comes just before one) reads
        nothing again."""
        views = self.acquire(unit)
        try:
            for role, t in out.items():
                t.copy_(views[role])
        finally:
            self.release(unit, dirty=False)

    def load(self, unit: int, role: str, offset: int, values: torch.Tensor) -> None:
        """Overwrite elements ``offset:`` of ``unit``'s ``role`` on SSD with ``values`` (resuming a checkpoint)."""
        views = self.acquire(unit)
        views[role][offset:offset + values.numel()].copy_(values.view(-1))
        self.release(unit)

    def put_masters(self, state: dict[str, torch.Tensor], store) -> None:
        """Replace, in a ``model.state_dict()``, the compute-copy views of SSD units by their fp32 masters
        read from SSD (a no-op in fp32, where the compute copy is the master bit for bit)."""
        if store.compute_dtype == torch.float32:
            return
        keys_of: dict[int, list[str]] = {}
        for key, t in state.items():
            keys_of.setdefault(t.data_ptr(), []).append(key)
        for index in self.units:
            unit = store.units[index]
            masters = unit.views(self.read_state(index)["master"])
            for local_name, view in unit.views(unit.master).items():
                for key in keys_of.get(view.data_ptr(), ()):
                    state[key] = masters[local_name]

    def flush(self) -> None:
        """Wait for every read and write in flight."""
        with self._lock:
            for slot in self._slots:
                slot.settle()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.io.close()
            self.file.close()
            if os.path.exists(self.file.path):
                os.remove(self.file.path)
