"""Page-lock an existing CPU tensor in place, so CUDA can DMA from it directly.

Copies from pageable memory go through a driver staging buffer and cannot overlap compute, so
the host store must be pinned. ``tensor.pin_memory()`` is the wrong tool for it: it copies into
a block from PyTorch's caching host allocator, which rounds each request up to a power of two
(a 20 GiB store takes 32 GiB) and needs both copies alive at once. Registering the memory the
store already owns with ``cudaHostRegister`` pins it where it is, at its exact size. A single
registration of 512 GiB or more fails on CUDA, so large stores are registered in chunks whose
boundaries fall on page boundaries: the driver pins whole pages, and two registrations sharing
a page would collide. A single copy must not span two registrations (the driver rejects it
with an invalid-argument error), so a caller whose copies cover known extents passes their
starts as ``split_at`` and chunks end only there.
"""

from __future__ import annotations

import mmap
from types import TracebackType

import torch

__all__ = ["PinnedRegion", "chunk_ranges", "grouped_ranges"]

_DEFAULT_CHUNK_BYTES = 256 * 2**30
_CUDA_HOST_REGISTER_DEFAULT = 0  # cudaHostRegisterDefault
_CUDA_SUCCESS = 0


def chunk_ranges(
    nbytes: int, chunk_bytes: int, *, base_address: int = 0, page_bytes: int = 1
) -> list[tuple[int, int]]:
    """Split ``nbytes`` into (offset, length) chunks of at most ``chunk_bytes``.

    The chunks cover ``[0, nbytes)`` exactly, in order, without overlap; only the first and
    last may be short. With ``page_bytes > 1`` the chunk size is rounded down to whole pages
    (at least one) and every boundary between chunks falls on a page boundary of the absolute
    address ``base_address + offset``, so no two chunks share a page.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    if page_bytes <= 0:
        raise ValueError(f"page_bytes must be > 0, got {page_bytes}")
    if nbytes == 0:
        return []
    step_bytes = max(page_bytes, chunk_bytes - chunk_bytes % page_bytes)
    lead_bytes = base_address % page_bytes
    ranges: list[tuple[int, int]] = []
    for aligned_start in range(0, nbytes + lead_bytes, step_bytes):
        offset = max(0, aligned_start - lead_bytes)
        end = min(nbytes, aligned_start + step_bytes - lead_bytes)
        ranges.append((offset, end - offset))
    return ranges


def grouped_ranges(nbytes: int, split_at: list[int], chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) chunks of ``[0, nbytes)`` that start only at 0 or an offset in ``split_at``,
    each as long as possible up to ``chunk_bytes`` (a single extent longer than that is one chunk)."""
    starts = sorted({0, *(o for o in split_at if 0 < o < nbytes)})
    ends = starts[1:] + [nbytes]
    ranges: list[tuple[int, int]] = []
    for start, end in zip(starts, ends):
        if ranges and end - ranges[-1][0] <= chunk_bytes:
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((start, end - start))
    return ranges if nbytes else []


def _require_pinnable(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"PinnedRegion needs a CPU tensor, got one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("PinnedRegion needs a contiguous tensor; call .contiguous() first")


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "PinnedRegion: CUDA is not available, so there is nothing to pin memory for;"
            " keep the host store pageable on this machine"
        )


def _describe_cuda_error(code: int) -> str:
    try:
        return str(torch.cuda.CudaError(code))  # "<name> (<code>)"
    except Exception:  # the name is a nicety; the code is what matters
        return f"({code})"


class PinnedRegion:
    """Registers a contiguous CPU tensor's memory with CUDA until ``close()``.

    Holds a reference to the tensor so its memory cannot be freed while registered. Use as a
    context manager, or call ``close()``; it is idempotent.
    """

    def __init__(self, tensor: torch.Tensor, *, chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
                 split_at: list[int] | None = None) -> None:
        self._registered_ptrs: list[int] = []
        self._closed = False
        _require_pinnable(tensor)
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        _require_cuda()
        self._tensor = tensor
        self.nbytes = tensor.nbytes
        base_ptr = tensor.data_ptr()
        if split_at is None:
            ranges = chunk_ranges(self.nbytes, chunk_bytes, base_address=base_ptr, page_bytes=mmap.PAGESIZE)
        else:
            ranges = grouped_ranges(self.nbytes, split_at, chunk_bytes)
            unaligned = [o for o, _ in ranges[1:] if (base_ptr + o) % mmap.PAGESIZE]
            if unaligned:
                raise ValueError(f"PinnedRegion: split_at offsets {unaligned[:3]} are not page-aligned "
                                 f"({mmap.PAGESIZE} bytes); align the extents or let the region choose")
        self.ranges = tuple(ranges)
        self._register_all(base_ptr)

    def _register_all(self, base_ptr: int) -> None:
        cudart = torch.cuda.cudart()
        for offset, length_bytes in self.ranges:
            ptr = base_ptr + offset
            code = int(cudart.cudaHostRegister(ptr, length_bytes, _CUDA_HOST_REGISTER_DEFAULT))
            if code != _CUDA_SUCCESS:
                self._unregister_all(raise_errors=False)
                raise RuntimeError(
                    f"cudaHostRegister of {length_bytes} bytes at offset {offset} of a"
                    f" {self.nbytes}-byte tensor failed with CUDA error"
                    f" {_describe_cuda_error(code)}"
                )
            self._registered_ptrs.append(ptr)

    def _unregister_all(self, *, raise_errors: bool) -> None:
        ptrs, self._registered_ptrs = self._registered_ptrs, []
        if not ptrs:
            return
        cudart = torch.cuda.cudart()
        failures = []
        for ptr in reversed(ptrs):
            code = int(cudart.cudaHostUnregister(ptr))
            if code != _CUDA_SUCCESS:
                failures.append(f"{hex(ptr)}: CUDA error {_describe_cuda_error(code)}")
        if failures and raise_errors:
            raise RuntimeError("cudaHostUnregister failed for " + "; ".join(failures))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unregister every chunk. Safe to call more than once."""
        self._closed = True
        self._unregister_all(raise_errors=True)

    def __enter__(self) -> PinnedRegion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A registration outliving its memory would make a later allocation at the same
        # address fail to register, so a forgotten close() is cleaned up best effort.
        try:
            self._unregister_all(raise_errors=False)
        except Exception:
            pass
