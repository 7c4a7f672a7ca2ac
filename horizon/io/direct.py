"""Direct (O_DIRECT) file I/O: page-aligned buffers, preallocated files, batches with futures.

Why O_DIRECT: the SSD tier streams gigabytes of optimizer state per step. Through the page cache
every byte would be copied once more and, worse, cached: the kernel would fill host RAM with
state that was put on disk precisely to leave RAM free. O_DIRECT moves data between the disk and
our own aligned buffers and nothing else, so host memory stays what the store allocated.

Two backends behind one interface (``DirectIO``):
- "io_uring" / "threads": ``horizon._native_io`` (native/direct_io.cpp), built at install time.
  io_uring is probed when the engine starts (a kernel that refuses it, by age, sysctl or seccomp,
  gets the pread/pwrite thread pool instead);
- "python": ``os.preadv``/``os.pwritev`` on a thread pool, selected when the native module is
  missing. Same requests, same errors, tested against the native path.
Every request must have a 4096-byte aligned buffer address, length and file offset; anything else
is a ValueError before anything is submitted. A failed request raises ``OSError`` with its errno
and the file's path from the batch's ``result()``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os

import torch

from horizon.io.python_io import PythonEngine

__all__ = ["ALIGN_BYTES", "DirectFile", "DirectIO", "IOFuture", "IORequest", "aligned_empty", "native_io_available"]

log = logging.getLogger(__name__)

try:
    from horizon import _native_io
except ImportError as exc:  # built with optional=True: no compiler at install time
    _native_io = None
    log.info("horizon._native_io is not built (%s); the SSD tier uses Python's os.preadv/os.pwritev. "
             "Reinstall with `pip install -e .` (needs a C++17 compiler) for io_uring.", exc)

ALIGN_BYTES = 4096
"""Alignment of every direct request's buffer address, length and file offset."""

_BACKENDS = ("auto", "io_uring", "threads", "python")


def native_io_available() -> bool:
    """True when ``horizon._native_io`` was built and imported."""
    return _native_io is not None


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 CPU tensor of ``nbytes`` (a positive multiple of ALIGN_BYTES), from an
    anonymous mapping: untouched pages cost no RAM."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0 or nbytes % ALIGN_BYTES:
        raise ValueError(f"aligned_empty needs a positive multiple of {ALIGN_BYTES} bytes, got {nbytes!r}")
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


class DirectFile:
    """A file opened with O_DIRECT, preallocated to ``size_bytes`` (so a full disk shows up here,
    with the path, and not halfway through training). ``size_bytes=0`` skips the preallocation."""

    def __init__(self, path: str | os.PathLike, *, size_bytes: int) -> None:
        self.path = os.fspath(path)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0 \
                or size_bytes % ALIGN_BYTES:
            raise ValueError(f"DirectFile({self.path!r}): size_bytes must be a multiple of {ALIGN_BYTES}, "
                             f"got {size_bytes!r}")
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(errno.ENOENT, "directory for the SSD tier does not exist; create it or choose "
                                    "another SSDConfig.dir", directory)
        self.fd = self._open()
        self.size_bytes = size_bytes
        if size_bytes:
            try:
                os.posix_fallocate(self.fd, 0, size_bytes)
            except OSError as e:
                os.close(self.fd)
                raise OSError(e.errno, f"cannot reserve {size_bytes:,} bytes on disk ({os.strerror(e.errno)}); "
                              "free space or choose another SSDConfig.dir", self.path) from e

    def _open(self) -> int:
        if _native_io is not None:
            return _native_io.open_direct(self.path, True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno), self.path) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass(frozen=True)
class IORequest:
    """Read ``file`` at ``offset_bytes`` into ``buffer`` (all of it), or write ``buffer`` there."""

    op: str               # "read" or "write"
    file: DirectFile
    buffer: torch.Tensor  # contiguous CPU tensor, any dtype
    offset_bytes: int


def check_request(index: int, r: IORequest) -> tuple[int, int, int, int, int]:
    """The request as (op, fd, address, nbytes, offset); ValueError if O_DIRECT cannot take it."""
    if r.op not in ("read", "write"):
        raise ValueError(f"request {index}: op must be 'read' or 'write', got {r.op!r}")
    if not isinstance(r.file, DirectFile) or r.file.fd < 0:
        raise ValueError(f"request {index}: file must be an open horizon.io.DirectFile")
    b = r.buffer
    if not isinstance(b, torch.Tensor) or b.device.type != "cpu" or not b.is_contiguous():
        raise ValueError(f"request {index}: buffer must be a contiguous CPU tensor (use horizon.io.aligned_empty)")
    address, nbytes = b.data_ptr(), b.numel() * b.element_size()
    for what, value in (("buffer address", address), ("length", nbytes), ("file offset", r.offset_bytes)):
        if value % ALIGN_BYTES:
            raise ValueError(f"request {index} ({r.file.path}): the {what} {value} is not a multiple of "
                             f"{ALIGN_BYTES} bytes; O_DIRECT needs aligned buffers, lengths and offsets "
                             "(allocate with horizon.io.aligned_empty and pad lengths)")
    return (0 if r.op == "read" else 1), r.file.fd, address, nbytes, r.offset_bytes


class IOFuture:
    """Completion of one batch: ``result()`` waits, then raises the first failure as OSError."""

    def __init__(self, wait, done, requests: list[IORequest]) -> None:
        self._wait, self._done, self._requests = wait, done, requests
        self._outcome: tuple[int, int] | None = None

    def done(self) -> bool:
        return self._outcome is not None or self._done()

    def result(self) -> None:
        if self._outcome is None:
            self._outcome = self._wait()
        code, index = self._outcome
        if code:
            r = self._requests[index]
            nbytes = r.buffer.numel() * r.buffer.element_size()
            raise OSError(code, f"{r.op} of {nbytes:,} bytes at offset {r.offset_bytes:,} failed: "
                          f"{os.strerror(code)}", r.file.path)


class DirectIO:
    """Batched O_DIRECT reads and writes on a background engine.

    ``backend``: "auto" (native io_uring if the kernel allows it, else native threads, else Python),
    "io_uring" (native; its thread pool if the kernel refuses io_uring), "threads" (native pool) or
    "python". ``num_workers`` threads (thread backends), ``queue_depth`` requests in flight (io_uring);
    requests are split into ``chunk_bytes`` pieces.
    """

    def __init__(self, *, backend: str = "auto", num_workers: int = 4, queue_depth: int = 16,
                 chunk_bytes: int = 8 << 20) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"DirectIO backend must be one of {_BACKENDS}, got {backend!r}")
        if backend in ("io_uring", "threads") and _native_io is None:
            raise ValueError(f"DirectIO(backend={backend!r}) needs horizon._native_io, which is not built; "
                             "reinstall with `pip install -e .` (C++17 compiler) or use backend='python'")
        for name, value in (("num_workers", num_workers), ("queue_depth", queue_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DirectIO {name} must be an int >= 1, got {value!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < ALIGN_BYTES \
                or chunk_bytes % ALIGN_BYTES:
            raise ValueError(f"DirectIO chunk_bytes must be a positive multiple of {ALIGN_BYTES}, got {chunk_bytes!r}")
        if backend == "python" or (backend == "auto" and _native_io is None):
            self._native, self._python = None, PythonEngine(num_workers=num_workers, chunk_bytes=chunk_bytes)
            self.backend = "python"
        else:
            self._native = _native_io.engine(num_workers, backend != "threads", queue_depth, chunk_bytes)
            self._python = None
            self.backend = _native_io.backend(self._native)

    def submit(self, requests: list[IORequest]) -> IOFuture:
        """Queue every request at once; they may complete in any order."""
        if self._native is None and self._python is None:
            raise ValueError("DirectIO is closed")
        tuples = [check_request(i, r) for i, r in enumerate(requests)]
        if self._python is not None:
            wait, done = self._python.submit(tuples)
            return IOFuture(wait, done, list(requests))
        batch = _native_io.submit(self._native, tuples)
        return IOFuture(lambda: _native_io.wait(batch), lambda: _native_io.done(batch), list(requests))

    def read(self, file: DirectFile, buffer: torch.Tensor, offset_bytes: int) -> IOFuture:
        return self.submit([IORequest("read", file, buffer, offset_bytes)])

    def write(self, file: DirectFile, buffer: torch.Tensor, offset_bytes: int) -> IOFuture:
        return self.submit([IORequest("write", file, buffer, offset_bytes)])

    def close(self) -> None:
        """Finish what is queued and stop the engine."""
        if self._python is not None:
            self._python.close()
        self._native = self._python = None
