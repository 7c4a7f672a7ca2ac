"""The host store: every parameter and optimizer state of the model, in flat buffers by role.

Why: host RAM is the authoritative home of the model; the device only borrows units. Each unit
gets one contiguous region per role (fp32 master, Adam m and v, gradient, and a compute copy in
the device's dtype), carved out of two allocations: the buffers that cross PCIe (compute copy,
gradient) and those only the CPU optimizer touches (master, m, v). Sizes are exact, computed
before anything is allocated, and checked against what the machine can give. The parameters the
user's model holds afterwards are views into the master buffers, so the model never exists twice.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import nn

from horizon.store.capacity import check_host_budget, probe_host_capacity
from horizon.store.layout import ALIGN_BYTES, UnitLayout

__all__ = ["Role", "UnitBuffers", "HostStore", "store_bytes_by_role"]


class Role(enum.Enum):
    MASTER = "master"          # fp32 weights the optimizer updates
    EXP_AVG = "exp_avg"        # Adam first moment, fp32
    EXP_AVG_SQ = "exp_avg_sq"  # Adam second moment, fp32
    GRAD = "grad"              # gradient as it arrives from the device (compute dtype)
    COMPUTE = "compute"        # weights in the compute dtype: what crosses to the device
    GRAD_ACCUM = "grad_accum"  # fp32 sum of gradients over micro-batches (gradient accumulation only)


_PCIE_ROLES = (Role.COMPUTE, Role.GRAD)
_CPU_ROLES = (Role.MASTER, Role.EXP_AVG, Role.EXP_AVG_SQ)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def _role_dtype(role: Role, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if role in _PCIE_ROLES else torch.float32


def _has_own_compute_copy(compute_dtype: torch.dtype) -> bool:
    """In fp32 the compute copy is the master itself: no second buffer."""
    return compute_dtype != torch.float32


def _region_bytes(layouts: list[UnitLayout], roles, compute_dtype: torch.dtype,
                  ssd_units: frozenset[int] = frozenset()) -> int:
    """Bytes of ``roles`` in RAM; a unit on SSD keeps no master, m or v here but its own compute copy."""
    total = 0
    for index, layout in enumerate(layouts):
        on_ssd = index in ssd_units
        for role in roles:
            if on_ssd and role in _CPU_ROLES:
                continue
            total += _aligned(layout.numel * _role_dtype(role, compute_dtype).itemsize)
    return total


def _cpu_roles(accumulate: bool) -> tuple[Role, ...]:
    return _CPU_ROLES + ((Role.GRAD_ACCUM,) if accumulate else ())


def store_bytes_by_role(layouts: list[UnitLayout], compute_dtype: torch.dtype, *,
                        accumulate: bool = False, ssd_units: frozenset[int] = frozenset()) -> dict[str, int]:
    """Exact bytes the store allocates in RAM per role, page alignment included (nothing allocated).

    Units in ``ssd_units`` keep master, m and v on SSD (horizon.store.ssd) and their own compute copy here."""
    out = {}
    for role in Role:
        absent = (role is Role.COMPUTE and not _has_own_compute_copy(compute_dtype)) or (
            role is Role.GRAD_ACCUM and not accumulate)
        out[role.value] = 0 if absent else _region_bytes(layouts, (role,), compute_dtype, ssd_units)
    if not _has_own_compute_copy(compute_dtype):
        out[Role.COMPUTE.value] = sum(_aligned(layouts[i].numel * compute_dtype.itemsize) for i in ssd_units)
    return out


@dataclasses.dataclass(kw_only=True)
class UnitBuffers:
    """One unit's flat buffers; ``compute`` aliases ``master`` when computing in fp32."""

    layout: UnitLayout
    master: torch.Tensor
    exp_avg: torch.Tensor | None  # None when the unit's optimizer state is on SSD
    exp_avg_sq: torch.Tensor | None
    grad: torch.Tensor
    compute: torch.Tensor
    grad_accum: torch.Tensor | None = None

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p.local_name: flat[p.offset:p.offset + p.numel].view(p.shape) for p in self.layout.own}

    def refresh_compute(self) -> None:
        """Write the compute copy from the master (a no-op when they are the same buffer)."""
        if self.compute.data_ptr() != self.master.data_ptr():
            self.compute.copy_(self.master)


class _Carver:
    """Hands out consecutive page-aligned typed views of one byte buffer."""

    def __init__(self, nbytes: int) -> None:
        # Page-aligned start, so every ALIGN_BYTES-aligned extent starts on a page (pinning splits there).
        self.raw = torch.empty(nbytes + ALIGN_BYTES, dtype=torch.uint8)
        self.lead_bytes = -self.raw.data_ptr() % ALIGN_BYTES
        self.buffer = self.raw[self.lead_bytes:self.lead_bytes + nbytes]
        self.offset_bytes = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        view = self.buffer[self.offset_bytes:self.offset_bytes + nbytes].view(dtype)
        self.offset_bytes += _aligned(nbytes)
        return view


class HostStore:
    """Flat host buffers for a chain of units, plus the pinning of what crosses PCIe."""

    def __init__(self, layouts: list[UnitLayout], *, compute_dtype: torch.dtype, pin: bool,
                 accumulate: bool = False, ssd_units: frozenset[int] = frozenset()) -> None:
        self.ssd_units = ssd_units
        """Units whose master, m and v live on SSD (horizon.store.ssd); their ``exp_avg``/``exp_avg_sq``
        are None and ``master`` is the compute copy (bit for bit the master in fp32, rounded in bf16)."""
        by_role = store_bytes_by_role(layouts, compute_dtype, accumulate=accumulate, ssd_units=ssd_units)
        pcie_bytes = by_role[Role.COMPUTE.value] + by_role[Role.GRAD.value]
        cpu_bytes = _region_bytes(layouts, _cpu_roles(accumulate), compute_dtype, ssd_units)
        assert pcie_bytes + cpu_bytes == sum(by_role.values())
        can_pin = check_host_budget(required_bytes=pcie_bytes + cpu_bytes, pinned_bytes=pcie_bytes if pin else 0,
                                    capacity=probe_host_capacity(), what=f"{len(layouts)} units")
        self.compute_dtype, self.accumulate = compute_dtype, accumulate
        self.bytes_by_role = by_role
        self._pcie = _Carver(pcie_bytes)
        self._cpu = _Carver(cpu_bytes)
        self.units = [self._carve(layout, i in ssd_units) for i, layout in enumerate(layouts)]
        self.pinned = pin and can_pin
        # The whole allocation is registered (torch asks the storage's start whether it is pinned).
        self._pinned_region = self._pin(self._pcie.raw, self._unit_starts()) if self.pinned else None

    def _carve(self, layout: UnitLayout, on_ssd: bool) -> UnitBuffers:
        if on_ssd:  # master, m and v on SSD; the parameters the model holds are views into the compute copy
            master = compute = self._pcie.take(layout.numel, self.compute_dtype)
            exp_avg = exp_avg_sq = None
        else:
            master = self._cpu.take(layout.numel, torch.float32)
            exp_avg = self._cpu.take(layout.numel, torch.float32)
            exp_avg_sq = self._cpu.take(layout.numel, torch.float32)
            own_copy = _has_own_compute_copy(self.compute_dtype)
            compute = self._pcie.take(layout.numel, self.compute_dtype) if own_copy else master
        grad = self._pcie.take(layout.numel, self.compute_dtype)
        grad_accum = self._cpu.take(layout.numel, torch.float32) if self.accumulate else None
        return UnitBuffers(layout=layout, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                           grad=grad, compute=compute, grad_accum=grad_accum)

    def _unit_starts(self) -> list[int]:
        """Byte offsets in the PCIe allocation where each unit's extents begin: no copy crosses one."""
        base = self._pcie.raw.data_ptr()
        first = [u.compute if _has_own_compute_copy(self.compute_dtype) or i in self.ssd_units else u.grad
                 for i, u in enumerate(self.units)]
        return [t.data_ptr() - base for t in first]

    @staticmethod
    def _pin(buffer: torch.Tensor, split_at: list[int]):
        from horizon.store.pinning import PinnedRegion

        return PinnedRegion(buffer, split_at=split_at)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_role.values())

    def zero_optimizer_state(self) -> None:
        for unit in self.units:
            if unit.exp_avg is not None:  # units on SSD start from zeros written by horizon.store.ssd
                unit.exp_avg.zero_()
                unit.exp_avg_sq.zero_()

    def adopt(self, modules: list[nn.Module], *, init_fn=None, ssd=None) -> None:
        """Make every parameter of ``modules`` a view into the master buffers.

        Unit by unit, parameters on the CPU are copied in and replaced at once, so each unit's
        original storage is freed before the next is copied (peak: the store plus one unit).
        Parameters on the meta device are materialised in place and initialised afterwards by
        ``init_fn`` (the model's ``init_weights`` or each module's ``reset_parameters``).
        Units in ``ssd_units`` (``ssd``: their horizon.store.ssd.SSDTier) have their parameters
        viewed in the compute copy; their fp32 values are staged in an I/O slot and written to SSD.
        """
        replacement: dict[int, nn.Parameter] = {}
        meta_units = set()
        for index, (unit, module) in enumerate(zip(self.units, modules)):
            params = dict(module.named_parameters(remove_duplicate=True))
            if any(params[slot.local_name].is_meta for slot in unit.layout.own):
                meta_units.add(index)
            staged = ssd.stage(index) if index in self.ssd_units and index not in meta_units else None
            sources = unit.views(staged) if staged is not None else {}
            for local_name, view in unit.views(unit.master).items():
                old = params.pop(local_name)
                if not old.is_meta:
                    with torch.no_grad():
                        sources.get(local_name, view).copy_(old.detach())
                replacement[id(old)] = nn.Parameter(view, requires_grad=old.requires_grad)
            del params
            _replace_parameters(module, replacement)
            if staged is not None:
                unit.compute.copy_(staged)
                ssd.release(index)
        if meta_units and init_fn is not None:
            with torch.no_grad():
                init_fn()
        for index, unit in enumerate(self.units):
            if index in self.ssd_units and index in meta_units:  # initialised in the compute dtype
                ssd.initialize(index, unit.compute)
            unit.refresh_compute()
        self.zero_optimizer_state()

    def close(self) -> None:
        if self._pinned_region is not None:
            self._pinned_region.close()
            self._pinned_region = None


def _replace_parameters(module: nn.Module, replacement: dict[int, nn.Parameter]) -> None:
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and id(p) in replacement:
                sub._parameters[name] = replacement[id(p)]
