"""One checkpoint version in flight: the per-unit copy-on-write barrier and the copier.

Why per unit: a unit's master, m and v are immutable from the end of its update of step S to
the start of its update of step S+1, so any copy taken in that window is exactly version S.
The copier walks the units in the order the next updates will touch them, waits for each one's
update of step S (it may still be running when ``step`` returns), waits while any optimizer task
runs while enough is staged to keep the disk busy (a concurrent memcpy doubled a 2-thread AdamW step
on the 2-core VM), and copies the unit into a staging slot 4 MiB at a time. The optimizer calls ``before_update(unit)`` before it mutates a unit: if the copier is
copying it, it waits for that memcpy; if nobody has started it, the optimizer copies it itself
(copy-on-write); it never waits for the disk. The writer reads staging slots only, and of a unit still
being copied only the prefix the copier has published (``wait_copied``), so its shard can be on its way
to disk before the whole unit is copied.

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
YIELD_BACKLOG_BYTES = 16 << 20
"""The copier yields to the optimizer only while at least this much is staged and not yet written (about
9 ms of a 1.8 GB/s disk, longer than one unit's update): a small unit staged (an embedding) must not keep
the disk idle while the next large unit waits for the optimizer."""
COPY_PIECE_BYTES = 4 << 20
"""The copier publishes its progress through a unit every this many bytes, so the writer can queue the
start of a unit's shard while the rest of it is still being copied (the disk does not wait for a whole unit)."""


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
        self._copied: dict[int, int] = {}  # by unit: bytes from the start of its slot that hold version S
        self.adam_step: dict[int, int] = {}
        """Each unit's Adam step count as copied (version S)."""
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self.barrier_enabled = True
        """False turns the barrier off (``Checkpointer.barrier_enabled``: the tests' negative control)."""
        self.blocked_s = 0.0
        """Seconds the optimizer spent in ``before_update`` for this version (waits and its own copies)."""
        self.yielded_s = 0.0
        """Seconds the copier waited for the optimizer to go idle before starting a unit."""
        self.copier_error: str | None = None
        """Why the copier thread stopped early, if it failed."""
        self.copy_s = 0.0
        """Seconds the copier thread spent copying (waits for slots included; the optimizer's own copies not)."""
        self.writer_waited_s = 0.0
        """Seconds the writer waited for copies (``wait_started``, ``wait_copied``)."""

    def staged_slot(self, unit: int) -> torch.Tensor:
        """The staging slot holding ``unit`` (master, m, v back to back), valid from the start of its copy
        (``wait_started``) until it is written. If ``abort`` released it meanwhile (a failed copier released
        every staged unit's slot), the abort's error: the writer reports why, not a missing key."""
        with self._cond:
            slot = self._slot.get(unit)
            if slot is None:
                assert self.stop.is_set(), f"unit {unit} has no staging slot"
                raise self._aborted()
            return self.ring.slot(slot)

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
        with self._cond:
            self._slot[unit] = slot
            self._copied[unit] = 0
            self._cond.notify_all()
        if unit in self.store.ssd_units:  # through an I/O slot, which the unit's next update then reuses
            self.ssd.copy_state(unit, {role: self.staged_view(unit, role) for role in ROLES})
        else:
            self._copy_in_pieces(unit)
        self.adam_step[unit] = int(self._adam_steps[unit])
        with self._cond:
            if self.stop.is_set():
                self.ring.release(self._slot.pop(unit))
                return
            self._state[unit] = UnitState.STAGED
            self._cond.notify_all()

    def _copy_in_pieces(self, unit: int) -> None:
        """Copy master, m and v into the slot ``COPY_PIECE_BYTES`` at a time, publishing the prefix done after
        each piece but the last (the whole unit is published as STAGED, once its step count is recorded)."""
        buffers, piece = self.store.units[unit], COPY_PIECE_BYTES // 4
        total_bytes, done_bytes = len(ROLES) * 4 * buffers.held_numel, 0
        for role in ROLES:
            source, target = getattr(buffers, role), self.staged_view(unit, role)
            for start in range(0, target.numel(), piece):
                end = min(target.numel(), start + piece)
                target[start:end].copy_(source[start:end])
                done_bytes += 4 * (end - start)
                if done_bytes < total_bytes:
                    with self._cond:
                        self._copied[unit] = done_bytes
                        self._cond.notify_all()

    def _writer_has_work(self) -> bool:
        """At least ``YIELD_BACKLOG_BYTES`` are staged and not yet written."""
        with self._cond:
            staged = [unit for unit, state in self._state.items() if state is UnitState.STAGED]
        return sum(len(ROLES) * 4 * self.store.units[unit].held_numel for unit in staged) >= YIELD_BACKLOG_BYTES

    def _yield_to_optimizer(self) -> None:
        """Wait while the optimizer runs, as long as the writer has enough staged to keep the disk busy: both
        are memory-bandwidth bound and the update is on the step's critical path, but a writer with little
        or nothing staged leaves the disk idle, which delays the commit by as long as the copier waits. A
        unit the optimizer reaches meanwhile it copies itself (``before_update``)."""
        if self._optimizer_busy is None:
            return
        start = None
        while self._optimizer_busy() and self._writer_has_work() and not self.stop.is_set():
            start = start or time.perf_counter()
            self.stop.wait(0.001)
        if start is not None:
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
                    start = time.perf_counter()
                    self._copy(unit)
                    self.copy_s += time.perf_counter() - start
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

    def _wait(self, ready: Callable[[], bool], unit: int, deadline_s: float) -> None:
        """(writer) Block, with ``_cond`` held, until ``ready()``; TimeoutError past ``deadline_s`` (monotonic),
        RuntimeError if aborted."""
        start = time.perf_counter()
        while not ready():
            if self.stop.is_set():
                raise self._aborted()
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"checkpoint of step {self.step} timed out waiting for unit {unit}'s copy")
            self._cond.wait(timeout=0.1)
        self.writer_waited_s += time.perf_counter() - start

    def wait_started(self, unit: int, deadline_s: float) -> None:
        """Block until ``unit`` has a staging slot (its copy began, ``staged_slot`` is valid) or is STAGED."""
        with self._cond:
            self._wait(lambda: unit in self._slot or self._state[unit] is UnitState.STAGED, unit, deadline_s)

    def wait_copied(self, unit: int, nbytes: int, deadline_s: float) -> int:
        """Block until at least the first ``nbytes`` of ``unit``'s slot hold version S; how many bytes do
        (the whole slot once the unit is STAGED)."""
        def copied() -> int:
            if self._state[unit] is UnitState.STAGED:
                return self.ring.slot_bytes
            return self._copied.get(unit, 0) if self._state[unit] is UnitState.COPYING else 0

        with self._cond:
            self._wait(lambda: copied() >= nbytes, unit, deadline_s)
            return copied()

    def _aborted(self) -> RuntimeError:
        why = f": the copier failed: {self.copier_error}" if self.copier_error else ""
        return RuntimeError(f"checkpoint of step {self.step} aborted{why}")

    def mark_written(self, unit: int) -> None:
        with self._cond:
            if self.stop.is_set():  # abort released the slot already (the writer finished a shard meanwhile)
                raise self._aborted()
            self.ring.release(self._slot.pop(unit))
            self._copied.pop(unit, None)
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
