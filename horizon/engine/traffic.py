"""The engine's traffic: every copy across the link in one step, and the device bytes it holds.

Why apart from the compute: a step's copies follow their own schedule, set by the slots and the
plan, not by what a unit computes. Weights for position j + (slots - 1) are issued while position j
computes (``issue_weights``); the saved inputs and swapped activations of a block come back as far
ahead (``issue_restores``), once its offload has left; a unit's parameter gradients leave for the
host store as soon as its backward is done, at most ``GRADS_IN_FLIGHT`` units at a time
(``land_grads``). Each copy's device buffer is held in the engine's ledger from issue to release.
With a sharded store (ZeRO-3, ``ShardedIO``) a load all-gathers the slot and a gradient is
reduce-scattered first; streamed units (SSD weights) read from and land in their rings.
"""

from __future__ import annotations

import torch

from horizon.engine.activations import HostActivations
from horizon.engine.ledger import DeviceLedger
from horizon.engine.sharded import ShardedIO
from horizon.engine.slots import SlotPool
from horizon.engine.sweep import Sweep, nbytes_of
from horizon.engine.transfer import DONE, Handle, Transfer
from horizon.store.grad_ring import GradRing
from horizon.store.host_store import HostStore
from horizon.store.weight_stream import WeightStream

__all__ = ["Traffic", "GRADS_IN_FLIGHT"]

GRADS_IN_FLIGHT = 2
"""Units whose gradients may be on their way to the host at once (the newest included)."""


class Traffic:
    def __init__(self, store: HostStore, pool: SlotPool, *, transfer: Transfer, ledger: DeviceLedger,
                 host_activations: HostActivations, device: torch.device, sharded: ShardedIO | None,
                 weights: WeightStream | None, grads: GradRing | None) -> None:
        self.store, self.pool, self.transfer, self.ledger = store, pool, transfer, ledger
        self.host_activations, self.device, self.sharded = host_activations, device, sharded
        self.weights, self.grads = weights, grads
        self.layouts = [unit.layout for unit in store.units]

    def start(self, sweep: Sweep) -> None:
        """Before a step's first copy: streamed units' weights start coming from the SSD, in step order."""
        if self.weights is not None:
            self.weights.start([(p, u) for p, (u, use) in enumerate(zip(sweep.order, sweep.uses))
                                if use.load and u in self.store.streamed], sweep.load_after)

    def issue_weights(self, sweep: Sweep, position: int) -> None:
        unit, use = sweep.order[position], sweep.uses[position]
        handle = self._load_weights(sweep, unit, use.slot, position) if use.load else DONE
        sweep.ready.setdefault(position, []).append(handle)

    def issue_restores(self, sweep: Sweep, position: int, *, until: int) -> None:
        """Bring back the saved inputs of RECOMPUTE blocks for backward positions up to ``until``.

        A restore is issued only once the block's forward has run (its offload exists) and waits
        for that offload to finish: both touch the same host buffer, on different copy streams.
        """
        while sweep.next_restore <= min(until, len(sweep.order) - 1):
            unit = sweep.order[sweep.next_restore]
            if unit >= position:  # the block's forward (at position == unit) has not run yet
                return
            if unit in sweep.offloads:
                self.wait_offload(sweep, unit)
            handles, nbytes = [], 0
            if unit in sweep.swapped:
                graph = sweep.swapped[unit]
                nbytes += graph.nbytes
                handles.append(graph.restore(self.transfer, self.host_activations.swap_buffer(unit, graph.nbytes)))
            if sweep.checkpoints is not None and unit in sweep.checkpoints:
                host = sweep.checkpoints.pop(unit)
                device_input = torch.empty(host.shape, dtype=host.dtype, device=self.device)
                nbytes += nbytes_of(device_input)
                sweep.restored[unit] = device_input
                handles.append(self.transfer.h2d([device_input], [host]))
            if handles:
                self.ledger.hold(("input", unit), nbytes)
                sweep.ready.setdefault(sweep.next_restore, []).extend(handles)
            sweep.next_restore += 1

    def _load_weights(self, sweep: Sweep, unit: int, slot: int, position: int) -> Handle:
        layout, buffers = self.layouts[unit], self.store.units[unit]
        if self.sharded is not None:
            owners = [unit] + [b.owner for b in layout.borrowed]
            return self.sharded.load(unit, slot, [f for f in map(sweep.load_after, owners) if f is not None])
        flat = self.pool.slots[slot]
        streamed = unit in self.store.streamed
        src, read = self.weights.take(position) if streamed else (buffers.compute, None)
        dsts, srcs, owners = [flat[:layout.numel]], [src], [] if streamed else [unit]
        for b in layout.borrowed:
            owner = self.store.units[b.owner].compute
            dsts.append(flat[b.offset:b.offset + b.owner_slot.numel])
            srcs.append(owner[b.owner_slot.offset:b.owner_slot.offset + b.owner_slot.numel])
            owners.append(b.owner)
        after = [f for f in map(sweep.load_after, owners) if f is not None] + ([read] if streamed else [])
        handle = self.transfer.h2d(dsts, srcs, after)
        if streamed:
            self.weights.copying(position, handle, src)
        return handle

    def wait_offload(self, sweep: Sweep, unit: int) -> None:
        for handle in sweep.offloads.pop(unit):
            handle.wait_host()
        self.ledger.release(("offloading", unit))

    def land_grads(self, sweep: Sweep, unit: int, grads: list[torch.Tensor]) -> None:
        """Route a unit's parameter gradients: own ones to its host GRAD buffer, borrowed ones to their owner."""
        layout = self.layouts[unit]
        own = grads[:len(layout.own)]
        for b, g in zip(layout.borrowed, grads[len(layout.own):]):
            index = next(i for i, p in enumerate(self.layouts[b.owner].own) if p.offset == b.owner_slot.offset)
            sweep.pending.setdefault(b.owner, []).append((index, g))
            self.ledger.hold(("pending", b.owner, index), nbytes_of(g))
        for index, g in sweep.pending.pop(unit, []):
            own[index] = own[index] + g
            self.ledger.release(("pending", unit, index))
        if sweep.norm_sq is not None:  # one accumulator: device memory does not grow with depth
            sweep.norm_sq += torch.stack(torch._foreach_norm(own, 2.0, dtype=torch.float32)).square().sum()
        while len(sweep.grads) >= GRADS_IN_FLIGHT:
            self._wait_grad(sweep)
        if self.sharded is not None:
            handle, held_bytes = self.sharded.reduce(unit, own)
            sweep.grads.append((unit, handle))
            self.ledger.hold(("grad", unit), held_bytes)
            sweep.grads_sent(unit, handle.host_waiter())
            return
        buffers = self.store.units[unit]
        flat = self.grads.take(unit) if unit in self.store.streamed else buffers.grad
        dsts = list(buffers.views(flat).values())
        handle = self.transfer.d2h(dsts, own)
        sweep.grads.append((unit, handle))
        self.ledger.hold(("grad", unit), sum(nbytes_of(g) for g in own))
        if unit not in self.store.streamed:  # a streamed unit's ring buffer is handed on once it landed
            sweep.grads_sent(unit, handle.host_waiter())

    def _wait_grad(self, sweep: Sweep) -> None:
        unit, handle = sweep.grads.popleft()
        handle.wait_host()
        self.ledger.release(("grad", unit))
        if unit in self.store.streamed:
            sweep.grads_sent(unit, lambda: None)

    def abandon(self, sweep: Sweep) -> None:
        """After a step that failed midway: wait for the copies still in flight (their buffers must
        outlive them), let go of the graphs no backward will consume and of every ledger entry but
        the slots, so the engine can run the next step."""
        in_flight = [h for handles in (*sweep.ready.values(), *sweep.offloads.values()) for h in handles]
        for handle in in_flight + [h for _, h in sweep.grads]:
            handle.wait_host()
        sweep.ready.clear()
        sweep.offloads.clear()
        sweep.grads.clear()
        sweep.discard_graphs()
        self.ledger.release_all_but(lambda key: key[0] == "slot")

    def drain(self, sweep: Sweep) -> None:
        while sweep.grads:
            self._wait_grad(sweep)
        for unit in list(sweep.offloads):
            self.wait_offload(sweep, unit)
        assert not (sweep.pending or sweep.kept or sweep.swapped or sweep.restored), "every unit's backward ran"
