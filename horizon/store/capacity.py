"""What this machine can give the host store, checked before anything is allocated.

Horizon keeps every parameter and all optimizer state in host RAM, so the host store is
the single largest allocation of a run. If it does not fit, the kernel (or the container's
cgroup OOM killer) ends the process minutes into loading with no useful message, or the
machine swaps itself to a standstill. This module measures the real ceiling up front: the
RAM the OS reports as available, narrowed by the cgroup memory limit a container runs under,
and the page-lock (memlock) limit that bounds how much of the store can be pinned for fast
DMA. Running out of RAM is a hard error with exact numbers; running out of lockable memory
only costs speed, so it is a loud warning and a fallback to pageable memory.
"""

from __future__ import annotations

import logging
import os
import resource
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "HostCapacity",
    "HostMemoryError",
    "check_host_budget",
    "format_bytes",
    "probe_host_capacity",
]

_LOG = logging.getLogger(__name__)

_KIB_BYTES = 2**10
_MIB_BYTES = 2**20
_GIB_BYTES = 2**30

# cgroup v1 reports "no limit" as a huge page-rounded number (0x7FFFFFFFFFFFF000); anything at or
# above 1 EiB is treated the same way, since no machine has that much RAM.
_UNLIMITED_THRESHOLD_BYTES = 2**60


def format_bytes(n: int) -> str:
    """Human-readable size in binary units: "1.50 GiB", "512.0 MiB", "3.0 KiB", "12 B".

    Sizes never go above GiB so that numbers in one message compare at a glance.
    """
    magnitude = abs(n)
    if magnitude >= _GIB_BYTES:
        return f"{n / _GIB_BYTES:.2f} GiB"
    if magnitude >= _MIB_BYTES:
        return f"{n / _MIB_BYTES:.1f} MiB"
    if magnitude >= _KIB_BYTES:
        return f"{n / _KIB_BYTES:.1f} KiB"
    return f"{n} B"


def _describe_bytes(n: int) -> str:
    """Readable and exact: "1.50 GiB (1610612736 bytes)"."""
    return f"{format_bytes(n)} ({n} bytes)"


@dataclass(frozen=True, kw_only=True)
class HostCapacity:
    """A snapshot of the host memory this process may use, taken before allocating.

    ``cgroup_usage_bytes`` is the cgroup's working set: its charged memory minus the inactive
    page cache, which the kernel reclaims before it OOM-kills (the same measure the kubelet
    and ``docker stats`` use). ``can_lock_unlimited`` is True when running as root: root
    holds CAP_IPC_LOCK in practice, so RLIMIT_MEMLOCK does not bound it. A non-root process
    granted CAP_IPC_LOCK alone is not detected and is judged by its memlock limit.
    """

    available_bytes: int
    cgroup_limit_bytes: int | None
    cgroup_usage_bytes: int | None
    memlock_limit_bytes: int | None
    can_lock_unlimited: bool

    @property
    def allocatable_bytes(self) -> int:
        """The most the host store may take: available RAM, capped by cgroup headroom."""
        if self.cgroup_limit_bytes is None:
            return self.available_bytes
        cgroup_headroom_bytes = max(0, self.cgroup_limit_bytes - (self.cgroup_usage_bytes or 0))
        return min(self.available_bytes, cgroup_headroom_bytes)


class HostMemoryError(ValueError):
    """The host store would not fit in the memory this machine can give."""


def _read_cgroup_value(path: Path) -> int | None:
    """An integer cgroup file, or None when absent, unreadable, "max" or absurdly large."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED_THRESHOLD_BYTES else value


def _read_stat_field(path: Path, field: str) -> int:
    """One counter from a cgroup memory.stat file; 0 when the file or field is missing."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == field and parts[1].isdigit():
            return int(parts[1])
    return 0


def _working_set_bytes(usage_path: Path, stat_path: Path, inactive_field: str) -> int | None:
    usage_bytes = _read_cgroup_value(usage_path)
    if usage_bytes is None:
        return None
    return max(0, usage_bytes - _read_stat_field(stat_path, inactive_field))


def _probe_cgroup(cgroup_root: Path) -> tuple[int | None, int | None]:
    """(limit, working set) from cgroup v2 when its memory.max exists, else from cgroup v1."""
    if (cgroup_root / "memory.max").exists():
        limit_bytes = _read_cgroup_value(cgroup_root / "memory.max")
        usage_bytes = _working_set_bytes(
            cgroup_root / "memory.current", cgroup_root / "memory.stat", "inactive_file"
        )
        return limit_bytes, usage_bytes
    v1_root = cgroup_root / "memory"
    limit_bytes = _read_cgroup_value(v1_root / "memory.limit_in_bytes")
    usage_bytes = _working_set_bytes(
        v1_root / "memory.usage_in_bytes", v1_root / "memory.stat", "total_inactive_file"
    )
    return limit_bytes, usage_bytes


def _probe_memlock_limit_bytes() -> int | None:
    soft_limit_bytes, _hard_limit_bytes = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft_limit_bytes == resource.RLIM_INFINITY:
        return None
    return soft_limit_bytes


def probe_host_capacity(*, cgroup_root: str = "/sys/fs/cgroup") -> HostCapacity:
    """Measure what this machine can give right now. Reads only; allocates nothing."""
    cgroup_limit_bytes, cgroup_usage_bytes = _probe_cgroup(Path(cgroup_root))
    return HostCapacity(
        available_bytes=int(psutil.virtual_memory().available),
        cgroup_limit_bytes=cgroup_limit_bytes,
        cgroup_usage_bytes=cgroup_usage_bytes,
        memlock_limit_bytes=_probe_memlock_limit_bytes(),
        can_lock_unlimited=os.geteuid() == 0,
    )


def _describe_capacity(capacity: HostCapacity) -> str:
    parts = [f"available RAM {_describe_bytes(capacity.available_bytes)}"]
    if capacity.cgroup_limit_bytes is None:
        parts.append("no cgroup limit")
    else:
        usage_bytes = capacity.cgroup_usage_bytes or 0
        parts.append(
            f"cgroup limit {_describe_bytes(capacity.cgroup_limit_bytes)}"
            f" with {_describe_bytes(usage_bytes)} in use"
        )
    return ", ".join(parts)


def _shortfall_message(*, required_bytes: int, capacity: HostCapacity, what: str) -> str:
    allocatable_bytes = capacity.allocatable_bytes
    return (
        f"horizon: the host store for {what} needs {_describe_bytes(required_bytes)}"
        f" but this machine can give {_describe_bytes(allocatable_bytes)}"
        f" ({_describe_capacity(capacity)}):"
        f" {_describe_bytes(required_bytes - allocatable_bytes)} short."
        " Use a smaller model, raise the container's memory limit,"
        " or free memory held by other processes."
    )


def _can_pin(*, pinned_bytes: int, capacity: HostCapacity) -> bool:
    if pinned_bytes == 0 or capacity.can_lock_unlimited:
        return True
    return capacity.memlock_limit_bytes is None or pinned_bytes <= capacity.memlock_limit_bytes


def _pinning_warning(*, pinned_bytes: int, capacity: HostCapacity, what: str) -> str:
    limit_bytes = capacity.memlock_limit_bytes or 0
    return (
        f"horizon: pinning {_describe_bytes(pinned_bytes)} of the host store for {what}"
        f" exceeds the memlock limit of {_describe_bytes(limit_bytes)}:"
        f" {_describe_bytes(pinned_bytes - limit_bytes)} short."
        " Falling back to pageable host memory; host-to-GPU copies will be slower."
        " Fix: run `ulimit -l unlimited` before starting (or set memlock in"
        " /etc/security/limits.conf / `docker run --ulimit memlock=-1`),"
        " or run with CAP_IPC_LOCK."
    )


def check_host_budget(
    *, required_bytes: int, pinned_bytes: int, capacity: HostCapacity, what: str
) -> bool:
    """Fail fast if the host store cannot fit; report whether pinning is possible.

    Raises HostMemoryError when ``required_bytes`` exceeds ``capacity.allocatable_bytes``.
    Returns True when ``pinned_bytes`` may be page-locked. When it may not, warns with a
    ResourceWarning (and logs, since Python ignores ResourceWarning by default) and returns
    False: the caller should fall back to pageable memory. RLIMIT_MEMLOCK is the
    conservative bound: the kernel enforces it for mlock and RDMA registration, while whether
    the NVIDIA driver enforces it for cudaHostRegister depends on the driver.
    """
    if required_bytes < 0 or pinned_bytes < 0:
        raise ValueError(
            f"required_bytes and pinned_bytes must be >= 0, got {required_bytes} and {pinned_bytes}"
        )
    if required_bytes > capacity.allocatable_bytes:
        raise HostMemoryError(
            _shortfall_message(required_bytes=required_bytes, capacity=capacity, what=what)
        )
    if _can_pin(pinned_bytes=pinned_bytes, capacity=capacity):
        return True
    message = _pinning_warning(pinned_bytes=pinned_bytes, capacity=capacity, what=what)
    warnings.warn(message, ResourceWarning, stacklevel=2)
    _LOG.warning(message)
    return False
