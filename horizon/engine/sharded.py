"""The engine's side of a sharded store (ZeRO-3): loads that all-gather, gradients that reduce-scatter.

Why its own module: with ``DistributedConfig(shard_optimizer_state=True)`` no host holds a whole
unit, so a load cannot be one copy and a gradient cannot go back whole. A load copies this rank's
compute shard into its part of the slot and all-gathers the slot on the device; a unit's gradient
is flattened into one padded fp32 device buffer, reduce-scattered over the ranks, and only this
rank's shard of the sum goes to the host. The ordering and lifetimes are the transfer's
(``Transfer.h2d_gather``, ``Transfer.d2h_reduce``), like those of every other copy.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import torch

from horizon.engine.slots import SlotPool
from horizon.engine.transfer import Gather, Handle, Transfer

__all__ = ["Collectives", "ShardedIO"]


class Collectives(Protocol):
    """A sharded run's device collectives (horizon.distributed.ShardedDataParallel)."""

    def gather_into(self, out: torch.Tensor, piece: torch.Tensor) -> None: ...

    def reduce_scatter_into(self, out: torch.Tensor, whole: torch.Tensor) -> None: ...


class ShardedIO:
    """Loads and gradient reductions of one engine over a ``ShardedHostStore``."""

    def __init__(self, store, pool: SlotPool, *, collectives: Collectives, transfer: Transfer,
                 device: torch.device) -> None:
        self.store, self.pool, self.collectives = store, pool, collectives
        self.transfer, self.device = transfer, device

    def _gather_of(self, out: torch.Tensor, unit: int) -> Gather:
        buffers = self.store.units[unit]
        return Gather(out=out[:buffers.shard_numel * self.store.world_size], piece=buffers.compute,
                      rank=self.store.rank, gather=self.collectives.gather_into)

    def load(self, unit: int, slot: int, after: list[Future]) -> Handle:
        """This rank's compute shard into its part of ``slot``, then an all-gather of the slot; a borrowed
        (tied) parameter is sliced out of its owner's weights, gathered into a scratch device buffer.
        ``after``: the pending updates of the unit and of the owners of what it borrows."""
        flat = self.pool.slots[slot]
        gathers, copies = [self._gather_of(flat, unit)], []
        for b in self.store.units[unit].layout.borrowed:
            owner = self.store.units[b.owner]
            scratch = torch.empty(owner.shard_numel * self.store.world_size, dtype=flat.dtype, device=self.device)
            gathers.append(self._gather_of(scratch, b.owner))
            copies.append((flat[b.offset:b.offset + b.owner_slot.numel],
                           scratch[b.owner_slot.offset:b.owner_slot.offset + b.owner_slot.numel]))
        return self.transfer.h2d_gather(gathers, copies, after)

    def reduce(self, unit: int, own: list[torch.Tensor]) -> tuple[Handle, int]:
        """The unit's gradient, flat and padded in fp32, summed over ranks by a reduce-scatter on the
        device; only this rank's shard goes to the host (on the CPU the shard is the host's own).
        Returns the handle and the device bytes it holds until waited for."""
        buffers = self.store.units[unit]
        whole = torch.empty(buffers.shard_numel * self.store.world_size, dtype=torch.float32, device=self.device)
        for p, g in zip(buffers.layout.own, own, strict=True):
            whole[p.offset:p.offset + p.numel].copy_(g.reshape(-1))
        whole[buffers.layout.numel:].zero_()
        on_host = self.device.type == "cpu"
        shard = buffers.grad if on_host else torch.empty(buffers.shard_numel, dtype=torch.float32, device=self.device)
        held = whole.numel() * whole.element_size() + (0 if on_host else shard.numel() * shard.element_size())
        return self.transfer.d2h_reduce(buffers.grad, whole, shard, self.collectives.reduce_scatter_into), held
