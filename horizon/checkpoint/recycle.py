"""The shard files of a retired checkpoint, overwritten by the next checkpoint instead of deleted.

Why: a new file's blocks must be allocated as its O_DIRECT writes land (ext4 and XFS allocate
unwritten extents and convert them when each write completes, a journal update per extent), and
deleting a retired checkpoint frees the same number of blocks again. Writing over blocks a file
already owns skips both. On this project's dev VM (ext4 on a virtual disk) six shards of 116 MB in
all, written by 4 threads and fsynced, took 90 and 96 ms into new files and 61-70 ms over recycled
ones (medians of 7, alternated; fio writing 2 GiB: 1.35-1.84 GB/s into a new file, 1.69-2.08 GB/s
over an existing one). Databases recycle their logs for the same reason (RocksDB's
``recycle_log_file_num``).

How: retention moves the shard files of the checkpoint it retires into ``root/.recycle/`` (named by
their size), after emptying whatever the pool still held, so the pool never holds more than one
checkpoint's files: the disk's peak (the kept checkpoints plus one being written) is unchanged; at
rest it holds one checkpoint more. A writer takes a file with a rename into its in-flight directory
(atomic: two ranks can never take the same file) and overwrites it; ``start_shard`` cuts it to size.
Every rename is made durable before the next one builds on it (a rename needs both of its
directories fsynced): retention fsyncs the retired directory and the pool after filling it, and
the writer fsyncs the pool before its checkpoint commits. The pool is garbage the loader
never reads; deleting it while no run writes checkpoints is safe.
"""

from __future__ import annotations

import os
import uuid

from horizon.checkpoint.disk import Disk

__all__ = ["POOL", "FilePool"]

POOL = ".recycle"


class FilePool:
    """The pool of one checkpoint root."""

    def __init__(self, root: str, disk: Disk) -> None:
        self.path, self.disk = os.path.join(root, POOL), disk

    def retire(self, directory: str) -> int:
        """Move the shard files of ``directory`` (a retired checkpoint, already out of the loader's way)
        into the pool, after deleting what the pool held; the number of files moved."""
        if os.path.isdir(self.path):
            self.disk.remove_tree(self.path)
        self.disk.mkdir(self.path)
        moved = 0
        for name in sorted(os.listdir(directory)):
            src = os.path.join(directory, name)
            if name.endswith(".safetensors") and os.path.isfile(src):
                size = os.path.getsize(src)
                self.disk.rename(src, os.path.join(self.path, f"{size:015d}.{uuid.uuid4().hex[:12]}"))
                moved += 1
        if moved:  # durable before any take: a later rename of a file builds on this one
            self.disk.fsync_dir(directory)
            self.disk.fsync_dir(self.path)
        return moved

    def take(self, path: str, nbytes: int) -> tuple[int, int] | None:
        """Rename a pooled file to ``path`` and open it for direct writes: (fd, its size before), or None
        when the pool has none. Prefers the smallest file of at least ``nbytes``, else the largest."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return None
        sized = sorted((int(name.split(".")[0]), name) for name in names if name.split(".")[0].isdigit())
        fits = [entry for entry in sized if entry[0] >= nbytes]
        short = [entry for entry in sized if entry[0] < nbytes]
        for size, name in fits + short[::-1]:
            try:
                self.disk.rename(os.path.join(self.path, name), path)
            except FileNotFoundError:  # another rank took it first
                continue
            return self.disk.open_existing(path, direct=True), size
        return None

    def sync(self) -> None:
        """Make the renames out of the pool durable (before the checkpoint that took its files commits)."""
        self.disk.fsync_dir(self.path)
