"""One checkpoint version in flight: the per-unit copy-on-write barrier and the copier.

Why per unit: a unit's master, m and v are immutable from the end of its update of step S to
the start of its update of step S+1, so any copy taken in that window is exactly version S.
The copier walks the units in the order the next updates will touch them, waits for each one's
update of step S (it may still be running when ``step`` returns), waits while any optimizer task
runs (a concurrent memcpy doubled a 2-thread AdamW step on the 2-core VM), and copies the unit
into a staging slot. The optimizer calls ``before_update(unit)`` before it mutates a unit: if the copier is
copying it, it waits for that memcpy; if nobody has started it, the optimizer copies it itself
(copy-on-write); it never waits for the disk. The writer reads staging slots only.

Version S is the state whose Adam step count is S in every unit (the trainer's global step).
Per unit: PENDING -> COPYING (claimed by the copier or the optimizer; may wait for a slot)
-> STAGED (in a slot, waiting for the writer) -> DONE (written, slot free). ``abort`` sets every
unit DONE and wakes every waiter, so a failed write can never deadlock the optimizer.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from horizon.checkpoint.staging import StagingRing
from horizon.store.host_store import HostStore

__all__ = ["UnitState", "Snapshot", "ROLES"]

ROLES = ("master", "exp_avg", "exp_avg_sq")
"""What a checkpoint keeps of each unit (the compute copy and gradients are derived or transient)."""


class UnitState(enum.Enum):
    PENDING = "pending"    # version S not yet copied; the live buffers must not change
    COPYING = "copying"    # claimed: a slot is being acquired or the memcpy runs
    STAGED = "staged"      # a copy of version S sits in a staging slot
    DONE = "done"          # written (or the checkpoint aborted): the live buffers are free


class Snapshot:
    def __init__(self, *, step: int, store: HostStore, ring: StagingRing, order: list[int],
                 after: dict[int, Future | None], adam_steps: list[torch.Tensor],
                 optimizer_busy: Callable[[], bool] | None = None, ssd=None) -> None:
        self.step, self.store, self.ring, self.order = step, store, ring, order
        self.ssd = ssd
        """The horizon.store.ssd.SSDTier holding the state of ``store.ssd_units``, if any."""
        self._after, self._adam_steps, self._optimizer_busy = after, adam_steps, optimizer_busy
        self._rank = {unit: rank for rank, unit in enumerate(order)}
        self._state = {unit: UnitState.PENDING for unit in order}
        self._slot: dict[int, int] = {}
        self.adam_step: dict[int, int] = {}
        """Each unit's Adam step count as copied (version S)."""
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self.barrier_enabled = True
        """False turns the barrier off (``Checkpointer.barrier_enabled``: the tests' negative control)."""
        self.blocked_s = 0.0
        """Seconds the optimizer spent in ``before_update`` for this version (waits and its own copies)."""
        self.yielded_s = 0.0
        self.copier_error: str | None = None
        """Why the copier thread stopped early, if it failed."""
        """Seconds the copier waited for the optimizer to go idle before starting a unit."""

    def staged_slot(self, unit: int) -> torch.Tensor:
        """The staging slot holding ``unit`` (master, m, v back to back), valid while the unit is STAGED."""
        return self.ring.slot(self._slot[unit])

    def staged_view(self, unit: int, role: str) -> torch.Tensor:
        """The staged copy of ``unit``'s ``role`` (fp32, flat), valid while the unit is STAGED.
        As long as the store's buffer: the whole unit, or this rank's shard of it."""
        numel = self.store.units[unit].held_numel
        k = ROLES.index(role)
        return self.staged_slot(unit)[k * numel * 4:(k + 1) * numel * 4].view(torch.float32)

    # -- copying (copier thread, or the optimizer's copy-on-write) ------------------------------

    def _claim(self, unit: int) -> bool:
        with self._cond:
            if self._state[unit] is not UnitState.PENDING:
                return False
            self._state[unit] = UnitState.COPYING
            return True

    def _copy(self, unit: int) -> None:
        """Copy a claimed unit into a slot and mark it STAGED (or leave it to ``abort``)."""
        slot = self.ring.acquire(self._rank[unit], self.stop)
        if slot is None:
            return
        buffers = self.store.units[unit]
        with self._cond:
            self._slot[unit] = slot
        if unit in self.store.ssd_units:  # through an I/O slot, which the unit's next update then reuses
            self.ssd.copy_state(unit, {role: self.staged_view(unit, role) for role in ROLES})
        else:
            for role in ROLES:
                self.staged_view(unit, role).copy_(getattr(buffers, role))
        self.adam_step[unit] = int(self._adam_steps[unit])
        with self._cond:
            if self.stop.is_set():
                self.ring.release(self._slot.pop(unit))
                return
            self._state[unit] = UnitState.STAGED
            self._cond.notify_all()

    def _writer_has_work(self) -> bool:
        with self._cond:
            return any(state is UnitState.STAGED for state in self._state.values())

    def _yield_to_optimizer(self) -> None:
        """Wait while the optimizer runs, as long as the writer has a staged unit to write: both are
        memory-bandwidth bound and the update is on the step's critical path, but a writer with nothing
        staged leaves the disk idle, which delays the commit by as long as the copier waits. A unit the
        optimizer reaches meanwhile it copies itself (``before_update``)."""
        if self._optimizer_busy is None:
            return
        start = time.perf_counter()
        while self._optimizer_busy() and self._writer_has_work() and not self.stop.is_set():
            self.stop.wait(0.001)
        self.yielded_s += time.perf_counter() - start

    def run_copier(self) -> None:
        """The copier thread's body. A failure aborts this version (every barrier released, the writer
        told why) instead of leaving a unit COPYING for the optimizer and the writer to wait on forever."""
        try:
            for unit in self.order:
                if self.stop.is_set():
                    return
                after = self._after.get(unit)
                if after is not None:
                    after.exception()  # wait for the unit's update of this step (an error is the optimizer's to raise)
                self._yield_to_optimizer()
                if self._claim(unit):
                    self._copy(unit)
        except Exception as e:
            self.copier_error = f"{type(e).__name__}: {e}"
            self.abort()

    def before_update(self, unit: int) -> None:
        """Called by the optimizer before it changes ``unit``: returns once version S of it is safe.

        An update that still belongs to step S (its Adam count is below S: the request came while
        it was queued) passes at once; the version is the state it produces."""
        if not self.barrier_enabled or int(self._adam_steps[unit]) < self.step:
            return
        start = time.perf_counter()
        if self._claim(unit):
            self._copy(unit)
        with self._cond:
            while self._state[unit] is UnitState.COPYING and not self.stop.is_set():
                self._cond.wait(timeout=0.1)
        self.blocked_s += time.perf_counter() - start

    # -- writing (writer thread) ---------------------------------------------------------------

    def wait_staged(self, unit: int, deadline_s: float) -> None:
        """Block until ``unit`` is STAGED; TimeoutError past ``deadline_s`` (monotonic), or if aborted."""
        with self._cond:
            while self._state[unit] is not UnitState.STAGED:
                if self.stop.is_set():
                    raise self._aborted()
                if time.monotonic() > deadline_s:
                    raise TimeoutError(f"checkpoint of step {self.step} timed out waiting for unit {unit}'s copy")
                self._cond.wait(timeout=0.1)

    def is_staged(self, unit: int) -> bool:
        with self._cond:
            return self._state[unit] is UnitState.STAGED

    def _aborted(self) -> RuntimeError:
        why = f": the copier failed: {self.copier_error}" if self.copier_error else ""
        return RuntimeError(f"checkpoint of step {self.step} aborted{why}")

    def mark_written(self, unit: int) -> None:
        with self._cond:
            if self.stop.is_set():  # abort released the slot already (the writer finished a shard meanwhile)
                raise self._aborted()
            self.ring.release(self._slot.pop(unit))
            self._state[unit] = UnitState.DONE
            self._cond.notify_all()

    def abort(self) -> None:
        """Release every barrier and staging slot: the optimizer proceeds, the version is dropped."""
        with self._cond:
            self.stop.set()
            for unit in self._state:
                if self._state[unit] is UnitState.STAGED:
                    self.ring.release(self._slot.pop(unit))
                self._state[unit] = UnitState.DONE
            self._cond.notify_all()
        self.ring.wake()
