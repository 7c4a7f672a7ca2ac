"""The few file-system calls a checkpoint makes, behind one seam tests can replace.

Why a seam: the commit protocol is only as good as its behaviour when the disk fails or the
process dies between two calls. ``Disk`` does the real I/O; a test subclass raises
``OSError(ENOSPC)`` from ``write``, sleeps in it (a slow disk), or kills the process at a named
protocol point (``at``), without the writer knowing.
"""

from __future__ import annotations

import os

__all__ = ["Disk", "PROTOCOL_POINTS"]

PROTOCOL_POINTS = ("shard_written", "shard_synced", "manifest_written", "before_rename", "after_rename",
                   "committed")
"""The moments of the commit protocol ``Disk.at`` is told about, in the order they happen."""


class Disk:
    """Real I/O: unbuffered writes, fsync, directory fsync, rename that refuses to replace."""

    def open_new(self, path: str) -> int:
        """A new file for writing; fails if it exists (a checkpoint never reuses a name)."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, fd: int, data: memoryview) -> None:
        while len(data):
            written = os.write(fd, data)
            data = data[written:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # written once, read at resume: do not keep it in the page cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (new files, renames) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename_new(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``, refusing to replace an existing ``dst`` (single writer per root)."""
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst} already exists; a checkpoint directory is never replaced")
        os.rename(src, dst)

    def at(self, point: str) -> None:
        """Called at each of ``PROTOCOL_POINTS``; the real disk does nothing."""
