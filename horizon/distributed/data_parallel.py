"""Data parallelism over the host store: every rank holds the whole store, gradients are summed.

Why this shape: each rank runs the engine on its own micro-batch exactly as a single process
would, except that the loss is divided by the *global* count of labels that are not ignored
(all-reduced before the step), so the sum over ranks of the per-rank gradients is the gradient of
one process on the concatenated batch. That sum is an all-reduce of each unit's flat gradient in
the host store, run on the optimizer thread as soon as the unit's gradient lands and before its
norm or update, so it overlaps the backward of the units below. Every rank then holds the same
gradient, takes the same global norm, makes the same clip and skip decisions and applies the same
AdamW update: the replicas never drift apart. Bytes moved per step: see docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from horizon.distributed.world import World
from horizon.store.host_store import HostStore

__all__ = ["DataParallel", "PeerFailure"]


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, or stopped answering for longer than the timeout."""


class DataParallel:
    """The collectives of one data-parallel trainer, with the payload bytes each kind moved."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.bytes_reduced = 0
        """Gradient bytes this rank handed to all-reduce (its payload; the wire carries 2(W-1)/W of it)."""
        self.bytes_broadcast = 0
        """Master bytes broadcast from rank 0 when the trainer started."""

    def _run(self, what: str, collective: Callable[[], object]) -> None:
        try:
            collective()
        except (RuntimeError, dist.DistBackendError) as e:
            w = self.world
            raise PeerFailure(
                f"rank {w.rank} of {w.world_size}: the {what} collective failed ({type(e).__name__}: {e}). "
                f"Another rank died or did not answer within DistributedConfig.timeout_s={w.timeout_s:g} s; read "
                "the other ranks' logs, and raise timeout_s if a rank is only slow (a long CPU optimizer phase)"
            ) from e

    def broadcast_store(self, store: HostStore) -> None:
        """Give every rank rank 0's initial weights (the compute copies follow from the masters)."""
        for unit in store.units:
            self._run("initial weight broadcast", lambda: dist.broadcast(unit.master, src=0, group=self.world.scalars))
            unit.refresh_compute()
            self.bytes_broadcast += unit.master.numel() * unit.master.element_size()

    def global_count(self, count: int) -> int:
        """The sum over ranks of ``count`` (the labels each rank's micro-batch lets count)."""
        total = torch.tensor([count], dtype=torch.int64)
        self._run("label count all-reduce", lambda: dist.all_reduce(total, group=self.world.scalars))
        return int(total)

    def global_sum(self, value: float) -> float:
        """The sum over ranks of ``value`` in float64 (the loss sums, for the reported loss)."""
        total = torch.tensor([value], dtype=torch.float64)
        self._run("loss all-reduce", lambda: dist.all_reduce(total, group=self.world.scalars))
        return float(total)

    def sum_gradient(self, flat: torch.Tensor) -> None:
        """Replace ``flat`` (a unit's host gradient) by its sum over ranks; on the optimizer thread.

        A gradient kept in a 16-bit compute dtype is summed in fp32 and rounded once at the end."""
        work = flat if flat.dtype == torch.float32 else flat.float()
        self._run("gradient all-reduce", lambda: dist.all_reduce(work, group=self.world.grads))
        if work is not flat:
            flat.copy_(work)
        self.bytes_reduced += work.numel() * work.element_size()
