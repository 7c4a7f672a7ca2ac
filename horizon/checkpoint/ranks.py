"""The ranks of a sharded run writing one checkpoint together.

Why: with ``DistributedConfig(shard_optimizer_state=True)`` no rank holds the whole optimizer
state, so every rank writes the shards it holds into one shared in-flight directory, and only
rank 0 may commit it, and only if every rank's files are durable. After writing (or failing),
every rank's writer thread takes part in one exchange: each hands in its files and tensor
records, or its error; if any rank failed, all of them abort that checkpoint (rank 0 deletes the
directory). Otherwise rank 0 writes the manifest over everyone's records and commits, then tells
the others the outcome, so ``save(wait=True)`` answers the same on every rank.

The collectives run on their own gloo group, used by the writer threads only (gloo needs the same
collectives in the same order on every rank, per group). A rank that dies or hangs makes the
others' exchange fail within the group's timeout: that checkpoint fails, training goes on until
its own collectives notice.
"""

from __future__ import annotations

import os
import uuid

import torch.distributed as dist

from horizon.checkpoint.commit import INFLIGHT_PREFIX
from horizon.checkpoint.disk import Disk

__all__ = ["RankGroup", "sharded_file_name"]


class RankGroup:
    def __init__(self, *, rank: int, world_size: int, group: dist.ProcessGroup) -> None:
        """Collective (every rank constructs it, before any checkpoint): agrees on the run's token."""
        self.rank, self.world_size, self.group = rank, world_size, group
        token = [uuid.uuid4().hex[:12]]
        dist.broadcast_object_list(token, src=0, group=group)
        self.token = token[0]
        """Names this run's in-flight directories, the same on every rank."""
        self._taken = 0

    def inflight_dir(self, root: str, disk: Disk) -> str:
        """The shared in-flight directory of the next checkpoint (created by whichever rank comes first)."""
        self._taken += 1
        path = os.path.join(root, f"{INFLIGHT_PREFIX}{self.token}-{self._taken:06d}")
        try:
            disk.mkdir(path)
        except FileExistsError:  # another rank made it first
            pass
        return path

    def agree(self, written: dict | None, error: str | None) -> tuple[list[dict], str | None]:
        """Every rank's ``written`` (files and tensor records), or the first error of any rank."""
        outcomes: list = [None] * self.world_size
        dist.all_gather_object(outcomes, {"written": written, "error": error}, group=self.group)
        errors = [f"rank {r}: {o['error']}" for r, o in enumerate(outcomes) if o["error"] is not None]
        return [o["written"] for o in outcomes], "; ".join(errors) if errors else None

    def announce(self, path: str | None, error: str | None) -> tuple[str | None, str | None]:
        """Rank 0's commit outcome (committed path, or error), on every rank."""
        outcome = [(path, error)]
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        return outcome[0]


def sharded_file_name(index: int, num_units: int, rank: int, world_size: int) -> str:
    return f"shard-{index:05d}-of-{num_units:05d}-rank-{rank:05d}-of-{world_size:05d}.safetensors"

