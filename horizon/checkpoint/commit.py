"""The directory protocol: in-flight directory, durable commit by rename, retention, leftovers.

Why a rename: a checkpoint is visible only as ``step-<N>``, and that name appears in one atomic
``rename`` of a directory whose every file, the manifest included, was already fsynced, followed by
an fsync of the root. A crash before the rename leaves an ``.inflight.*`` directory the loader
ignores and the next start deletes; a crash after it leaves a complete checkpoint. Retention
runs only after a durable commit, never touches the newest, and deletes by renaming into
``.trash/`` first, so a crash mid-delete never leaves a half-deleted ``step-<N>``; the shard files
of what it deletes go to the recycling pool (``recycle.py``) when one is given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

from horizon.checkpoint.disk import Disk
from horizon.checkpoint.manifest import MANIFEST
from horizon.checkpoint.recycle import FilePool

__all__ = ["step_dir_name", "new_inflight_dir", "write_manifest", "publish", "committed_steps", "retain",
           "clean_leftovers", "quarantine", "abandon"]

log = logging.getLogger("horizon.checkpoint")
_STEP_RE = re.compile(r"^step-(\d{9,})$")
TRASH = ".trash"
INFLIGHT_PREFIX = ".inflight."


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"  # zero-padded: names sort in step order


def new_inflight_dir(root: str, step: int, disk: Disk) -> str:
    path = os.path.join(root, f"{INFLIGHT_PREFIX}{step_dir_name(step)}.{uuid.uuid4().hex[:12]}")
    disk.mkdir(path)
    return path


def write_manifest(inflight: str, manifest: dict, disk: Disk) -> None:
    """Write ``manifest.json`` into the in-flight directory and fsync it (any time before ``publish``)."""
    fd = disk.open_new(os.path.join(inflight, MANIFEST))
    try:
        disk.write(fd, memoryview(json.dumps(manifest, indent=1).encode()), 0)
        disk.fsync(fd)
    finally:
        os.close(fd)
    disk.at("manifest_written")


def publish(inflight: str, root: str, step: int, disk: Disk) -> str:
    """Once every file in ``inflight`` (the manifest included) is fsynced: make its entries durable, rename
    it into place and fsync the root; the committed path."""
    disk.fsync_dir(inflight)
    final = os.path.join(root, step_dir_name(step))
    disk.at("before_rename")
    disk.rename_new(inflight, final)
    disk.at("after_rename")
    disk.fsync_dir(root)
    disk.at("committed")
    return final


def committed_steps(root: str) -> list[int]:
    """Steps of the committed checkpoint directories under ``root``, oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_RE.match, names) if m)


def _to_trash(root: str, name: str, disk: Disk) -> str:
    trash = os.path.join(root, TRASH)
    if not os.path.isdir(trash):
        disk.mkdir(trash)
    target = os.path.join(trash, f"{name}.{uuid.uuid4().hex[:8]}")
    disk.rename(os.path.join(root, name), target)
    return target


def retain(root: str, *, keep_last: int, keep_every: int | None, disk: Disk, pool: FilePool | None = None) -> list[int]:
    """Delete the committed checkpoints the policy does not keep; the steps deleted.

    Keeps the newest ``keep_last`` and every step that is a multiple of ``keep_every``; the shard files
    of a deleted one go to ``pool``, if given. A failed delete is logged and left for the next time: it
    never fails the checkpoint that triggered it.
    """
    steps = committed_steps(root)
    keep = set(steps[-keep_last:]) | {s for s in steps if keep_every and s % keep_every == 0}
    deleted = []
    for step in steps[:-1]:  # never the newest
        if step in keep:
            continue
        try:
            trashed = _to_trash(root, step_dir_name(step), disk)
            disk.fsync_dir(root)
            if pool is not None:
                _recycle(pool, trashed)
            disk.remove_tree(trashed)
            deleted.append(step)
        except OSError as e:
            log.warning("retention could not delete step %d: %s (will retry at the next commit)", step, e)
    return deleted


def _recycle(pool: FilePool, trashed: str) -> None:
    try:
        pool.retire(trashed)
    except OSError as e:  # the files are deleted with the rest instead
        log.warning("could not move the files of %s into the recycling pool: %s", trashed, e)


def clean_leftovers(root: str, disk: Disk) -> list[str]:
    """Delete what dead runs left (in-flight directories, trash); the names removed. Single writer per root."""
    removed = []
    for name in os.listdir(root):
        if name.startswith(INFLIGHT_PREFIX) or name == TRASH:
            disk.remove_tree(os.path.join(root, name))
            removed.append(name)
    return removed


def quarantine(root: str, step: int, reason: str) -> str:
    """Rename a checkpoint that failed validation out of the loader's way; the new name."""
    name = f"{step_dir_name(step)}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.rename(os.path.join(root, step_dir_name(step)), os.path.join(root, name))
    log.error("checkpoint step %d failed validation and was moved to %s: %s", step, name, reason)
    return name


def abandon(inflight: str, disk: Disk) -> None:
    """Delete an in-flight directory after a failed write (best effort; leftovers are cleaned at start)."""
    disk.remove_tree(inflight)
