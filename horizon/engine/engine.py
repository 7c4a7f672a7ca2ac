"""The streaming engine: one forward sweep and one backward sweep over the chain of units.

Why by hand: the device never holds the model, so autograd never sees more than one unit. The
forward sweep runs each unit without autograd (or, for KEEP blocks, with a graph whose weights
are slot references); the loss head runs forward and backward in chunks; the backward sweep
walks the units in reverse, recomputing from the saved input (RECOMPUTE) or replaying the kept
graph (KEEP), and ``torch.autograd.grad`` yields the gradient of the unit input and parameters.
A block with a ``RowSplit`` (MEMO-style) divides the batch by rows: the first rows run under a
KEEP graph, the next under a SWAP graph, the rest keep only their input and are recomputed, and
backward joins the parts (input gradients by rows, parameter gradients summed): the gradient of
the whole batch, with another summation order. Rows, not token chunks, because attention mixes
a row's tokens.
The copies (weights in, restores in, gradients out) are ``traffic.py``'s; this module computes,
and issues a block's offloads as its forward runs.

The order of units in one step is ``embedding, block 0 … block N-1, head, block N-1 … block 0,
embedding``; ``SlotPool.uses`` (``assign_slots``) maps it onto the slots once per step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import nn

from horizon.engine.activations import HostActivations, KeptGraph
from horizon.engine.cpu_heap import keep_freed_memory_mapped
from horizon.engine.ledger import DeviceLedger
from horizon.engine.loss import head_forward_backward
from horizon.engine.plan import Plan
from horizon.engine.slots import SlotPool
from horizon.engine.swap import SwappedGraph
from horizon.engine.sharded import Collectives, ShardedIO
from horizon.engine.sweep import Sweep, nbytes_of
from horizon.engine.traffic import Traffic
from horizon.engine.transfer import Transfer
from horizon.models.units import UnitKind, UnitSpec
from horizon.store.grad_ring import GradRing
from horizon.store.host_store import HostStore
from horizon.store.weight_stream import WeightStream

__all__ = ["Engine"]

def _is_stochastic(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


class Engine:
    """Executes a ``Plan`` for a chain of units whose state lives in a ``HostStore``."""

    def __init__(self, specs: list[UnitSpec], store: HostStore, *, plan: Plan, device: torch.device,
                 transfer: Transfer, weights: WeightStream | None = None, grads: GradRing | None = None,
                 collectives: Collectives | None = None) -> None:
        self.specs, self.store, self.plan = specs, store, plan
        if device.type == "cpu":
            keep_freed_memory_mapped()  # a KEEP step's activations are not faulted in again every step
        self.device, self.transfer = device, transfer
        plan.check_names([s.name for s in specs if s.kind is UnitKind.BLOCK])
        self.pool = SlotPool([s.module for s in specs], [unit.layout for unit in store.units], num_slots=plan.num_slots,
                             device=device, dtype=store.compute_dtype,
                             world_size=store.world_size if collectives else 1,
                             resident=plan.resident_units([s.name for s in specs]))
        self.sharded = None if collectives is None else ShardedIO(store, self.pool, collectives=collectives,
                                                                  transfer=transfer, device=device)
        """A sharded store's (ZeRO-3) loads that all-gather and gradients that reduce-scatter; None otherwise."""
        self.ledger = DeviceLedger()
        for slot, buffer in enumerate(self.pool.slots):
            self.ledger.hold(("slot", slot), nbytes_of(buffer))
        splits = [plan.split(s.name) if s.kind is UnitKind.BLOCK else None for s in specs]
        # Blocks with rows to recompute: their inputs get host buffers.
        self._recompute_blocks = [u for u, split in enumerate(splits)
                                  if split is not None and split.recompute > 0 and not split.input_on_device]
        self._device_inputs = {u for u, split in enumerate(splits) if split is not None and split.input_on_device}
        """Blocks whose recomputed rows keep their input on the device (no host copy, no restore)."""
        self._stochastic = [_is_stochastic(s.module) for s in specs]
        self.host_activations = HostActivations(pin=store.pinned)
        self.traffic = Traffic(store, self.pool, transfer=transfer, ledger=self.ledger,
                               host_activations=self.host_activations, device=device, sharded=self.sharded,
                               weights=weights, grads=grads)
        """Every copy of a step across the link: weights and restores in, gradients out. ``weights`` and
        ``grads``: for ``store.streamed`` units (SSDConfig(weights=True)), where their compute copies are read
        from and where their gradients land, instead of the store's buffers."""
        self.vocab_size = specs[-1].module.head.out_features

    # -- the step ---------------------------------------------------------------------------

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_divisor: int, *,
                         load_after: Callable[[int], Future | None] = lambda unit: None,
                         grads_sent: Callable[[int, Callable[[], None]], None] = lambda unit, landed: None,
                         grad_norm: bool = False, extras: dict[str, torch.Tensor] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward and backward of ``sum of token losses / loss_divisor``; gradients are in the
        store's GRAD buffers when it returns.

        ``load_after(unit)``: a future the next copy of ``unit``'s weights must wait for (its
        pending update), or None. ``grads_sent(unit, landed)`` is called as soon as the copy of
        ``unit``'s complete gradient to the store is issued; ``landed()`` blocks until it is there
        (on any thread: the optimizer's worker waits on it, not this one). Returns the sum of
        token losses and, with ``grad_norm``, the global 2-norm of the gradient taken on the device as each unit's gradient is final, the
        way ``clip_grad_norm_`` takes it (0-d fp32 tensors on the device). ``extras`` (device
        tensors, e.g. attention_mask and position_ids) go to every embedding and block call.
        """
        num_units = len(self.specs)
        rows = {u: self.plan.rows(s.name, input_ids.shape[0])  # a ValueError before anything runs
                for u, s in enumerate(self.specs) if s.kind is UnitKind.BLOCK}
        order = list(range(num_units)) + list(range(num_units - 2, -1, -1))
        sweep = Sweep(input_ids=input_ids, labels=labels, loss_divisor=loss_divisor, order=order,
                       uses=self.pool.uses(order), next_restore=num_units,
                       load_after=load_after, grads_sent=grads_sent, extras=extras or {}, rows=rows)
        if grad_norm:
            sweep.norm_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        try:
            self.traffic.start(sweep)
            self._sweep(sweep)
        except BaseException:
            self.pool.mark_stale()  # a resident unit's load may not have happened
            self.traffic.abandon(sweep)
            raise
        self.traffic.drain(sweep)
        assert sweep.loss_sum is not None
        norm = sweep.norm_sq.sqrt() if grad_norm else None
        return sweep.loss_sum, norm

    def _sweep(self, sweep: Sweep) -> None:
        """Every unit forward, then backward, each after the loads it needs; copies issued ahead."""
        order, num_units = sweep.order, len(self.specs)
        depth = self.pool.num_slots - 1
        for position in range(min(depth, len(order))):
            self.traffic.issue_weights(sweep, position)
        for position, unit in enumerate(order):
            if position + depth < len(order):
                self.traffic.issue_weights(sweep, position + depth)
            self.traffic.issue_restores(sweep, position, until=position + depth)
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

    # -- forward ----------------------------------------------------------------------------

    def _forward_unit(self, sweep: Sweep, unit: int, slot: int) -> None:
        spec, template = self.specs[unit], self.pool.template(slot, unit)
        if spec.kind is UnitKind.EMBEDDING:
            self._save_rng(sweep, unit)
            with torch.no_grad():
                self._set_hidden(sweep, self._call(sweep, unit, template, sweep.input_ids))
            return
        if spec.kind is UnitKind.HEAD:
            self._loss_head(sweep, unit, slot)
        else:
            self._forward_block(sweep, unit, slot)
        # The previous block's offload drains during this unit (two rotating buffers, as MEMO).
        for earlier in [u for u in sweep.offloads if u < unit]:
            self.traffic.wait_offload(sweep, earlier)

    def _set_hidden(self, sweep: Sweep, hidden: torch.Tensor | None) -> None:
        if sweep.hidden is not None:
            self.ledger.release(("hidden", id(sweep.hidden)))
        sweep.hidden = hidden
        if hidden is not None:
            self.ledger.hold(("hidden", id(hidden)), nbytes_of(hidden))

    def _forward_block(self, sweep: Sweep, unit: int, slot: int) -> None:
        """Rows [0, k) under a KEEP graph, [k, k + s) under a SWAP graph, the rest recomputed (their input to
        the host, or held on the device for ``RowSplit(input_on_device=True)``)."""
        x, (k, s) = sweep.hidden, sweep.rows[unit]
        rows, template = x.shape[0], self.pool.template(slot, unit)
        handles, moved, outputs, held = [], 0, [], 0
        if k + s < rows and unit in self._device_inputs:  # the recomputed rows' input waits here
            sweep.restored[unit] = self._part(x, k + s, rows)
            held += nbytes_of(sweep.restored[unit])
        elif k + s < rows:  # the input of the recomputed rows leaves for the host while the unit computes
            if sweep.checkpoints is None:
                buffers = self.host_activations.buffers(len(self._recompute_blocks), tuple(x.shape), x.dtype)
                sweep.checkpoints = dict(zip(self._recompute_blocks, buffers))
            host = sweep.checkpoints[unit] = sweep.checkpoints[unit][:rows - k - s]
            handles.append(self.transfer.d2h([host], [x[k + s:] if k + s else x]))
            moved += nbytes_of(host)
        if k:
            kept = sweep.kept[unit] = KeptGraph(self.pool.slots[slot])
            call = lambda h: self._call(sweep, unit, template, h, rows=slice(0, k))  # noqa: E731
            outputs.append(kept.forward(call, self._part(x, 0, k), self.pool.params(slot, unit)))
            held += kept.saved_bytes
        if k or unit in self._device_inputs:
            self.ledger.hold(("kept", unit), held)
        if s:
            graph = sweep.swapped[unit] = SwappedGraph(self.pool.slots[slot])
            call = lambda h: self._call(sweep, unit, template, h, rows=slice(k, k + s))  # noqa: E731
            outputs.append(graph.forward(call, self._part(x, k, k + s), self.pool.params(slot, unit)))
            handles.append(graph.offload(self.transfer, self.host_activations.swap_buffer(unit, graph.nbytes)))
            moved += graph.nbytes
        if k + s < rows:
            self._save_rng(sweep, unit)
            with torch.no_grad():
                outputs.append(self._call(sweep, unit, template, x[k + s:] if k + s else x, rows=slice(k + s, rows)))
        # The offloaded tensors outlive their role until their copies are done (the handles hold them).
        if handles:
            self.ledger.hold(("offloading", unit), moved)
            sweep.offloads[unit] = handles
        self._set_hidden(sweep, outputs[0] if len(outputs) == 1 else torch.cat(outputs))

    @staticmethod
    def _part(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of ``x``; a part of the batch is copied out, so a graph holds its rows, not the batch."""
        return x if (start, end) == (0, x.shape[0]) else x[start:end].clone()

    def _loss_head(self, sweep: Sweep, unit: int, slot: int) -> None:
        template = self.pool.template(slot, unit)
        loss_sum, grad_hidden, grads = head_forward_backward(
            lambda x: self.specs[unit].call(template, x), self.pool.params(slot, unit), sweep.hidden,
            sweep.labels, loss_divisor=sweep.loss_divisor, chunk_tokens=self.plan.loss_chunk(self.vocab_size))
        sweep.loss_sum = loss_sum
        self._set_hidden(sweep, grad_hidden)  # from here on, "hidden" is the gradient flowing back
        self.traffic.land_grads(sweep, unit, grads)

    # -- backward ---------------------------------------------------------------------------

    def _backward_unit(self, sweep: Sweep, unit: int, slot: int) -> None:
        spec, template = self.specs[unit], self.pool.template(slot, unit)
        grad_y = sweep.hidden
        if spec.kind is UnitKind.EMBEDDING:
            params = self.pool.params(slot, unit)
            with self._replayed_rng(sweep, unit), torch.enable_grad():
                y = self._call(sweep, unit, template, sweep.input_ids)
                grads = torch.autograd.grad(y, params, grad_y)
            self._set_hidden(sweep, None)
            self.traffic.land_grads(sweep, unit, list(grads))
            return
        (k, s), rows = sweep.rows[unit], grad_y.shape[0]
        rows_of = lambda start, end: grad_y if (start, end) == (0, rows) else grad_y[start:end]  # noqa: E731
        parts = []
        if k:
            parts.append(sweep.kept.pop(unit).backward(rows_of(0, k), self.pool.slots[slot]))
        if s:
            parts.append(sweep.swapped.pop(unit).backward(rows_of(k, k + s), self.pool.slots[slot]))
        if k + s < rows:
            parts.append(self._recompute_backward(sweep, unit, slot, rows_of(k + s, rows), slice(k + s, rows)))
        if k or unit in self._device_inputs:
            self.ledger.release(("kept", unit))
        if s or (k + s < rows and unit not in self._device_inputs):
            self.ledger.release(("input", unit))
        grads = parts[0] if len(parts) == 1 else [torch.cat([p[0] for p in parts])] + \
            [functools.reduce(torch.add, g) for g in zip(*(p[1:] for p in parts))]
        self._set_hidden(sweep, grads[0])
        self.traffic.land_grads(sweep, unit, list(grads[1:]))

    def _recompute_backward(self, sweep: Sweep, unit: int, slot: int, grad_y: torch.Tensor, rows: slice):
        x = sweep.restored.pop(unit).requires_grad_()
        params = self.pool.params(slot, unit)
        with self._replayed_rng(sweep, unit), torch.enable_grad():
            y = self._call(sweep, unit, self.pool.template(slot, unit), x, rows=rows)
            return torch.autograd.grad(y, [x, *params], grad_y)

    def _call(self, sweep: Sweep, unit: int, module: nn.Module, x: torch.Tensor,
              rows: slice | None = None) -> torch.Tensor:
        """A unit's call; embeddings and blocks also get the batch's extras (the head never needs them),
        sliced to ``rows`` of the batch when a block runs on a part of it."""
        spec = self.specs[unit]
        if sweep.extras and spec.kind is not UnitKind.HEAD:
            extras = sweep.extras if rows is None else {k: v[rows] for k, v in sweep.extras.items()}
            return spec.call(module, x, **extras)
        return spec.call(module, x)

    # -- randomness for recomputed dropout -----------------------------------------------------

    def _save_rng(self, sweep: Sweep, unit: int) -> None:
        """Before a stochastic unit's forward: the RNG state its recompute will replay."""
        if self._stochastic[unit]:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            sweep.rng[unit] = (torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def _replayed_rng(self, sweep: Sweep, unit: int):
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
