"""The streaming engine: one forward sweep and one backward sweep over the chain of units.

Why by hand: the device never holds the model, so autograd never sees more than one unit. The
forward sweep runs each unit without autograd (or, for KEEP blocks, with a graph whose weights
are slot references); the loss head runs forward and backward in chunks; the backward sweep
walks the units in reverse, recomputing from the saved input (RECOMPUTE) or replaying the kept
graph (KEEP), and ``torch.autograd.grad`` yields the gradient of the unit input and parameters.
Weights for position j + (slots - 1) are copied while position j computes; parameter gradients
leave for the host store as soon as a unit's backward is done. With a sharded store (ZeRO-3,
``collectives``) a load copies this rank's shard and all-gathers the slot, and a unit's gradient
is reduce-scattered on the device so only this rank's shard goes back (docs/distributed.md).

The order of units in one step is ``embedding, block 0 … block N-1, head, block N-1 … block 0,
embedding``; ``assign_slots`` maps it onto the slots once per step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import nn

from horizon.engine.activations import HostActivations, KeptGraph
from horizon.engine.ledger import DeviceLedger
from horizon.engine.loss import head_forward_backward
from horizon.engine.plan import ActivationPolicy, Plan
from horizon.engine.slots import SlotPool, SlotUse, assign_slots
from horizon.engine.swap import SwappedGraph
from horizon.engine.sharded import Collectives, ShardedIO
from horizon.engine.transfer import DONE, Handle, Transfer
from horizon.models.units import UnitKind, UnitSpec
from horizon.store.host_store import HostStore

__all__ = ["Engine"]

_GRADS_IN_FLIGHT = 2
"""Units whose gradients may be on their way to the host at once (the newest included)."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_stochastic(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


@dataclasses.dataclass
class _Sweep:
    """The state of one step's sweeps."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_divisor: int
    order: list[int]
    uses: list[SlotUse]
    checkpoints: dict[int, torch.Tensor] | None = None    # host inputs of RECOMPUTE blocks, by unit
    ready: dict[int, list[Handle]] = dataclasses.field(default_factory=dict)
    restored: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # device inputs, by unit
    kept: dict[int, KeptGraph] = dataclasses.field(default_factory=dict)
    swapped: dict[int, SwappedGraph] = dataclasses.field(default_factory=dict)
    rng: dict[int, tuple] = dataclasses.field(default_factory=dict)
    pending: dict[int, list[tuple[int, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    offloads: dict[int, Handle] = dataclasses.field(default_factory=dict)   # by unit, in issue order
    next_restore: int = 0                                               # next backward position to restore
    grads: collections.deque = dataclasses.field(default_factory=collections.deque)
    hidden: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    norm_sq: torch.Tensor | None = None    # running sum of squared gradient norms (fp32, on the device)
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # attention_mask, position_ids
    load_after: Callable[[int], Future | None] = lambda unit: None
    grads_landed: Callable[[int], None] = lambda unit: None


class Engine:
    """Executes a ``Plan`` for a chain of units whose state lives in a ``HostStore``."""

    def __init__(self, specs: list[UnitSpec], store: HostStore, *, plan: Plan, device: torch.device,
                 transfer: Transfer, collectives: Collectives | None = None) -> None:
        self.specs, self.store, self.plan = specs, store, plan
        self.device, self.transfer = device, transfer
        self.layouts = [unit.layout for unit in store.units]
        plan.check_names([s.name for s in specs if s.kind is UnitKind.BLOCK])
        self.pool = SlotPool([s.module for s in specs], self.layouts, num_slots=plan.num_slots, device=device,
                             dtype=store.compute_dtype, world_size=store.world_size if collectives else 1)
        self.sharded = None if collectives is None else ShardedIO(store, self.pool, collectives=collectives,
                                                                  transfer=transfer, device=device)
        """A sharded store's (ZeRO-3) loads that all-gather and gradients that reduce-scatter; None otherwise."""
        self.ledger = DeviceLedger()
        for slot in range(self.pool.num_slots):
            self.ledger.hold(("slot", slot), self.pool.slot_bytes)
        self.policies = [plan.policy(s.name) if s.kind is UnitKind.BLOCK else None for s in specs]
        self._recompute_blocks = [u for u, p in enumerate(self.policies) if p is ActivationPolicy.RECOMPUTE]
        self._stochastic = [_is_stochastic(s.module) for s in specs]
        self.host_activations = HostActivations(pin=store.pinned)
        self.vocab_size = specs[-1].module.head.out_features

    # -- the step ---------------------------------------------------------------------------

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_divisor: int, *,
                         load_after: Callable[[int], Future | None] = lambda unit: None,
                         grads_landed: Callable[[int], None] = lambda unit: None,
                         grad_norm: bool = False, extras: dict[str, torch.Tensor] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward and backward of ``sum of token losses / loss_divisor``; gradients are in the
        store's GRAD buffers when it returns.

        ``load_after(unit)``: a future the next copy of ``unit``'s weights must wait for (its
        pending update), or None. ``grads_landed(unit)`` is called once ``unit``'s gradient is
        complete in the store. Returns the sum of token losses and, with ``grad_norm``, the
        global 2-norm of the gradient taken on the device as each unit's gradient is final, the
        way ``clip_grad_norm_`` takes it (0-d fp32 tensors on the device). ``extras`` (device
        tensors, e.g. attention_mask and position_ids) go to every embedding and block call.
        """
        num_units = len(self.specs)
        order = list(range(num_units)) + list(range(num_units - 2, -1, -1))
        sweep = _Sweep(input_ids=input_ids, labels=labels, loss_divisor=loss_divisor, order=order,
                       uses=assign_slots(order, self.pool.num_slots), next_restore=num_units,
                       load_after=load_after, grads_landed=grads_landed, extras=extras or {})
        if grad_norm:
            sweep.norm_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        depth = self.pool.num_slots - 1
        for position in range(min(depth, len(order))):
            self._issue_weights(sweep, position)
        for position, unit in enumerate(order):
            if position + depth < len(order):
                self._issue_weights(sweep, position + depth)
            self._issue_restores(sweep, position, until=position + depth)
            with torch.profiler.record_function("horizon.wait_loads"):
                for handle in sweep.ready.pop(position):
                    handle.wait_device()
            slot = sweep.uses[position].slot
            forward = position < num_units
            sweep_name = "forward" if forward else "backward"
            with torch.profiler.record_function(f"horizon.{sweep_name}.{self.specs[unit].name}"):
                if forward:
                    self._forward_unit(sweep, unit, slot)
                else:
                    self._backward_unit(sweep, unit, slot)
        self._drain(sweep)
        assert sweep.loss_sum is not None
        norm = sweep.norm_sq.sqrt() if grad_norm else None
        return sweep.loss_sum, norm

    def _issue_weights(self, sweep: _Sweep, position: int) -> None:
        unit, use = sweep.order[position], sweep.uses[position]
        handle = self._load_weights(sweep, unit, use.slot) if use.load else DONE
        sweep.ready.setdefault(position, []).append(handle)

    def _issue_restores(self, sweep: _Sweep, position: int, *, until: int) -> None:
        """Bring back the saved inputs of RECOMPUTE blocks for backward positions up to ``until``.

        A restore is issued only once the block's forward has run (its offload exists) and waits
        for that offload to finish: both touch the same host buffer, on different copy streams.
        """
        while sweep.next_restore <= min(until, len(sweep.order) - 1):
            unit = sweep.order[sweep.next_restore]
            if unit >= position:  # the block's forward (at position == unit) has not run yet
                return
            if unit in sweep.offloads:
                self._wait_offload(sweep, unit)
            if self.policies[unit] is ActivationPolicy.SWAP:
                graph = sweep.swapped[unit]
                self.ledger.hold(("input", unit), graph.nbytes)
                handle = graph.restore(self.transfer, self.host_activations.swap_buffer(unit, graph.nbytes))
                sweep.ready.setdefault(sweep.next_restore, []).append(handle)
            if self.policies[unit] is ActivationPolicy.RECOMPUTE:
                host = sweep.checkpoints[unit]
                device_input = torch.empty(host.shape, dtype=host.dtype, device=self.device)
                self.ledger.hold(("input", unit), _nbytes(device_input))
                sweep.restored[unit] = device_input
                handle = self.transfer.h2d([device_input], [host])
                sweep.ready.setdefault(sweep.next_restore, []).append(handle)
            sweep.next_restore += 1

    def _load_weights(self, sweep: _Sweep, unit: int, slot: int) -> Handle:
        layout, buffers = self.layouts[unit], self.store.units[unit]
        if self.sharded is not None:
            owners = [unit] + [b.owner for b in layout.borrowed]
            return self.sharded.load(unit, slot, [f for f in map(sweep.load_after, owners) if f is not None])
        flat = self.pool.slots[slot]
        dsts, srcs, owners = [flat[:layout.numel]], [buffers.compute], [unit]
        for b in layout.borrowed:
            owner = self.store.units[b.owner].compute
            dsts.append(flat[b.offset:b.offset + b.owner_slot.numel])
            srcs.append(owner[b.owner_slot.offset:b.owner_slot.offset + b.owner_slot.numel])
            owners.append(b.owner)
        after = [f for f in map(sweep.load_after, owners) if f is not None]
        return self.transfer.h2d(dsts, srcs, after)

    # -- forward ----------------------------------------------------------------------------

    def _forward_unit(self, sweep: _Sweep, unit: int, slot: int) -> None:
        spec, template = self.specs[unit], self.pool.template(slot, unit)
        if spec.kind is UnitKind.EMBEDDING:
            self._save_rng(sweep, unit)
            with torch.no_grad():
                self._set_hidden(sweep, self._call(sweep, unit, template, sweep.input_ids))
            return
        if spec.kind is UnitKind.HEAD:
            self._loss_head(sweep, unit, slot)
        elif self.policies[unit] is ActivationPolicy.KEEP:
            self._forward_keep(sweep, unit, slot)
        elif self.policies[unit] is ActivationPolicy.SWAP:
            self._forward_swap(sweep, unit, slot)
        else:
            self._forward_recompute(sweep, unit, slot)
        # The previous block's offload drains during this unit (two rotating buffers, as MEMO).
        for earlier in [u for u in sweep.offloads if u < unit]:
            self._wait_offload(sweep, earlier)

    def _set_hidden(self, sweep: _Sweep, hidden: torch.Tensor | None) -> None:
        if sweep.hidden is not None:
            self.ledger.release(("hidden", id(sweep.hidden)))
        sweep.hidden = hidden
        if hidden is not None:
            self.ledger.hold(("hidden", id(hidden)), _nbytes(hidden))

    def _forward_recompute(self, sweep: _Sweep, unit: int, slot: int) -> None:
        x = sweep.hidden
        if sweep.checkpoints is None:
            buffers = self.host_activations.buffers(len(self._recompute_blocks), tuple(x.shape), x.dtype)
            sweep.checkpoints = dict(zip(self._recompute_blocks, buffers))
        handle = self.transfer.d2h([sweep.checkpoints[unit]], [x])
        self._save_rng(sweep, unit)
        with torch.no_grad():
            y = self._call(sweep, unit, self.pool.template(slot, unit), x)
        # x outlives its role as the hidden state until its offload is done (its handle holds it).
        self.ledger.hold(("offloading", unit), _nbytes(x))
        self._set_hidden(sweep, y)
        sweep.offloads[unit] = handle

    def _forward_swap(self, sweep: _Sweep, unit: int, slot: int) -> None:
        graph = SwappedGraph(self.pool.slots[slot])
        y = graph.forward(lambda x: self._call(sweep, unit, self.pool.template(slot, unit), x), sweep.hidden,
                          self.pool.params(slot, unit))
        handle = graph.offload(self.transfer, self.host_activations.swap_buffer(unit, graph.nbytes))
        sweep.swapped[unit] = graph
        self.ledger.hold(("offloading", unit), graph.nbytes)
        self._set_hidden(sweep, y)
        sweep.offloads[unit] = handle

    def _wait_offload(self, sweep: _Sweep, unit: int) -> None:
        sweep.offloads.pop(unit).wait_host()
        self.ledger.release(("offloading", unit))

    def _forward_keep(self, sweep: _Sweep, unit: int, slot: int) -> None:
        kept = KeptGraph(self.pool.slots[slot])
        kept.params = self.pool.params(slot, unit)
        kept.x = sweep.hidden.detach().requires_grad_()
        with torch.enable_grad(), kept.hooks():
            kept.y = self._call(sweep, unit, self.pool.template(slot, unit), kept.x)
        sweep.kept[unit] = kept
        self.ledger.hold(("kept", unit), kept.saved_bytes)
        self._set_hidden(sweep, kept.y.detach())

    def _loss_head(self, sweep: _Sweep, unit: int, slot: int) -> None:
        template = self.pool.template(slot, unit)
        loss_sum, grad_hidden, grads = head_forward_backward(
            lambda x: self.specs[unit].call(template, x), self.pool.params(slot, unit), sweep.hidden,
            sweep.labels, loss_divisor=sweep.loss_divisor, chunk_tokens=self.plan.loss_chunk(self.vocab_size))
        sweep.loss_sum = loss_sum
        self._set_hidden(sweep, grad_hidden)  # from here on, "hidden" is the gradient flowing back
        self._land_grads(sweep, unit, grads)

    # -- backward ---------------------------------------------------------------------------

    def _backward_unit(self, sweep: _Sweep, unit: int, slot: int) -> None:
        spec, template = self.specs[unit], self.pool.template(slot, unit)
        grad_y = sweep.hidden
        if spec.kind is UnitKind.EMBEDDING:
            params = self.pool.params(slot, unit)
            with self._replayed_rng(sweep, unit), torch.enable_grad():
                y = self._call(sweep, unit, template, sweep.input_ids)
                grads = torch.autograd.grad(y, params, grad_y)
            self._set_hidden(sweep, None)
            self._land_grads(sweep, unit, list(grads))
            return
        if self.policies[unit] is ActivationPolicy.KEEP:
            grads = sweep.kept.pop(unit).backward(grad_y, self.pool.slots[slot])
            self.ledger.release(("kept", unit))
        elif self.policies[unit] is ActivationPolicy.SWAP:
            grads = sweep.swapped.pop(unit).backward(grad_y, self.pool.slots[slot])
            self.ledger.release(("input", unit))
        else:
            grads = self._recompute_backward(sweep, unit, slot, grad_y)
        self._set_hidden(sweep, grads[0])
        self._land_grads(sweep, unit, list(grads[1:]))

    def _recompute_backward(self, sweep: _Sweep, unit: int, slot: int, grad_y: torch.Tensor):
        x = sweep.restored.pop(unit).requires_grad_()
        params = self.pool.params(slot, unit)
        with self._replayed_rng(sweep, unit), torch.enable_grad():
            y = self._call(sweep, unit, self.pool.template(slot, unit), x)
            grads = torch.autograd.grad(y, [x, *params], grad_y)
        self.ledger.release(("input", unit))
        return grads

    def _call(self, sweep: _Sweep, unit: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A unit's call; embeddings and blocks also get the batch's extras (the head never needs them)."""
        spec = self.specs[unit]
        if sweep.extras and spec.kind is not UnitKind.HEAD:
            return spec.call(module, x, **sweep.extras)
        return spec.call(module, x)

    def _land_grads(self, sweep: _Sweep, unit: int, grads: list[torch.Tensor]) -> None:
        """Route a unit's parameter gradients: own ones to its host GRAD buffer, borrowed ones to their owner."""
        layout = self.layouts[unit]
        own = grads[:len(layout.own)]
        for b, g in zip(layout.borrowed, grads[len(layout.own):]):
            index = next(i for i, p in enumerate(self.layouts[b.owner].own) if p.offset == b.owner_slot.offset)
            sweep.pending.setdefault(b.owner, []).append((index, g))
            self.ledger.hold(("pending", b.owner, index), _nbytes(g))
        for index, g in sweep.pending.pop(unit, []):
            own[index] = own[index] + g
            self.ledger.release(("pending", unit, index))
        if sweep.norm_sq is not None:  # one accumulator: device memory does not grow with depth
            sweep.norm_sq += torch.stack(torch._foreach_norm(own, 2.0, dtype=torch.float32)).square().sum()
        while len(sweep.grads) >= _GRADS_IN_FLIGHT:
            self._wait_grad(sweep)
        if self.sharded is not None:
            handle, held_bytes = self.sharded.reduce(unit, own)
            sweep.grads.append((unit, handle))
            self.ledger.hold(("grad", unit), held_bytes)
            return
        dsts = list(self.store.units[unit].views(self.store.units[unit].grad).values())
        sweep.grads.append((unit, self.transfer.d2h(dsts, own)))
        self.ledger.hold(("grad", unit), sum(_nbytes(g) for g in own))

    def _wait_grad(self, sweep: _Sweep) -> None:
        unit, handle = sweep.grads.popleft()
        handle.wait_host()
        self.ledger.release(("grad", unit))
        sweep.grads_landed(unit)

    def _drain(self, sweep: _Sweep) -> None:
        while sweep.grads:
            self._wait_grad(sweep)
        for unit in list(sweep.offloads):
            self._wait_offload(sweep, unit)
        assert not (sweep.pending or sweep.kept or sweep.swapped or sweep.restored), "every unit's backward ran"

    # -- randomness for recomputed dropout -----------------------------------------------------

    def _save_rng(self, sweep: _Sweep, unit: int) -> None:
        """Before a stochastic unit's forward: the RNG state its recompute will replay."""
        if self._stochastic[unit]:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            sweep.rng[unit] = (torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def _replayed_rng(self, sweep: _Sweep, unit: int):
        """Run a recompute with the forward's RNG state, leaving the global RNG as it was."""
        if not self._stochastic[unit]:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            cpu, cuda = sweep.rng.pop(unit)
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            yield

    def set_training(self, training: bool) -> None:
        """Put every template in the user's model's mode (dropout on or off)."""
        self.pool.set_training(training)

    def close(self) -> None:
        self.host_activations.close()
