"""Device slots and the templates bound to them.

Why: the device holds no model, only ``num_slots`` flat buffers, each big enough for the largest
unit, and for each slot one template module per unit structure whose parameters are views into
that slot. Loading a unit is one copy into a slot; binding is aliasing, never a second copy.
Which slot each load goes to is decided once per step by ``assign_slots`` from the known order
of units, so a unit still in a slot (the last block, used on both sides of the loss head) is not
copied again. A unit the plan makes resident (``Plan.resident``) has a buffer of its own, sized to
it: loaded before its forward and used again by its backward without a copy (and, between the
micro-batches of one update, not loaded again: ``SlotPool.uses``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from horizon.store.layout import UnitLayout

__all__ = ["SlotUse", "assign_slots", "SlotPool", "slot_numel", "shared_slot_numel"]


@dataclasses.dataclass(frozen=True)
class SlotUse:
    slot: int
    load: bool  # False when the unit is already in that slot


def assign_slots(order: list[int], num_slots: int, resident: Mapping[int, int] | None = None) -> list[SlotUse]:
    """Slot for each position of ``order``; loads for position j are issued ``num_slots - 1`` ahead.

    A load may not evict a slot used by any of the positions between its issue and its use
    (those units are computing or prefetched); among the others it evicts the unit whose next
    use is farthest (Belady), so units still in a slot are reused when the order allows it.
    ``resident`` maps a unit to its own slot (indices from ``num_slots`` on): it is loaded at its
    first position and never evicted.
    """
    depth = num_slots - 1
    resident = resident or {}
    holder: list[int | None] = [None] * num_slots
    uses: list[SlotUse] = []
    loaded: set[int] = set()
    for j, unit in enumerate(order):
        if unit in resident:
            uses.append(SlotUse(resident[unit], unit not in loaded))
            loaded.add(unit)
            continue
        if unit in holder:
            uses.append(SlotUse(holder.index(unit), False))
            continue
        busy = {uses[k].slot for k in range(max(0, j - depth), j)}

        def next_use(slot: int) -> float:
            held = holder[slot]
            if held is None:
                return float("inf")
            later = [k for k in range(j + 1, len(order)) if order[k] == held]
            return later[0] if later else float("inf")

        free = [s for s in range(num_slots) if s not in busy]
        assert free, "num_slots - 1 prefetch depth always leaves a slot free"
        victim = max(free, key=lambda s: (next_use(s), -s))
        holder[victim] = unit
        uses.append(SlotUse(victim, True))
    return uses


def _structure_key(module: nn.Module, layout: UnitLayout) -> tuple:
    modules = tuple((name, type(m).__qualname__) for name, m in module.named_modules())
    params = tuple((p.local_name, tuple(p.shape)) for p in layout.own)
    params += tuple((b.local_name, tuple(b.owner_slot.shape)) for b in layout.borrowed)
    return modules, params


def _same_buffers(a: nn.Module, b: nn.Module) -> bool:
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    if buffers_a.keys() != buffers_b.keys():
        return False
    return all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)


def slot_numel(layouts: list[UnitLayout], world_size: int = 1) -> int:
    """Elements of one slot: the largest unit's, own and borrowed parameters (a sharded run all-gathers
    ``world_size`` equal pieces of ceil(numel / world_size) into a slot)."""
    return max((max(layout.device_numel, -(-layout.numel // world_size) * world_size) for layout in layouts), default=0)


def shared_slot_numel(layouts: list[UnitLayout], resident: Sequence[int] = (), world_size: int = 1) -> int:
    """Elements of one shared slot: the largest unit that is not resident (0 when every unit is)."""
    return slot_numel([layout for u, layout in enumerate(layouts) if u not in resident], world_size)


class SlotPool:
    """``num_slots`` shared device buffers, one more per resident unit, and per buffer one template for
    each unit structure it can hold."""

    def __init__(self, modules: list[nn.Module], layouts: list[UnitLayout], *, num_slots: int,
                 device: torch.device, dtype: torch.dtype, world_size: int = 1, resident: Sequence[int] = ()) -> None:
        self.slot_numel = shared_slot_numel(layouts, resident, world_size)
        self.num_slots = num_slots
        self.resident = {unit: num_slots + i for i, unit in enumerate(resident)}
        """Resident unit -> its slot index (after the shared ones)."""
        self.slots = [torch.empty(self.slot_numel, dtype=dtype, device=device) for _ in range(num_slots)]
        self.slots += [torch.empty(slot_numel([layouts[u]], world_size), dtype=dtype, device=device) for u in resident]
        self.device, self.dtype = device, dtype
        self._layouts = layouts
        self._key_of: list[int] = []
        self._prototypes: list[tuple[nn.Module, UnitLayout]] = []
        keys: dict[tuple, int] = {}
        for module, layout in zip(modules, layouts):
            key = _structure_key(module, layout)
            if key not in keys:
                keys[key] = len(self._prototypes)
                self._prototypes.append((module, layout))
            elif not _same_buffers(module, self._prototypes[keys[key]][0]):
                raise ValueError(f"unit {layout.name} has buffers that differ from other units of its structure; "
                                 "horizon streams parameters only, so per-unit buffers must be equal (or parameters)")
            self._key_of.append(keys[key])
        streamed = {self._key_of[u] for u in range(len(layouts)) if u not in self.resident}
        self._templates = {(s, k): self._build(s, k) for s in range(num_slots) for k in sorted(streamed)}
        for unit, slot in self.resident.items():
            self._templates[slot, self._key_of[unit]] = self._build(slot, self._key_of[unit])
        self._fresh: set[int] = set()
        """Resident units whose buffer holds the weights the store has now (loaded since ``mark_stale``)."""

    def uses(self, order: list[int]) -> list[SlotUse]:
        """``assign_slots`` for a sweep over ``order``, without the loads of resident units still fresh;
        after it every resident unit is fresh (a sweep that fails calls ``mark_stale``)."""
        uses = assign_slots(order, self.num_slots, self.resident)
        uses = [SlotUse(use.slot, False) if use.load and unit in self._fresh else use for unit, use in zip(order, uses)]
        self._fresh.update(self.resident)
        return uses

    def mark_stale(self) -> None:
        """Load every resident unit again at its next use: the trainer calls it when an update window ends
        (its updates are submitted) and starts (a hand edit between windows), and after a resume."""
        self._fresh.clear()

    @property
    def slot_bytes(self) -> int:
        """Bytes of one shared slot."""
        return self.slot_numel * self.dtype.itemsize

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident units' buffers, all of them."""
        return sum(self.slots[s].numel() for s in self.resident.values()) * self.dtype.itemsize

    def _build(self, slot: int, key: int) -> nn.Module:
        module, layout = self._prototypes[key]
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in module.parameters()}
        template = copy.deepcopy(module, memo)
        views = layout.device_views(self.slots[slot])
        for name, sub in list(template.named_modules()):
            for pname in list(sub._parameters):
                full = f"{name}.{pname}" if name else pname
                if sub._parameters[pname] is not None:
                    assert full in views, f"template parameter {full} has no place in the slot layout"
                    sub._parameters[pname] = nn.Parameter(views[full])
            for bname, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[bname] = buf.to(self.device)
        return template

    def set_training(self, training: bool) -> None:
        for template in self._templates.values():
            template.train(training)

    def template(self, slot: int, unit: int) -> nn.Module:
        return self._templates[slot, self._key_of[unit]]

    def params(self, slot: int, unit: int) -> list[nn.Parameter]:
        """The template's parameters in layout order (own, then borrowed)."""
        template, layout = self.template(slot, unit), self._layouts[unit]
        by_name = dict(template.named_parameters(remove_duplicate=False))
        return [by_name[p.local_name] for p in layout.own] + [by_name[b.local_name] for b in layout.borrowed]

