"""When the device is the CPU, freed activations stay mapped for the next step.

Why: on a CPU device a step's activations come from glibc's malloc, which hands freed memory back
to the kernel: chunks above its mmap threshold are unmapped when freed, and the top of the heap is
trimmed once more than the trim threshold is free. The next step allocates the same bytes again and
the kernel zero-fills them page by page. A step of the planner bench with every block KEEP (dim 256,
12 blocks, 1024 tokens, 286 MB of kept activations) took 37-50 thousand minor page faults, against
1 for all-RECOMPUTE, and took 0.605 s against 0.541 s without them (docs/planner.md). A GPU's
caching allocator reuses its blocks; this gives the CPU device the same: allocations up to glibc's
largest mmap threshold (32 MiB on 64-bit) come from the heap, and the heap is never trimmed, so
the process keeps its peak heap, which every step needs again. Chunks above 32 MiB are still mapped
per allocation.

It sets process-wide allocator parameters (``mallopt``), once, and only under glibc; elsewhere it
does nothing.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["keep_freed_memory_mapped", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
"""glibc's largest accepted mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)."""
TRIM_THRESHOLD_BYTES = 2**31 - 1
"""The largest value mallopt takes (an int): the heap is not trimmed."""


@functools.cache
def keep_freed_memory_mapped() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); False where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has (no ldconfig subprocess)
    except OSError:
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
