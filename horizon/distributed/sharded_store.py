"""A host store split across data-parallel ranks (ZeRO-3): each rank holds 1/W of every unit.

Why: with W ranks on a node, a replicated store holds the model W times over: 12 bytes per
parameter of fp32 master, m and v, plus the compute copy and the gradient. Here each rank keeps
only its contiguous 1/W of every unit's master, m, v, compute copy and summed gradient, padded so
every rank's piece has the same length ``shard_numel = ceil(numel / W)`` (the collectives want
equal pieces). Nothing whole ever lives in host RAM: before a unit computes, the engine copies
this rank's compute shard into its part of a device slot and all-gathers the slot on the device;
after the unit's backward it reduce-scatters the gradient on the device and brings back only this
rank's shard of the sum (horizon.engine.engine, docs/distributed.md). The model's own parameters
become meta tensors: the weights are the shards, gathered only on request (``Trainer.state_dict``).

One store per node, never W copies of the model: ``adopt`` fills each rank's master shard
without any rank holding the model twice. From Hugging Face safetensors every rank reads only
the slices of its shard (``HFWeights.read_flat``); otherwise rank 0 alone initialises (or takes
the user's CPU weights), unit by unit, and scatters each rank its piece. The other ranks may
build the model on the meta device: their parameters are never read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from horizon.store.capacity import check_host_budget, probe_host_capacity
from horizon.store.host_store import HostStore, UnitBuffers, _aligned, _Carver, _replace_parameters
from horizon.store.layout import UnitLayout

__all__ = ["ShardedHostStore", "ShardedUnitBuffers", "sharded_bytes_by_role", "shard_numel"]

_FP32 = 4


def shard_numel(numel: int, world_size: int) -> int:
    return -(-numel // world_size)


@dataclasses.dataclass(kw_only=True)
class ShardedUnitBuffers(UnitBuffers):
    """Every buffer holds elements [shard_start, shard_start + shard_numel) of the unit (zero past its
    end): ``master``, ``exp_avg``, ``exp_avg_sq``, ``compute`` (aliases ``master`` in fp32), ``grad``
    (this rank's shard of the gradient summed over ranks, fp32) and ``grad_accum``."""

    shard_start: int
    shard_numel: int
    params: list[nn.Parameter] = dataclasses.field(default_factory=list)
    """The model's own parameters of this unit in layout order (meta tensors once adopted)."""

    @property
    def valid_numel(self) -> int:
        """Elements of this rank's shard that belong to the unit (the rest is padding)."""
        return max(0, min(self.shard_numel, self.layout.numel - self.shard_start))


def sharded_bytes_by_role(layouts: list[UnitLayout], world_size: int, *, compute_dtype: torch.dtype = torch.float32,
                          accumulate: bool = False) -> dict[str, int]:
    """Exact bytes one rank allocates per role, page alignment included: every role is a shard."""
    def shards(itemsize: int) -> int:
        return sum(_aligned(shard_numel(l.numel, world_size) * itemsize) for l in layouts)

    fp32 = shards(_FP32)
    return {"master": fp32, "exp_avg": fp32, "exp_avg_sq": fp32, "grad": fp32,
            "compute": 0 if compute_dtype == torch.float32 else shards(compute_dtype.itemsize),
            "grad_accum": fp32 if accumulate else 0}


class ShardedHostStore(HostStore):
    """This rank's part of the host store of a ``world_size``-rank data-parallel run.

    ``scatter(unit, source)`` hands each rank its piece of rank 0's padded fp32 ``source`` (None on
    the other ranks)."""

    def __init__(self, layouts: list[UnitLayout], *, rank: int, world_size: int, compute_dtype: torch.dtype,
                 pin: bool, accumulate: bool,
                 scatter: Callable[[ShardedUnitBuffers, torch.Tensor | None], None]) -> None:
        by_role = sharded_bytes_by_role(layouts, world_size, compute_dtype=compute_dtype, accumulate=accumulate)
        pcie_bytes = by_role["compute"] + by_role["grad"]
        cpu_bytes = sum(by_role.values()) - pcie_bytes
        can_pin = check_host_budget(required_bytes=pcie_bytes + cpu_bytes, pinned_bytes=pcie_bytes if pin else 0,
                                    capacity=probe_host_capacity(), what=f"{len(layouts)} units (rank {rank})")
        self.compute_dtype, self.accumulate, self.bytes_by_role = compute_dtype, accumulate, by_role
        self.rank, self.world_size, self._scatter = rank, world_size, scatter
        self.ssd_units = self.streamed = frozenset()  # the SSD tier is not combined with sharding
        self._pcie, self._cpu = _Carver(pcie_bytes), _Carver(cpu_bytes)
        self.units = [self._carve_shard(layout) for layout in layouts]
        self.pinned = pin and can_pin
        self._pinned_region = self._pin(self._pcie.raw, self._unit_starts()) if self.pinned else None

    def _carve_shard(self, layout: UnitLayout) -> ShardedUnitBuffers:
        c = shard_numel(layout.numel, self.world_size)
        own_copy = self.compute_dtype != torch.float32
        compute = self._pcie.take(c, self.compute_dtype).zero_() if own_copy else None
        grad = self._pcie.take(c, torch.float32).zero_()
        master, exp_avg, exp_avg_sq = (self._cpu.take(c, torch.float32).zero_() for _ in range(3))
        accum = self._cpu.take(c, torch.float32).zero_() if self.accumulate else None
        return ShardedUnitBuffers(
            layout=layout, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, grad=grad,
            compute=master if compute is None else compute, grad_accum=accum, shard_start=self.rank * c,
            shard_numel=c)

    def _unit_starts(self) -> list[int]:
        base = self._pcie.raw.data_ptr()
        own_copy = self.compute_dtype != torch.float32
        return [(u.compute if own_copy else u.grad).data_ptr() - base for u in self.units]

    def adopt(self, modules: list[nn.Module], *, init_fn=None, weights=None) -> None:
        """Fill the master shards and make every parameter of ``modules`` a meta tensor.

        ``weights`` (a horizon.models.hf_weights.HFWeights): every rank reads its slices. Otherwise
        rank 0's parameters are the values (its meta ones initialised by ``init_fn`` first), held
        in fp32 one model's worth at most, and scattered unit by unit; the others' are not read."""
        originals = [dict(module.named_parameters(remove_duplicate=True)) for module in modules]
        sources = self._rank0_sources(modules, originals, init_fn) if weights is None else None
        replacement: dict[int, nn.Parameter] = {}
        for index, (unit, module) in enumerate(zip(self.units, modules)):
            if weights is not None:
                self._read_shard(unit, originals[index], weights)
            else:
                self._scatter(unit, sources[index] if sources is not None else None)
                if sources is not None:
                    sources[index] = None  # rank 0's fp32 copy of this unit is no longer needed
            for slot in unit.layout.own:
                old = originals[index][slot.local_name]
                replacement[id(old)] = nn.Parameter(torch.empty(old.shape, dtype=torch.float32, device="meta"),
                                                    requires_grad=old.requires_grad)
                unit.params.append(replacement[id(old)])
            _replace_parameters(module, replacement)
            unit.refresh_compute()
        self.zero_optimizer_state()

    def _rank0_sources(self, modules, originals, init_fn) -> list[torch.Tensor] | None:
        """On rank 0, per unit, a padded fp32 buffer of the unit's values (None elsewhere). Meta
        parameters are made views of them and ``init_fn`` fills them."""
        if self.rank != 0:
            return None
        sources, temporary, any_meta = [], {}, False
        for unit, module, params in zip(self.units, modules, originals):
            flat = torch.zeros(unit.shard_numel * self.world_size, dtype=torch.float32)
            for local_name, view in unit.views(flat).items():
                old = params[local_name]
                if old.is_meta:
                    any_meta = True
                    temporary[id(old)] = nn.Parameter(view, requires_grad=old.requires_grad)
                else:
                    with torch.no_grad():
                        view.copy_(old.detach())
            _replace_parameters(module, temporary)
            sources.append(flat)
        if any_meta and init_fn is not None:
            with torch.no_grad():
                init_fn()
        for params in originals:  # the replacements made above stand in for the meta originals
            for local_name, old in params.items():
                params[local_name] = temporary.get(id(old), old)
        return sources

    def _read_shard(self, unit: ShardedUnitBuffers, params: dict[str, nn.Parameter], weights) -> None:
        lo, hi = unit.shard_start, unit.shard_start + unit.valid_numel
        for slot in unit.layout.own:
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if a < b:
                unit.master[a - lo:b - lo].copy_(weights.read_flat(params[slot.local_name], a - slot.offset,
                                                                   b - slot.offset))
