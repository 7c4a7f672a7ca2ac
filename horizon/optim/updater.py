"""Per-unit optimizer work on its own thread, overlapped with the device's work.

Why: with the state in host RAM the update is the other half of a step, and a serial update
after backward leaves the device idle. Everything the optimizer does to a unit is a task on one
worker thread (FIFO: tasks run in submission order). Nothing reads a unit's weights while its
update may run: the engine's next load of that unit waits for the unit's pending future, and
every reader of the state calls ``wait_all`` first.

Two exact schedules (``StepPlan.eager`` picks):
- eager (no clipping, no accumulation, non-finite gradients not checked): a unit is updated as
  soon as its gradient has landed, overlapping the backward of the units before it;
- deferred (everything else): the global norm decides (skip a non-finite step, clip), then every
  unit is submitted in forward order, so the next step's forward of unit i waits only for update
  i while later units are still being updated. With one micro-batch the engine takes the norm on
  the device as gradients are made (``finish(grad_norm=...)``) and the worker has nothing to do
  until then; with accumulation, the worker folds each landed gradient into the fp32 accumulator
  and takes the norm of the sum after the last micro-batch.
Under data parallelism (``reducer``, horizon.distributed), the worker sums each unit's complete
gradient over the ranks before its norm (deferred) or its update (eager), and ``finish`` turns
the local norm into the global one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch

from horizon.optim.adamw import AdamW, adamw_unit_step, optimizer_threads, overlap_threads
from horizon.optim.clip import clip_scale
from horizon.store.grad_ring import GradRing
from horizon.store.host_store import HostStore, UnitBuffers
from horizon.store.ssd import SSDTier

__all__ = ["Updater", "NonFiniteGradientError", "WHOLE_CORE_UNITS"]


WHOLE_CORE_UNITS = (0, 1)
"""The embedding and the first block. Their updates come last in the eager schedule (and first in the
deferred one), and the next step's first compute (the first block's forward) waits for both with
nothing else to run: they are exposed, so they get every core (the timeline in docs/optim.md)."""


class GradientReducer(Protocol):
    """Data parallelism's part in an update (horizon.distributed.DataParallel)."""

    def reduce(self, unit: UnitBuffers, grad: torch.Tensor) -> torch.Tensor:
        """On the worker: the sum over ranks of ``grad`` (``unit``'s whole gradient), or this rank's shard of it."""

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The norm of the whole summed gradient, from the norm of what ``reduce`` returned on this rank."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or NaN and ``on_nonfinite="raise"``; nothing was updated."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    grad_norm: float | None  # the global norm of the (averaged) gradient, when it was taken
    skipped: bool            # True when a non-finite gradient skipped the update


class Updater:
    def __init__(self, store: HostStore, optimizer: AdamW, *, decay_runs: list[list[tuple[int, int, float]]],
                 delay_s: Callable[[], float] | None = None,
                 before_update: Callable[[int], None] | None = None,
                 reducer: GradientReducer | None = None, ssd: SSDTier | None = None,
                 grads: GradRing | None = None) -> None:
        self.store, self.optimizer, self.delay_s = store, optimizer, delay_s
        self.ssd = ssd
        """Where the state of ``store.ssd_units`` lives; each of their updates reads it ahead and writes it back."""
        self.grads = grads
        """Where the gradients of ``store.streamed`` units land: consumed by the eager update, else spilled to SSD."""
        self.before_update = before_update
        """Called with a unit's index before its update changes anything (the checkpoint barrier)."""
        self.reducer = reducer
        """Sums each unit's complete gradient over data-parallel ranks before its norm or update."""
        self._reduced: dict[int, torch.Tensor] = {}  # by unit: the summed gradient (or this rank's shard of it)
        self.decay_runs = decay_runs
        self.eager_threads = overlap_threads()
        """Threads of an eager update: it overlaps two computes of the backward (recompute, backward)
        and the engine's copies, so it leaves one core to the engine's threads."""
        self.all_threads = optimizer_threads()
        """Threads of a deferred update (one compute of the forward to hide under, so it needs the
        kernel's full speed) and of the updates of ``WHOLE_CORE_UNITS``, which the engine can only wait for."""
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in store.units]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="horizon-optimizer")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._norms: dict[int, concurrent.futures.Future] = {}

    # -- on the worker ------------------------------------------------------------------------

    def _maybe_delay(self) -> None:
        if self.delay_s is not None:
            time.sleep(self.delay_s())

    def _source(self, unit: int) -> torch.Tensor:
        if unit in self._reduced:
            return self._reduced[unit]
        buffers = self.store.units[unit]
        return buffers.grad_accum if buffers.grad_accum is not None else buffers.grad

    def _reduce(self, unit: int) -> None:
        if self.reducer is not None:
            self._reduced.pop(unit, None)  # the last step's sum is not this step's gradient
            self._reduced[unit] = self.reducer.reduce(self.store.units[unit], self._source(unit))

    def _update(self, unit: int, lr: float, grad_scale: float | None, descending: bool,
                landed: Callable[[], None] | None = None, grad: torch.Tensor | None = None) -> None:
        """``landed``: the eager schedule's wait for the gradient's copy; it then reduces it too.
        ``grad``: a streamed unit's gradient (its ring buffer), when the eager schedule hands it over."""
        eager = landed is not None or grad is not None
        self._maybe_delay()
        if landed is not None:
            landed()
            self._reduce(unit)
        if self.before_update is not None:
            self.before_update(unit)
        self.steps[unit] += 1
        buffers = self.store.units[unit]
        on_ssd = unit in self.store.ssd_units
        if on_ssd:  # the state read ahead into an I/O slot; the next SSD unit's read starts now
            views = self.ssd.acquire(unit)
            spilled = views.pop("grad", None)  # a streamed unit's gradient, read back with its state
            grad = grad if grad is not None else spilled
            buffers = dataclasses.replace(buffers, **views)
            self.ssd.prefetch(self.ssd.next_unit(unit, descending=descending))
        with torch.profiler.record_function(f"horizon.adamw.{unit}"):
            adamw_unit_step(buffers, self.steps[unit], self.optimizer, lr=lr,
                            grad=grad if grad is not None else self._source(unit), grad_scale=grad_scale,
                            decay_runs=self.decay_runs[unit], num_threads=self._threads(unit, eager=eager))
        if on_ssd:
            self.ssd.release(unit)

    def _threads(self, unit: int, *, eager: bool) -> int:
        return self.eager_threads if eager and unit not in WHOLE_CORE_UNITS else self.all_threads

    def _fold(self, unit: int, first: bool, last: bool, landed: Callable[[], None]) -> torch.Tensor | None:
        self._maybe_delay()
        landed()
        buffers = self.store.units[unit]
        if buffers.grad_accum is not None:
            if first:
                buffers.grad_accum.copy_(buffers.grad)
            else:
                buffers.grad_accum.add_(buffers.grad)
        if not last:
            return None
        self._reduce(unit)
        with torch.profiler.record_function(f"horizon.grad_norm.{unit}"):
            return torch.linalg.vector_norm(self._source(unit), 2.0, dtype=torch.float32)

    # -- on the caller's thread ------------------------------------------------------------------

    def landed(self, unit: int, landed: Callable[[], None], *, first_micro: bool, last_micro: bool,
               eager_lr: float | None, norm_on_device: bool = False) -> None:
        """``unit``'s gradient of one micro-batch is on its way to the store (``landed()`` waits for it):
        fold it in, or update at once. The worker waits, so the update starts the moment the copy ends.

        ``norm_on_device``: the caller brings the global norm to ``finish``; nothing to take here.
        A streamed unit's gradient (in ``grads``) goes to its eager update, or else to SSD until ``finish``:
        the engine reports it once it has landed in the ring, so ``landed`` is a no-op for it."""
        if unit in self.store.streamed:
            self._landed_streamed(unit, eager_lr)
            return
        if eager_lr is not None:  # last unit first
            self._pending[unit] = self._pool.submit(self._update, unit, eager_lr, None, True, landed)
            return
        if norm_on_device and self.store.units[unit].grad_accum is None:
            return
        future = self._pool.submit(self._fold, unit, first_micro, last_micro, landed)
        self._pending[unit] = future  # the unit's next gradient must not land before this fold read it
        if last_micro:
            self._norms[unit] = future

    def _landed_streamed(self, unit: int, eager_lr: float | None) -> None:
        if eager_lr is not None:
            future = self._pool.submit(self._update, unit, eager_lr, None, True, None, self.grads.held(unit))
            self._pending[unit] = future
        else:  # the deferred schedule takes the norm on the device (no accumulation with streamed weights)
            future = self.ssd.spill_grad(unit, self.grads.padded(unit))
        self.grads.hand_on(unit, future)

    def finish(self, *, lr: float, divisor: int, clip_norm: float | None, on_nonfinite: str,
               grad_norm: torch.Tensor | None = None) -> Outcome:
        """After the last micro-batch: check, clip and submit every unit's update in forward order.

        ``grad_norm``: the global norm (a 0-d fp32 CPU tensor) when the engine took it on the device."""
        if self.grads is not None:
            self.grads.drain()  # spilled gradients are on SSD before an update reads them back
        if grad_norm is None:
            norms = [self._norms.pop(unit).result() for unit in sorted(self._norms)]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
            if self.reducer is not None:
                grad_norm = self.reducer.global_norm(grad_norm)
        total = grad_norm / divisor
        norm = float(total)
        if not math.isfinite(norm):
            if on_nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"the gradient norm is {norm}: a gradient holds inf or NaN; nothing was updated "
                    "(use on_nonfinite='skip' to skip such steps)")
            return Outcome(grad_norm=norm, skipped=True)
        scale = clip_scale(total, clip_norm) if clip_norm is not None else None
        if divisor != 1:
            scale = (1.0 if scale is None else scale) / divisor
        for unit in range(len(self.store.units)):
            self._submit_update(unit, lr, scale, descending=False)
        return Outcome(grad_norm=norm, skipped=False)

    def _submit_update(self, unit: int, lr: float, grad_scale: float | None, *, descending: bool) -> None:
        self._pending[unit] = self._pool.submit(self._update, unit, lr, grad_scale, descending)

    def pending(self, unit: int) -> concurrent.futures.Future | None:
        """The future of ``unit``'s last task if it may still run (the engine's next load waits for it).

        Tasks run in submission order, so the last one done means all of the unit's are done."""
        future = self._pending.get(unit)
        return None if future is None or future.done() and future.exception() is None else future

    def busy(self) -> bool:
        """True while an optimizer task is queued or running (the checkpoint copier yields to it)."""
        return any(not future.done() for future in list(self._pending.values()))

    def wait(self, unit: int) -> None:
        future = self._pending.pop(unit, None)
        if future is not None:
            future.result()

    def wait_all(self) -> None:
        for unit in list(self._pending):
            self.wait(unit)

    def close(self) -> None:
        try:
            self.wait_all()
        finally:
            self._pool.shutdown(wait=True)
