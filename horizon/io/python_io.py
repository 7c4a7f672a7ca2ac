"""The pure-Python direct I/O engine: ``os.preadv``/``os.pwritev`` on a thread pool.

Used when ``horizon._native_io`` is not built, and as the reference the native engine is tested
against. The system calls release the GIL, so several threads keep several requests in flight.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os

__all__ = ["PythonEngine", "transfer"]


def transfer(op: int, fd: int, address: int, nbytes: int, offset: int) -> int:
    """One request to completion (short transfers retried); 0 or the errno of the failure."""
    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    done = 0
    while done < nbytes:
        try:
            part = view[done:]
            n = os.preadv(fd, [part], offset + done) if op == 0 else os.pwritev(fd, [part], offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            return e.errno
        if n == 0:
            return errno.ENODATA if op == 0 else errno.ENOSPC
        done += n
    return 0


class PythonEngine:
    def __init__(self, *, num_workers: int, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="horizon-direct-io")

    def submit(self, requests: list[tuple[int, int, int, int, int]]):
        """Split into chunks and queue them; returns (wait, done) for the batch, as the native engine does."""
        futures = []
        for index, (op, fd, address, nbytes, offset) in enumerate(requests):
            for at in range(0, nbytes, self.chunk_bytes):
                n = min(self.chunk_bytes, nbytes - at)
                futures.append((index, self._pool.submit(transfer, op, fd, address + at, n, offset + at)))

        def wait() -> tuple[int, int]:
            outcomes = [(future.result(), index) for index, future in futures]
            return next(((code, index) for code, index in outcomes if code), (0, -1))

        return wait, lambda: all(future.done() for _, future in futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
