"""Which units' optimizer state goes to SSD: all, the ones named, or as few as a host budget allows.

Why a budget and not a ratio: what a user knows is how much RAM the run may take. Moving a unit to
SSD saves its master, m and v (12 B/param in RAM) but costs its own compute copy and the I/O pool's
slots (with ``weights=True`` the compute copy and gradient leave RAM too, for a window and a ring), so the choice is made on the exact bytes the store would allocate (``store_bytes_by_role``),
largest units first, until the RAM-resident bytes fit.
"""

from __future__ import annotations

import torch

from horizon.store.capacity import format_bytes
from horizon.store.grad_ring import grad_ring_bytes
from horizon.store.host_store import store_bytes_by_role
from horizon.store.layout import UnitLayout
from horizon.store.ssd_config import SSDConfig
from horizon.store.ssd_layout import state_bytes, unit_extents
from horizon.store.weight_stream import weight_window_bytes

__all__ = ["ram_bytes", "ram_bytes_by_role", "choose_ssd_units", "streamed_units"]


def streamed_units(layouts: list[UnitLayout], ssd_units: frozenset[int], *, weights: bool) -> frozenset[int]:
    """The SSD units whose compute copy is streamed too: all of them with ``weights``, except a unit whose
    parameters a later unit borrows (a tied embedding: the head's load copies from its compute copy)."""
    if not weights:
        return frozenset()
    owners = {b.owner for layout in layouts for b in layout.borrowed}
    return frozenset(u for u in ssd_units if u not in owners)


def ram_bytes_by_role(layouts: list[UnitLayout], compute_dtype: torch.dtype, *, accumulate: bool,
                      ssd_units: frozenset[int], io_buffers: int, weights: bool = False, weight_buffers: int = 3,
                      spill_grads: bool = False) -> dict[str, int]:
    """Host RAM by role for this placement: the store's roles, the SSD tier's I/O pool and, with streamed
    weights, their read-ahead window and gradient ring (exact, page padding included; nothing allocated)."""
    streamed = streamed_units(layouts, ssd_units, weights=weights)
    out = store_bytes_by_role(layouts, compute_dtype, accumulate=accumulate, ssd_units=ssd_units, streamed=streamed)
    out["ssd_io_pool"] = io_buffers * max((state_bytes(layouts[u], compute_dtype, weights=u in streamed,
                                                       spill_grad=spill_grads) for u in ssd_units), default=0)
    if streamed:
        padded = []
        for u in streamed:
            extents = unit_extents(layouts[u], compute_dtype=compute_dtype, weights=True)
            padded.append(extents.role_bytes(extents.weight_role))
        out["ssd_weight_window"] = weight_window_bytes(padded, weight_buffers)
        out["ssd_grad_ring"] = grad_ring_bytes(layouts, streamed, compute_dtype)
    return out


def ram_bytes(layouts: list[UnitLayout], compute_dtype: torch.dtype, *, accumulate: bool,
              ssd_units: frozenset[int], io_buffers: int, weights: bool = False, weight_buffers: int = 3,
              spill_grads: bool = False) -> int:
    """Host RAM of the store plus the SSD tier's buffers for this placement (nothing allocated)."""
    return sum(ram_bytes_by_role(layouts, compute_dtype, accumulate=accumulate, ssd_units=ssd_units,
                                 io_buffers=io_buffers, weights=weights, weight_buffers=weight_buffers,
                                 spill_grads=spill_grads).values())


def choose_ssd_units(config: SSDConfig, layouts: list[UnitLayout], compute_dtype: torch.dtype, *,
                     accumulate: bool, host_budget_bytes: int | None, spill_grads: bool = False) -> frozenset[int]:
    """The units whose state goes to SSD; ValueError when an index is out of range or the budget cannot hold
    even the placement asked for."""
    num_units = len(layouts)

    def cost(units: frozenset[int]) -> int:
        return ram_bytes(layouts, compute_dtype, accumulate=accumulate, ssd_units=units,
                         io_buffers=config.io_buffers, weights=config.weights, weight_buffers=config.weight_buffers,
                         spill_grads=spill_grads)

    if config.units == "all":
        chosen = frozenset(range(num_units))
    elif config.units == "auto":
        chosen = frozenset()
        by_size = sorted(range(num_units), key=lambda u: (-layouts[u].numel, u))
        for unit in by_size:
            if cost(chosen) <= host_budget_bytes:
                break
            chosen = chosen | {unit}
    else:
        bad = [u for u in config.units if u >= num_units]
        if bad:
            raise ValueError(f"SSDConfig.units names {bad}, but the model has units 0..{num_units - 1} "
                             "(0 = the embedding, the last = the head)")
        chosen = frozenset(config.units)
    if host_budget_bytes is not None and cost(chosen) > host_budget_bytes:
        least = cost(frozenset(range(num_units)))
        raise ValueError(f"host_memory_budget_bytes={host_budget_bytes:,} ({format_bytes(host_budget_bytes)}) cannot "
                         f"hold the store: {cost(chosen):,} bytes with units {sorted(chosen)} on SSD, at least "
                         f"{least:,} with every unit there; raise the budget or put more units on SSD")
    return chosen
