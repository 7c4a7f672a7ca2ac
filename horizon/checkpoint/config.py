"""What a user sets about checkpoints: one keyword-only frozen dataclass, checked when built."""

from __future__ import annotations

import dataclasses
import math
import os

__all__ = ["CheckpointConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str | os.PathLike
    """Root directory: committed checkpoints appear in it as ``step-<N>`` (created if missing)."""
    every_steps: int | None = None
    """Take a checkpoint after every this many optimizer updates; None = only ``trainer.save()`` and close."""
    keep_last: int = 2
    """Committed checkpoints kept (newest first); at least 2, so a checkpoint that rots on disk has a fallback."""
    keep_every: int | None = None
    """Also keep, forever, every checkpoint whose step is a multiple of this (milestones); None = none."""
    staging_bytes: int | None = None
    """Host bytes for the staging ring the snapshot is copied into; None = room for every unit (a full
    shadow copy: the least blocking). Smaller budgets block when the disk falls behind."""
    on_busy: str = "wait"
    """A checkpoint due while the previous one is still being written: "wait" for it, or "skip" this one."""
    timeout_s: float = 1800.0
    """Abort a checkpoint that is not durable this many seconds after it was requested."""
    allow_fresh_start: bool = False
    """With resume=True: start from scratch when checkpoints exist but none validates (else refuse)."""
    final_save: bool = True
    """Take a last, synchronous checkpoint at ``trainer.close()`` when the newest one is older."""
    recycle_files: bool = True
    """Overwrite the shard files of the checkpoint retention retires instead of deleting them and writing
    new ones (faster on ext4 and XFS; the disk holds one more checkpoint between checkpoints, not at its
    peak). False deletes them (docs/checkpoint.md)."""

    def __post_init__(self) -> None:
        if not isinstance(self.dir, (str, os.PathLike)) or not str(self.dir):
            raise ValueError(f"CheckpointConfig.dir must be a directory path, got {self.dir!r}")
        if self.every_steps is not None and not _positive_int(self.every_steps):
            raise ValueError(f"CheckpointConfig.every_steps must be an int >= 1 or None, got {self.every_steps!r}")
        if not _positive_int(self.keep_last) or self.keep_last < 2:
            raise ValueError(f"CheckpointConfig.keep_last must be an int >= 2, got {self.keep_last!r}: with one, "
                             "a checkpoint damaged on disk leaves nothing to resume from")
        if self.keep_every is not None and not _positive_int(self.keep_every):
            raise ValueError(f"CheckpointConfig.keep_every must be an int >= 1 or None, got {self.keep_every!r}")
        if self.staging_bytes is not None and not _positive_int(self.staging_bytes):
            raise ValueError(f"CheckpointConfig.staging_bytes must be a positive int (bytes) or None, "
                             f"got {self.staging_bytes!r}")
        if not isinstance(self.recycle_files, bool):
            raise ValueError(f"CheckpointConfig.recycle_files must be True or False, got {self.recycle_files!r}")
        if self.on_busy not in ("wait", "skip"):
            raise ValueError(f"CheckpointConfig.on_busy must be 'wait' or 'skip', got {self.on_busy!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"CheckpointConfig.timeout_s must be a positive number of seconds, got {self.timeout_s!r}")


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1
