"""``SSDConfig``: which units keep their optimizer state (fp32 master, Adam m and v) on an SSD."""

from __future__ import annotations

import dataclasses
import os

__all__ = ["SSDConfig"]

_IO_BACKENDS = ("auto", "io_uring", "threads", "python")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSDConfig:
    dir: str | os.PathLike
    """An existing directory on the SSD; the state file is created there and removed at close."""
    units: str | tuple[int, ...] = "all"
    """"all", "auto" (as few units as TrainConfig.host_memory_budget_bytes allows, largest first), or
    unit indices (0 = the embedding, the last = the head)."""
    io_buffers: int = 2
    """Units' state held in host RAM at once by the I/O pool: 2 double-buffers (read the next unit
    while this one updates); more lets writes drain longer before a buffer is reused."""
    io_backend: str = "auto"
    """horizon.io.DirectIO backend: "auto", "io_uring", "threads" (native) or "python"."""

    def __post_init__(self) -> None:
        if not isinstance(self.dir, (str, os.PathLike)) or not os.fspath(self.dir):
            raise ValueError(f"SSDConfig.dir must be a directory path, got {self.dir!r}")
        if not os.path.isdir(self.dir):
            raise ValueError(f"SSDConfig.dir={os.fspath(self.dir)!r} is not an existing directory; create it first")
        if isinstance(self.units, list):
            object.__setattr__(self, "units", tuple(self.units))
        if isinstance(self.units, str):
            if self.units not in ("all", "auto"):
                raise ValueError(f"SSDConfig.units must be 'all', 'auto' or a list of unit indices, got {self.units!r}")
        elif not isinstance(self.units, tuple) or not self.units \
                or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in self.units):
            raise ValueError(f"SSDConfig.units must be 'all', 'auto' or a non-empty list of unit indices >= 0, "
                             f"got {self.units!r}")
        if isinstance(self.io_buffers, bool) or not isinstance(self.io_buffers, int) or self.io_buffers < 2:
            raise ValueError(f"SSDConfig.io_buffers must be an int >= 2 (double buffering), got {self.io_buffers!r}")
        if self.io_backend not in _IO_BACKENDS:
            raise ValueError(f"SSDConfig.io_backend must be one of {_IO_BACKENDS}, got {self.io_backend!r}")
