"""Copies between the host store and the device, overlapped with compute.

Why two implementations: the same engine runs on CUDA and on the CPU. On CUDA, copies run on
dedicated streams and order against compute with events. On the CPU, "device" buffers are plain
tensors and a transfer thread stands in for the copy engine (a thread per direction when duplex,
as a GPU has), with futures as events; an optional throttle makes each thread behave like a link
of a given bandwidth, and an optional delay hook lets race tests reorder everything without
changing the schedule.

Lifetime rule (no ``record_stream``): a ``Handle`` holds every tensor its copy touches until a
consumer has waited on it. Device buffers are allocated on the compute stream, and a copy that
writes one first waits for the compute work queued before it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["Handle", "Transfer", "Gather", "CpuTransfer", "CudaTransfer", "make_transfer"]


class Handle:
    """One asynchronous copy; ``wait_device`` orders compute after it, ``wait_host`` blocks the CPU."""

    def __init__(self, *, future: concurrent.futures.Future | None = None, event=None, keep=()) -> None:
        self._future = future  # resolves when the copy is done (CPU) or enqueued, to its event (CUDA)
        self._event = event
        self._keep = keep

    def _resolve(self) -> None:
        if self._future is not None:
            result = self._future.result()
            if result is not None:
                self._event = result
            self._future = None

    def wait_device(self) -> None:
        self._resolve()
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        self._keep = ()

    def wait_host(self) -> None:
        self._resolve()
        if self._event is not None:
            self._event.synchronize()
        self._keep = ()

    def host_waiter(self) -> Callable[[], None]:
        """A callable that blocks until the copy is done on the host, safe on any thread.

        It holds nothing of the copy's tensors: their lifetime still ends at ``wait_device`` or
        ``wait_host`` on the issuing thread."""
        future, event = self._future, self._event

        def wait() -> None:
            result = future.result() if future is not None else None
            done = result if result is not None else event
            if done is not None:
                done.synchronize()

        return wait


DONE = Handle()
"""A handle for work that needed no copy."""


class Transfer:
    """The interface the engine uses; see the two implementations below.

    ``after``: host futures (pending optimizer updates of the source) the copy must wait for;
    the caller does not block on them. ``duplex``: whether copies to and from the device run at
    once, each at the full bandwidth (a GPU's two copy engines), or share one queue.
    """

    duplex: bool = False

    def h2d(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
            after: Sequence[concurrent.futures.Future] = ()) -> Handle:
        raise NotImplementedError

    def d2h(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> Handle:
        raise NotImplementedError

    def h2d_gather(self, gathers: Sequence[Gather], copies: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   after: Sequence[concurrent.futures.Future] = ()) -> Handle:
        """Sharded weights (ZeRO-3): for each ``Gather``, this rank's host piece goes into its part of the
        device buffer, then an all-gather fills the rest; then each ``(dst, src)`` device copy runs (a
        borrowed slice out of a gathered buffer). Collectives are issued in submission order."""
        raise NotImplementedError

    def d2h_reduce(self, dst: torch.Tensor, whole: torch.Tensor, shard: torch.Tensor,
                   reduce_scatter: Callable[[torch.Tensor, torch.Tensor], None]) -> Handle:
        """Sharded gradients: ``reduce_scatter(shard, whole)`` on the device, then ``shard`` to the host ``dst``."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a measurement of this link depends on (the profile cache's key, ``planner/cache.py``)."""
        return {"kind": type(self).__name__, "duplex": self.duplex}

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Gather:
    """An all-gather of a unit's weights into ``out`` (device) from this rank's host ``piece``."""

    out: torch.Tensor
    piece: torch.Tensor
    rank: int
    gather: Callable[[torch.Tensor, torch.Tensor], None]  # gather(out, piece): the collective

    @property
    def part(self) -> torch.Tensor:
        """This rank's part of ``out``."""
        n = self.piece.numel()
        return self.out[self.rank * n:(self.rank + 1) * n]


def _copy_all(dsts, srcs) -> None:
    """Copy on this thread alone, as one DMA engine would: ``copy_`` of a large tensor would borrow
    torch's intra-op threads, the cores that compute and the optimizer's kernel are using."""
    for dst, src in zip(dsts, srcs, strict=True):
        if dst.dtype == src.dtype and dst.numel() == src.numel() and dst.is_contiguous() and src.is_contiguous():
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())  # releases the GIL
            torch.autograd.graph.increment_version(dst)  # as copy_ would: autograd sees the write
        else:
            dst.copy_(src)


class CpuTransfer(Transfer):
    """A transfer thread; copies run in submission order, like one DMA engine.

    ``duplex=True``: a second thread for copies to the host, as a GPU has a copy engine per
    direction; each direction is throttled to ``bandwidth_bytes_per_s`` on its own. Collectives
    (sharded loads and gradient reductions) all stay on the first thread, so every rank issues them
    in the engine's order.
    """

    def __init__(self, *, bandwidth_bytes_per_s: float | None = None,
                 delay_s: Callable[[], float] | None = None, duplex: bool = False) -> None:
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s must be positive, got {bandwidth_bytes_per_s}")
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.delay_s = delay_s
        self.duplex = duplex
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="horizon-transfer")
        self._d2h_pool = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="horizon-d2h")
                          if duplex else self._pool)

    def describe(self) -> dict:
        return super().describe() | {"bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
                                     "delay_hook": self.delay_s is not None}

    def _wait(self, after) -> float:
        """Wait for ``after`` and the delay hook; the start time the throttle counts from."""
        for future in after:
            future.result()
        start = time.perf_counter()
        if self.delay_s is not None:
            time.sleep(self.delay_s())
        return start

    def _throttle(self, start: float, srcs) -> None:
        if self.bandwidth_bytes_per_s is not None:
            nbytes = sum(s.numel() * s.element_size() for s in srcs)
            remaining_s = nbytes / self.bandwidth_bytes_per_s - (time.perf_counter() - start)
            if remaining_s > 0:
                time.sleep(remaining_s)

    def _run(self, dsts, srcs, after=()) -> None:
        start = self._wait(after)
        _copy_all(dsts, srcs)
        self._throttle(start, srcs)

    def h2d(self, dsts, srcs, after=()) -> Handle:
        return Handle(future=self._pool.submit(self._run, list(dsts), list(srcs), list(after)))

    def d2h(self, dsts, srcs) -> Handle:
        return Handle(future=self._d2h_pool.submit(self._run, list(dsts), list(srcs)))

    def _gather(self, gathers, copies, after) -> None:
        start = self._wait(after)
        for g in gathers:  # gloo gathers straight from the host piece: the "device" is host memory
            g.gather(g.out, g.piece)
        _copy_all([dst for dst, _ in copies], [src for _, src in copies])
        self._throttle(start, [g.piece for g in gathers])  # only this rank's piece crossed the link

    def h2d_gather(self, gathers, copies, after=()) -> Handle:
        return Handle(future=self._pool.submit(self._gather, list(gathers), list(copies), list(after)))

    def _reduce(self, dst, whole, shard, reduce_scatter) -> None:
        start = self._wait(())
        reduce_scatter(shard, whole)
        if shard is not dst:
            dst.copy_(shard)
        self._throttle(start, [shard])  # only this rank's shard of the sum crosses the link

    def d2h_reduce(self, dst, whole, shard, reduce_scatter) -> Handle:
        return Handle(future=self._pool.submit(self._reduce, dst, whole, shard, reduce_scatter))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._d2h_pool.shutdown(wait=True)


class CudaTransfer(Transfer):
    """Two high-priority copy streams: H2D (weights, activations in) and D2H (grads, activations out).

    Each copy first waits for an event recorded on the compute stream at submission, so a buffer
    the compute stream is still reading or has just allocated is never overwritten early.
    """

    duplex = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Overlaps the next unit's weights with the current unit's compute.
        self.h2d_stream = torch.cuda.Stream(device, priority=-1)
        # Overlaps gradient and activation offload with the next unit's compute.
        self.d2h_stream = torch.cuda.Stream(device, priority=-1)
        # Sharded runs: weight all-gathers and gradient reduce-scatters, on one stream of their own, so
        # every rank runs them in one order (the order the launcher thread issues them in).
        self.collective_stream = torch.cuda.Stream(device, priority=-1)
        # Enqueues loads whose source is still being updated by the optimizer, once it is done.
        self._launcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="horizon-h2d")

    @staticmethod
    def _enqueue(stream, compute_ready, dsts, srcs, after=()):
        for future in after:
            future.result()
        with torch.cuda.stream(stream):
            stream.wait_event(compute_ready)
            for dst, src in zip(dsts, srcs, strict=True):
                dst.copy_(src, non_blocking=True)
            return stream.record_event()

    def _copy_on(self, stream, dsts, srcs, after=()) -> Handle:
        dsts, srcs, after = list(dsts), list(srcs), list(after)
        compute_ready = torch.cuda.current_stream(self.device).record_event()
        if any(not f.done() for f in after):
            future = self._launcher.submit(self._enqueue, stream, compute_ready, dsts, srcs, after)
            return Handle(future=future, keep=(dsts, srcs))
        return Handle(event=self._enqueue(stream, compute_ready, dsts, srcs, after), keep=(dsts, srcs))

    def h2d(self, dsts, srcs, after=()) -> Handle:
        return self._copy_on(self.h2d_stream, dsts, srcs, after)

    def d2h(self, dsts, srcs) -> Handle:
        return self._copy_on(self.d2h_stream, dsts, srcs)

    def _enqueue_gather(self, compute_ready, gathers, copies, after):
        for future in after:
            future.result()
        with torch.cuda.stream(self.h2d_stream):
            self.h2d_stream.wait_event(compute_ready)
            for g in gathers:
                g.part.copy_(g.piece, non_blocking=True)
            pieces_ready = self.h2d_stream.record_event()
        with torch.cuda.stream(self.collective_stream):
            self.collective_stream.wait_event(pieces_ready)
            for g in gathers:
                g.gather(g.out, g.part)  # in place: NCCL reads this rank's part of the output
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
            return self.collective_stream.record_event()

    def _enqueue_reduce(self, compute_ready, dst, whole, shard, reduce_scatter):
        with torch.cuda.stream(self.collective_stream):
            self.collective_stream.wait_event(compute_ready)
            reduce_scatter(shard, whole)
            reduced = self.collective_stream.record_event()
        with torch.cuda.stream(self.d2h_stream):
            self.d2h_stream.wait_event(reduced)
            dst.copy_(shard, non_blocking=True)
            return self.d2h_stream.record_event()

    # Every collective goes through the launcher thread, in submission order: every rank then issues
    # them in the engine's order (as the CPU transfer's single thread does), even when a gather waits
    # for an optimizer update, and one stream runs them in that order.

    def h2d_gather(self, gathers, copies, after=()) -> Handle:
        gathers, copies = list(gathers), list(copies)
        compute_ready = torch.cuda.current_stream(self.device).record_event()
        future = self._launcher.submit(self._enqueue_gather, compute_ready, gathers, copies, list(after))
        return Handle(future=future, keep=(gathers, copies))

    def d2h_reduce(self, dst, whole, shard, reduce_scatter) -> Handle:
        compute_ready = torch.cuda.current_stream(self.device).record_event()
        future = self._launcher.submit(self._enqueue_reduce, compute_ready, dst, whole, shard, reduce_scatter)
        return Handle(future=future, keep=(dst, whole, shard))

    def close(self) -> None:
        self._launcher.shutdown(wait=True)
        torch.cuda.synchronize(self.device)


def make_transfer(device: torch.device, *, bandwidth_bytes_per_s: float | None = None,
                  delay_s: Callable[[], float] | None = None, duplex: bool = False) -> Transfer:
    if device.type == "cuda":
        if bandwidth_bytes_per_s is not None or delay_s is not None or duplex:
            raise ValueError("the transfer throttle, delay hook and duplex switch exist only for device='cpu' "
                             "(CUDA copies are duplex already)")
        return CudaTransfer(device)
    return CpuTransfer(bandwidth_bytes_per_s=bandwidth_bytes_per_s, delay_s=delay_s, duplex=duplex)
