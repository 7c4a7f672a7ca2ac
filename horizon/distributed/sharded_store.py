"""A host store whose optimizer state is split across data-parallel ranks (ZeRO style).

Why: with W ranks on a node, a replicated store holds the 12 bytes per parameter of fp32 master,
m and v W times over. Here each rank keeps only its contiguous 1/W of every unit's master, m and
v (and of the summed gradient the update reads), padded so every rank's piece has the same
length ``shard_numel = ceil(numel / W)``; the collectives want equal pieces. What the engine
touches stays whole: the compute copy it loads and the gradient it writes. The model's
parameters are views into the compute copy, which the all-gather after each update makes equal
to the concatenated masters on every rank, so ``state_dict()`` reads the fp32 weights directly.
That is why this store needs an fp32 compute dtype; a bf16 compute copy would need a gather of
the masters for every reader, which is not built yet.
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
    """``master``, ``exp_avg``, ``exp_avg_sq`` and ``grad_shard`` hold elements
    [shard_start, shard_start + shard_numel) of the unit (zero past its end); ``compute`` and
    ``grad`` (and ``grad_accum``) are whole, views of padded buffers of world_size × shard_numel."""

    shard_start: int
    shard_numel: int
    grad_shard: torch.Tensor
    padded_compute: torch.Tensor
    padded_grad: torch.Tensor
    padded_grad_accum: torch.Tensor | None
    gather: Callable[["ShardedUnitBuffers"], None]

    @property
    def weights(self) -> torch.Tensor:
        return self.compute

    @property
    def valid_numel(self) -> int:
        """Elements of this rank's shard that belong to the unit (the rest is padding)."""
        return max(0, min(self.shard_numel, self.layout.numel - self.shard_start))

    def own_compute(self) -> torch.Tensor:
        return self.padded_compute[self.shard_start:self.shard_start + self.shard_numel]

    def refresh_compute(self) -> None:
        """After this rank updated its shard: write it into the compute copy and gather the others'."""
        self.own_compute().copy_(self.master)
        self.gather(self)

    def load_shard(self) -> None:
        """Take this rank's master shard from the (whole, identical on every rank) compute copy."""
        self.master.copy_(self.own_compute())


def sharded_bytes_by_role(layouts: list[UnitLayout], world_size: int, *, accumulate: bool = False) -> dict[str, int]:
    """Exact bytes one rank allocates per role (fp32 compute), page alignment included."""
    shard = sum(_aligned(shard_numel(l.numel, world_size) * _FP32) for l in layouts)
    whole = sum(_aligned(shard_numel(l.numel, world_size) * world_size * _FP32) for l in layouts)
    return {"master": shard, "exp_avg": shard, "exp_avg_sq": shard, "grad_shard": shard, "grad": whole,
            "compute": whole, "grad_accum": whole if accumulate else 0}


class ShardedHostStore(HostStore):
    """This rank's part of the host store of a ``world_size``-rank data-parallel run."""

    def __init__(self, layouts: list[UnitLayout], *, rank: int, world_size: int, pin: bool, accumulate: bool,
                 gather: Callable[[ShardedUnitBuffers], None]) -> None:
        by_role = sharded_bytes_by_role(layouts, world_size, accumulate=accumulate)
        pcie_bytes = by_role["compute"] + by_role["grad"]
        cpu_bytes = sum(by_role.values()) - pcie_bytes
        can_pin = check_host_budget(required_bytes=pcie_bytes + cpu_bytes, pinned_bytes=pcie_bytes if pin else 0,
                                    capacity=probe_host_capacity(), what=f"{len(layouts)} units (rank {rank})")
        self.compute_dtype, self.accumulate, self.bytes_by_role = torch.float32, accumulate, by_role
        self.rank, self.world_size = rank, world_size
        self.ssd_units = frozenset()  # the SSD tier is not combined with sharding
        self._pcie, self._cpu = _Carver(pcie_bytes), _Carver(cpu_bytes)
        self.units = [self._carve_shard(layout, gather) for layout in layouts]
        self.pinned = pin and can_pin
        self._pinned_region = self._pin(self._pcie.raw, self._unit_starts()) if self.pinned else None

    def _carve_shard(self, layout: UnitLayout, gather) -> ShardedUnitBuffers:
        n, c = layout.numel, shard_numel(layout.numel, self.world_size)
        padded_compute = self._pcie.take(c * self.world_size, torch.float32).zero_()  # padding: checkpointed
        padded_grad = self._pcie.take(c * self.world_size, torch.float32).zero_()  # the padding must sum to 0
        shard = [self._cpu.take(c, torch.float32).zero_() for _ in range(4)]
        padded_accum = self._cpu.take(c * self.world_size, torch.float32).zero_() if self.accumulate else None
        return ShardedUnitBuffers(
            layout=layout, master=shard[0], exp_avg=shard[1], exp_avg_sq=shard[2], grad_shard=shard[3],
            compute=padded_compute[:n], grad=padded_grad[:n],
            grad_accum=None if padded_accum is None else padded_accum[:n], shard_start=self.rank * c,
            shard_numel=c, padded_compute=padded_compute, padded_grad=padded_grad, padded_grad_accum=padded_accum,
            gather=gather)

    def adopt(self, modules: list[nn.Module], *, init_fn=None) -> None:
        """As ``HostStore.adopt``, with the parameters made views into the (whole) compute copies; the
        master shards are taken from them by ``load_shard`` once every rank holds rank 0's weights."""
        replacement: dict[int, nn.Parameter] = {}
        any_meta = False
        for unit, module in zip(self.units, modules):
            params = dict(module.named_parameters(remove_duplicate=True))
            for local_name, view in unit.views(unit.compute).items():
                old = params.pop(local_name)
                any_meta |= old.is_meta
                if not old.is_meta:
                    with torch.no_grad():
                        view.copy_(old.detach())
                replacement[id(old)] = nn.Parameter(view, requires_grad=old.requires_grad)
            del params
            _replace_parameters(module, replacement)
        if any_meta and init_fn is not None:
            with torch.no_grad():
                init_fn()
        self.zero_optimizer_state()
