"""Where each parameter of a unit lives inside that unit's flat buffers.

Why flat: one contiguous buffer per unit and role means one DMA per unit across PCIe, one
fused optimizer pass per unit, and parameter tensors that are plain views. A parameter shared
by two units (a tied embedding and head) is stored once, in the first unit that has it; the
later unit *borrows* it, so its device copy and its gradient are routed to the owner.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["ParamSlot", "UnitLayout", "plan_layouts", "ALIGN_BYTES"]

ALIGN_BYTES = 4096
"""Every unit's region in every role starts on a page: DMA- and O_DIRECT-friendly."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamSlot:
    """One parameter inside a flat buffer: its place (in elements) and shape."""

    local_name: str          # name inside the unit's module, e.g. "attention.wq.weight"
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Borrowed:
    """A parameter owned by an earlier unit that this unit also uses (tied weights)."""

    local_name: str
    owner: int              # index of the owning unit
    owner_slot: ParamSlot   # where it sits in the owner's buffers
    offset: int             # where it sits in this unit's device slot, after the own parameters


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitLayout:
    name: str
    own: tuple[ParamSlot, ...]
    borrowed: tuple[Borrowed, ...]

    @property
    def numel(self) -> int:
        """Elements stored by this unit (its own parameters)."""
        return sum(p.numel for p in self.own)

    @property
    def device_numel(self) -> int:
        """Elements this unit needs on the device: own plus borrowed parameters."""
        return self.numel + sum(b.owner_slot.numel for b in self.borrowed)

    def device_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter of the unit as a view into a device-side flat buffer."""
        views = {p.local_name: flat[p.offset:p.offset + p.numel].view(p.shape) for p in self.own}
        for b in self.borrowed:
            views[b.local_name] = flat[b.offset:b.offset + b.owner_slot.numel].view(b.owner_slot.shape)
        return views


def plan_layouts(names: list[str], modules: list[nn.Module]) -> list[UnitLayout]:
    """Layouts for a chain of unit modules; a parameter seen again in a later unit is borrowed."""
    owner_of: dict[int, tuple[int, ParamSlot]] = {}
    layouts = []
    for index, (name, module) in enumerate(zip(names, modules)):
        own, borrowed_params, offset = [], [], 0
        for local_name, param in module.named_parameters(remove_duplicate=True):
            if id(param) in owner_of:
                borrowed_params.append((local_name, param))
                continue
            slot = ParamSlot(local_name=local_name, offset=offset, shape=param.shape)
            owner_of[id(param)] = (index, slot)
            own.append(slot)
            offset += param.numel()
        borrowed = []
        for local_name, param in borrowed_params:
            owner, owner_slot = owner_of[id(param)]
            borrowed.append(Borrowed(local_name=local_name, owner=owner, owner_slot=owner_slot, offset=offset))
            offset += param.numel()
        layouts.append(UnitLayout(name=name, own=tuple(own), borrowed=tuple(borrowed)))
    return layouts
