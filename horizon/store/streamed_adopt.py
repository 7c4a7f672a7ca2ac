"""Adopting a model whose weights are streamed from SSD: one unit in RAM at a time.

Why its own path: the ordinary adoption (HostStore.adopt) materialises a meta-device model whole and
initialises it in one call, which needs the whole model in RAM, exactly what SSDConfig(weights=True)
is for avoiding. Here each unit is materialised alone, into its RAM buffers or, for a unit on SSD, into
an I/O slot of the tier; the model's initialiser runs with every other unit on the meta device (where
``normal_`` and friends draw no random numbers), so the draws are the ones a single call over the
whole model makes, provided the initialiser visits units in chain order (the reference decoder's
``init_weights`` and ``reset_parameters`` loops do). The unit is then written where it lives, and a
streamed unit's parameters stay placeholders on the meta device: the model never holds its weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["adopt_unit_by_unit"]


def _placeholder(p: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"), requires_grad=p.requires_grad)


def _swap(modules: list[nn.Module], mapping: dict[int, nn.Parameter]) -> None:
    """Replace, in every module, each parameter whose id is in ``mapping`` (shared ones everywhere)."""
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and id(p) in mapping:
                    sub._parameters[name] = mapping[id(p)]


def adopt_unit_by_unit(store, modules: list[nn.Module], *, init_fn, ssd) -> None:
    """Make the model's parameters views into ``store`` (RAM units) or placeholders (streamed units),
    writing the values of units on SSD through ``ssd`` (their horizon.store.ssd.SSDTier)."""
    final: dict[int, nn.Parameter] = {}  # id(stand-in in the model) -> what the model keeps
    for index, (unit, module) in enumerate(zip(store.units, modules)):
        params = dict(module.named_parameters(remove_duplicate=True))
        own = {slot.local_name: params[slot.local_name] for slot in unit.layout.own}
        needs_init = any(p.is_meta for p in own.values()) and init_fn is not None
        staged = ssd.stage(index) if index in store.ssd_units else None
        targets = unit.views(staged if staged is not None else unit.master)
        live: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}  # local name -> (stand-in, materialised)
        for local_name, old in own.items():
            if not old.is_meta:
                with torch.no_grad():
                    targets[local_name].copy_(old.detach())
            live[local_name] = (old, nn.Parameter(targets[local_name], requires_grad=old.requires_grad))
        _swap(modules, {id(old): new for old, new in live.values()})
        if needs_init:
            with torch.no_grad():
                init_fn()
        if staged is not None and index not in store.streamed:
            unit.compute.copy_(staged)  # the model's parameters of a unit on SSD view its compute copy
        if staged is not None:
            ssd.release(index)
        # Until every unit is done, the model holds placeholders only: a later init_fn call draws nothing here.
        stand_ins = {}
        for local_name, (_, new) in live.items():
            stand_in = stand_ins[id(new)] = _placeholder(new)
            if index in store.streamed:
                kept = stand_in
            elif index in store.ssd_units:
                kept = nn.Parameter(unit.views(unit.master)[local_name], requires_grad=new.requires_grad)
            else:
                kept = new
            final[id(stand_in)] = kept
            store.parameters[index][local_name] = kept
        _swap(modules, stand_ins)
    _swap(modules, final)
    for unit in store.units:
        unit.refresh_compute()
    store.zero_optimizer_state()

