"""The SSD tier: the optimizer state (fp32 master, Adam m and v) of chosen units in one O_DIRECT file.

Why: master, m and v are 12 of the 16 bytes a parameter costs in host RAM, and the optimizer is
their only reader, once per step and unit, in an order known in advance. Streaming them through
a few aligned buffers lets a model whose state is far larger than RAM train: RAM then holds only
the compute copy, the gradient and ``io_buffers`` units' state.

One file per trainer (created in ``SSDConfig.dir``, preallocated so a full disk fails at start,
removed at close). Unit u's roles sit back to back at ``offset[u]``, each padded to 4 KiB, so one
request reads or writes all of them (horizon.store.ssd_layout: with ``SSDConfig(weights=True)`` a
streamed unit's compute copy and spilled gradient follow its state). The pool is one page-aligned allocation of ``io_buffers``
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

from horizon.io import DirectFile, DirectIO, IOFuture, aligned_empty
from horizon.store.layout import UnitLayout
from horizon.store.ssd_config import SSDConfig
from horizon.store.ssd_layout import STATE_ROLES, UnitExtents, ssd_bytes_by_role, state_bytes, unit_extents

__all__ = ["SSDTier", "ROLES", "state_bytes"]

ROLES = STATE_ROLES


@dataclasses.dataclass(kw_only=True)
class _Slot:
    region: torch.Tensor              # uint8 view into the pool, the largest unit's extent
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
    def __init__(self, config: SSDConfig, layouts: list[UnitLayout], units: frozenset[int], *,
                 compute_dtype: torch.dtype = torch.float32, streamed: frozenset[int] = frozenset(),
                 spill_grads: bool = False) -> None:
        assert units and streamed <= units, "an SSD tier holds at least one unit, and streams only its own"
        self.units = sorted(units)
        self.layouts = layouts
        self.streamed = streamed
        """Units whose compute copy is on SSD too (SSDConfig(weights=True)): horizon.store.weight_stream reads it."""
        self.extents: dict[int, UnitExtents] = {
            u: unit_extents(layouts[u], compute_dtype=compute_dtype, weights=u in streamed, spill_grad=spill_grads)
            for u in self.units}
        self.offset_bytes, offset = {}, 0
        for unit in self.units:
            self.offset_bytes[unit] = offset
            offset += self.extents[unit].read_bytes
        self.file_bytes = offset
        slot_bytes = max(e.read_bytes for e in self.extents.values())
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
        self._grad_writes: dict[int, IOFuture] = {}        # spilled gradients not yet known to be on disk
        self._tick = 0
        self._staged: int | None = None  # the unit ``stage`` handed out

    @property
    def bytes_by_role(self) -> dict[str, int]:
        """Bytes on SSD per role (4 KiB padding included): master, exp_avg, exp_avg_sq, and with
        streamed weights compute (bf16 and alike) and grad (spilled gradients)."""
        return ssd_bytes_by_role(list(self.extents.values()))

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
        views = self.extents[unit].views(slot.region)
        if unit in self.streamed and "compute" not in views:
            views["compute"] = views["master"]  # fp32: the master is the compute copy
        return views

    def _read(self, slot: _Slot, unit: int) -> IOFuture:
        spilled = self._grad_writes.pop(unit, None)
        if spilled is not None:  # the gradient this read brings back must be on disk first
            spilled.result()
        return self.io.read(self.file, slot.region[:self.extents[unit].read_bytes], self.offset_bytes[unit])

    def _write(self, slot: _Slot, unit: int) -> IOFuture:
        return self.io.write(self.file, slot.region[:self.extents[unit].write_bytes], self.offset_bytes[unit])

    # -- the optimizer's side -----------------------------------------------------------------

    def prefetch(self, unit: int) -> None:
        """Start reading ``unit``'s state into a free slot, unless a slot holds it already."""
        with self._lock:
            if self._find(unit) is not None:
                return
            slot = self._take()
            slot.unit = unit
            slot.read = self._read(slot, unit)

    def acquire(self, unit: int) -> dict[str, torch.Tensor]:
        """``unit``'s master, exp_avg and exp_avg_sq (fp32 views into a slot), to update in place; held
        by the caller alone until ``release`` (another thread's ``acquire`` of the unit waits). A streamed
        unit also has its ``compute`` copy (the master itself in fp32) and, when spilled, its ``grad``."""
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
            if self._staged == unit:  # initial state: derive the compute copy from the master
                self._staged = None
                views = self._views(slot, unit)
                if views.get("compute", views["master"]).data_ptr() != views["master"].data_ptr():
                    views["compute"].copy_(views["master"])
            slot.in_use = False
            self._tick += 1
            slot.last_used = self._tick
            if dirty:
                slot.write = self._write(slot, unit)
            self._slot_free.notify_all()

    def next_unit(self, unit: int, *, descending: bool) -> int:
        """The SSD unit the optimizer updates after ``unit`` (cyclic: the next step starts over)."""
        order = self.units[::-1] if descending else self.units
        later = [u for u in order if (u < unit if descending else u > unit)]
        return later[0] if later else order[0]

    # -- streamed weights and spilled gradients ------------------------------------------------

    def weight_extent(self, unit: int) -> tuple[int, int]:
        """(file offset, padded bytes) of the copy the engine reads for streamed ``unit``."""
        extents = self.extents[unit]
        role = extents.weight_role
        return self.offset_bytes[unit] + extents.offset(role), extents.role_bytes(role)

    def wait_written(self, unit: int) -> None:
        """Block until ``unit``'s last write-back is on disk (an update released before this call)."""
        with self._lock:
            slot = self._find(unit)
            if slot is not None and slot.write is not None:
                slot.settle()

    def spill_grad(self, unit: int, grad: torch.Tensor) -> IOFuture:
        """Write ``unit``'s gradient (flat, aligned, padded) to its place on SSD; its next update reads it back.
        A slot still holding the unit (read ahead before this gradient existed) is dropped."""
        with self._lock:
            while (slot := self._find(unit)) is not None and slot.in_use:
                self._slot_free.wait()
            if slot is not None:
                slot.settle()
                slot.unit = None
            offset = self.offset_bytes[unit] + self.extents[unit].offset("grad")
            future = self.io.write(self.file, grad, offset)
            self._grad_writes[unit] = future
            return future

    def refresh_compute(self, unit: int) -> None:
        """Rewrite streamed ``unit``'s compute copy on SSD from its master (after a resume loaded the master)."""
        views = self.acquire(unit)
        views["compute"].copy_(views["master"])
        self.release(unit)

    # -- outside the step ----------------------------------------------------------------------

    def stage(self, unit: int) -> torch.Tensor:
        """A slot for ``unit``'s initial state, moments zeroed: fill the returned fp32 master, then
        ``release`` (which writes a streamed unit's compute copy from it first)."""
        with self._lock:
            slot = self._find(unit) or self._take()
            slot.settle()
            slot.unit, slot.in_use = unit, True
            self._staged = unit
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

    def put_masters(self, state: dict[str, torch.Tensor], store, keys: list[dict[str, list[str]]]) -> None:
        """Replace, in a ``model.state_dict()``, the entries of SSD units by their fp32 masters read from SSD.
        ``keys[u][local_name]``: the state keys of unit u's parameter. Skipped in fp32 for units whose
        compute copy is in RAM (the parameters are the master bit for bit there)."""
        for index in self.units:
            if store.compute_dtype == torch.float32 and index not in self.streamed:
                continue
            masters = store.units[index].views(self.read_state(index)["master"])
            for local_name, master in masters.items():
                for key in keys[index].get(local_name, ()):
                    state[key] = master

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
