"""The few file-system calls a checkpoint makes, behind one seam tests can replace.

Why a seam: the commit protocol is only as good as its behaviour when the disk fails, the
process dies, or the power goes between two calls. ``Disk`` does the real I/O; a test subclass
raises ``OSError(ENOSPC)`` from ``write``, sleeps in it (a slow disk), kills the process at a named
protocol point (``at``), or records every call that changes the disk to replay the states a power
cut could leave (``tests/crash/test_power_loss.py``), without the writer knowing. So every
mkdir, create, write, truncate, fsync, rename and delete a checkpoint makes goes through here.

Why O_DIRECT: shards are written once and read only at resume, so the page cache is a detour
that costs a memcpy per byte and a long ``fsync`` at the end (buffered write + fsync reached
0.3 of the disk's limit here). Shards are opened with ``O_DIRECT`` where the file system allows
it and written by ``write``, positioned writes of page-aligned buffers, from several threads at
once (the queue depth the device needs). ``write`` is the one function the bytes go through, so
a native engine (io_uring) can replace it later.
"""

from __future__ import annotations

import errno
import os
import shutil

__all__ = ["Disk", "PROTOCOL_POINTS"]

PROTOCOL_POINTS = ("shard_written", "shard_synced", "manifest_written", "before_rename", "after_rename",
                   "committed")
"""The moments of the commit protocol ``Disk.at`` is told about, in the order they happen."""


class Disk:
    """Real I/O: positioned (direct) writes, fsync, directory fsync, rename that refuses to replace."""

    def open_new(self, path: str, *, direct: bool = False) -> int:
        """A new file for writing; fails if it exists (a checkpoint never reuses a name).

        ``direct`` asks for O_DIRECT (bypass the page cache); a file system that refuses it gets an
        ordinary file, and the same aligned writes work on both."""
        return _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct=direct)

    def open_existing(self, path: str, *, direct: bool = False) -> int:
        """An existing file for writing over its blocks (a recycled shard file): not truncated, not
        extended; ``direct`` as in ``open_new``."""
        return _open(path, os.O_WRONLY, direct=direct)

    def write(self, fd: int, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at byte ``offset`` of ``fd`` (thread-safe: positioned, no shared file offset).

        On an O_DIRECT file, ``data``'s address, length and ``offset`` must be multiples of the page size."""
        while len(data):
            written = os.pwritev(fd, [data], offset)
            data, offset = data[written:], offset + written

    def truncate(self, fd: int, nbytes: int) -> None:
        """Cut the file to ``nbytes`` (after a last write padded to a whole page)."""
        os.ftruncate(fd, nbytes)

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

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rename(self, src: str, dst: str) -> None:
        """Rename (retention's move into ``.trash``, a shard file into or out of the recycling pool)."""
        os.rename(src, dst)

    def remove_tree(self, path: str) -> None:
        """Delete a directory and everything in it, best effort (what is left is cleaned at the next start)."""
        shutil.rmtree(path, ignore_errors=True)

    def rename_new(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``, refusing to replace an existing ``dst`` (single writer per root)."""
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst} already exists; a checkpoint directory is never replaced")
        os.rename(src, dst)

    def at(self, point: str) -> None:
        """Called at each of ``PROTOCOL_POINTS``; the real disk does nothing."""


def _open(path: str, flags: int, *, direct: bool) -> int:
    """``os.open`` with O_DIRECT added where asked for and the file system accepts it."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644)
