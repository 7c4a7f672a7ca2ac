"""Peak anonymous RSS of this process, sampled on a thread (for the host-memory tests' child processes).

Why not the kernel's VmHWM: it counts file-backed pages too, which the kernel may evict and fault back in
under the full suite's page-cache pressure (docs/estimate.md), and VmHWM less the file pages mapped at the
end is not the anonymous peak either (the file pages present at the peak are not known afterwards).
Why sampling is enough: a page counts once it is touched, and touching memory runs at a few GB/s, so
between two samples 0.5 ms apart the anonymous RSS moves by a few MB, far below the tests' margins.
"""

from __future__ import annotations

import os
import sys
import threading

PERIOD_S = 0.0005


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class AnonPeak:
    """``with AnonPeak() as p: ...``; then ``p.peak`` is the highest anonymous RSS seen inside."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self._stop.wait(PERIOD_S)

    def __enter__(self) -> "AnonPeak":
        self._switch_s = sys.getswitchinterval()
        sys.setswitchinterval(PERIOD_S)  # the sampler gets the GIL within a period of asking for it
        self.peak = rss_anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch_s)
        self.peak = max(self.peak, rss_anon_bytes())


MMAP_THRESHOLD_BYTES = 128 << 10
"""glibc's initial mmap threshold, made fixed in the measuring children. By default glibc raises it, up
to 32 MiB, whenever an mmapped chunk is freed, and then serves chunks below it from the heap, which it
keeps. In one checkout 4 of 10 runs of the host-memory child ended with a 304 MiB heap instead of
151 MiB (+104 MiB growth, 1.13x the footprint; fixed threshold: 990 MiB in every run). That retention
is the C library's policy, at most a few times 32 MiB whatever the model's size (10% of this small
one), not memory Horizon holds; a user who wants it gone sets the same variable (docs/estimate.md)."""


def child_env() -> dict[str, str]:
    """A clean environment for a measuring child, with this folder importable and glibc's mmap
    threshold fixed (``MMAP_THRESHOLD_BYTES``)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    return env
