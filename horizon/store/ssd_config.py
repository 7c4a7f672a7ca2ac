"""``SSDConfig``: which units keep their optimizer state (fp32 master, Adam m and v), and optionally their
compute copy and gradient, on an SSD."""

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
    weights: bool = False
    """Also keep the compute copy of these units on SSD, streamed in ahead of the engine through
    ``weight_buffers`` aligned buffers, and their gradients in a ring of a few buffers (spilled to SSD
    when clipping needs them all): host RAM then holds a window of units, not the model. A unit whose
    parameters another unit shares (a tied embedding) keeps its compute copy in RAM."""
    weight_buffers: int = 3
    """With ``weights``: compute copies held in RAM at once, the engine's read-ahead window (>= 2)."""

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
        if not isinstance(self.weights, bool):
            raise ValueError(f"SSDConfig.weights must be True or False, got {self.weights!r}")
        if isinstance(self.weight_buffers, bool) or not isinstance(self.weight_buffers, int) or self.weight_buffers < 2:
            raise ValueError(f"SSDConfig.weight_buffers must be an int >= 2 (read the next unit while one is "
                             f"copied), got {self.weight_buffers!r}")
        if self.io_backend not in _IO_BACKENDS:
            raise ValueError(f"SSDConfig.io_backend must be one of {_IO_BACKENDS}, got {self.io_backend!r}")
