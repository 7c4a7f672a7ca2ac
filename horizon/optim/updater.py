"""Per-unit optimizer updates on their own thread, overlapped with the device's work.

Why: with the state in host RAM the update is the other half of a step, and a serial update
after backward leaves the device idle. Each unit's update is a task on one worker thread (FIFO,
so updates and gradient norms run in the order they were submitted). Nothing reads a unit's
weights while its update may run: the engine's next load of that unit waits for the unit's
pending future, and every reader of the state calls ``wait_all`` first.

Two exact schedules use it (the trainer picks):
- no clipping: a unit is submitted as soon as its gradient has landed, overlapping the
  backward of the units before it;
- global-norm clipping: each unit's squared norm is computed as its gradient lands; once all are
  in, every unit is submitted in forward order, so the next step's forward of unit i waits only
  for update i while later units are still being updated.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import torch

from horizon.optim.adamw import AdamW, adamw_unit_step
from horizon.store.host_store import HostStore

__all__ = ["Updater"]


class Updater:
    def __init__(self, store: HostStore, optimizer: AdamW, *, delay_s: Callable[[], float] | None = None) -> None:
        self.store, self.optimizer, self.delay_s = store, optimizer, delay_s
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in store.units]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="horizon-optimizer")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._norms: dict[int, concurrent.futures.Future] = {}

    def _maybe_delay(self) -> None:
        if self.delay_s is not None:
            time.sleep(self.delay_s())

    def _update(self, unit: int, lr: float, grad_scale: float | None) -> None:
        self._maybe_delay()
        self.steps[unit] += 1
        adamw_unit_step(self.store.units[unit], self.steps[unit], self.optimizer, lr=lr, grad_scale=grad_scale)

    def _squared_norm(self, unit: int) -> torch.Tensor:
        self._maybe_delay()
        return torch.linalg.vector_norm(self.store.units[unit].grad, 2.0, dtype=torch.float32)

    def submit(self, unit: int, *, lr: float, grad_scale: float | None = None) -> None:
        """Queue the update of ``unit``; its gradient must have landed in the store."""
        assert unit not in self._pending or self._pending[unit].done(), f"unit {unit} updated twice in a step"
        self._pending[unit] = self._pool.submit(self._update, unit, lr, grad_scale)

    def submit_norm(self, unit: int) -> None:
        """Queue the gradient norm of ``unit`` (for global-norm clipping)."""
        self._norms[unit] = self._pool.submit(self._squared_norm, unit)

    def total_norm(self) -> torch.Tensor:
        """The 2-norm over every unit's gradient (waits for the norms submitted this step)."""
        norms = [self._norms.pop(unit).result() for unit in sorted(self._norms)]
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def pending(self, unit: int) -> concurrent.futures.Future | None:
        """The future of ``unit``'s update if one may still run (for the engine's next load)."""
        future = self._pending.get(unit)
        return None if future is None or future.done() and future.exception() is None else future

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
