"""A timeline of one training step on the CPU engine: who ran what, on which thread, when.

Why: ``bench/overlap.py`` says *how much* of the optimizer is exposed; this says *where*. It wraps
the functions that make a step (the stand-in compute, the transfer thread's copies and its waits
for pending updates, the optimizer worker's updates, the main thread's waits on copies) with
``time.perf_counter`` spans, keyed by thread. Wrapping happens inside ``Timeline.attached()`` and
is undone on exit, so nothing outside a traced round is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import defaultdict

import horizon.engine.transfer as transfer_module
import horizon.optim.updater as updater_module


@dataclasses.dataclass
class Span:
    thread: str
    kind: str      # compute | copy | copy_wait_update | throttle | update | wait_device | wait_host | step
    label: str
    start_s: float
    end_s: float


class Timeline:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def record(self, kind: str, label: str, start_s: float) -> None:
        span = Span(threading.current_thread().name, kind, label, start_s, time.perf_counter())
        with self._lock:
            self.spans.append(span)

    def _wrap(self, obj, name: str, kind: str, label=lambda *a, **k: ""):
        real = getattr(obj, name)

        def traced(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.record(kind, label(*args, **kwargs), start)

        setattr(obj, name, traced)
        return lambda: setattr(obj, name, real)

    @contextlib.contextmanager
    def attached(self, stand_in, trainer_cls):
        """Trace ``stand_in`` (an autograd.Function's forward/backward take the compute), the CPU
        transfer layer, the updater and ``trainer_cls.step`` while the block runs."""
        undo = [
            self._wrap(stand_in, "forward", "compute", lambda ctx, *a: "fwd"),
            self._wrap(stand_in, "backward", "compute", lambda ctx, *a: "bwd"),
            self._wrap(transfer_module, "_copy_all", "copy", lambda d, s: f"{sum(x.numel() for x in s)}"),
            self._wrap(transfer_module.Handle, "wait_device", "wait_device"),
            self._wrap(transfer_module.Handle, "wait_host", "wait_host"),
            self._wrap(updater_module.Updater, "_update", "update", lambda self_, unit, *a, **k: str(unit)),
            self._wrap(trainer_cls, "step", "step"),
        ]
        real_run = transfer_module.CpuTransfer._run

        def run(transfer, dsts, srcs, after=()):
            start = time.perf_counter()
            for future in after:
                future.result()
            if after:
                self.record("copy_wait_update", "", start)
            start = time.perf_counter()
            real_run(transfer, dsts, srcs, ())
            self.record("copy_task", "", start)

        transfer_module.CpuTransfer._run = run
        undo.append(lambda: setattr(transfer_module.CpuTransfer, "_run", real_run))
        try:
            yield self
        finally:
            for fn in reversed(undo):
                fn()

    def summary(self, steps: int) -> dict:
        """Per step: seconds each (thread, kind) spent, and the main thread's time not in compute."""
        by: dict[str, float] = defaultdict(float)
        for s in self.spans:
            by[f"{s.thread.split('_')[0]}:{s.kind}"] += s.end_s - s.start_s
        out = {k: round(v / steps * 1e3, 2) for k, v in sorted(by.items())}
        return out

    def rows(self) -> list[dict]:
        """Every span, times in seconds from the first one's start, in start order."""
        t0 = min(s.start_s for s in self.spans)
        rows = [dataclasses.asdict(s) | {"start_s": s.start_s - t0, "end_s": s.end_s - t0} for s in self.spans]
        return sorted(rows, key=lambda r: r["start_s"])
