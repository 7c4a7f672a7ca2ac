"""Which units' optimizer state goes to SSD: all, the ones named, or as few as a host budget allows.

Why a budget and not a ratio: what a user knows is how much RAM the run may take. Moving a unit to
SSD saves its master, m and v (12 B/param in RAM) but costs its own compute copy and the I/O pool's
slots, so the choice is made on the exact bytes the store would allocate (``store_bytes_by_role``),
largest units first, until the RAM-resident bytes fit.
"""

from __future__ import annotations

import torch

from horizon.store.capacity import format_bytes
from horizon.store.host_store import store_bytes_by_role
from horizon.store.layout import UnitLayout
from horizon.store.ssd import state_bytes
from horizon.store.ssd_config import SSDConfig

__all__ = ["ram_bytes", "choose_ssd_units"]


def ram_bytes(layouts: list[UnitLayout], compute_dtype: torch.dtype, *, accumulate: bool,
              ssd_units: frozenset[int], io_buffers: int) -> int:
    """Host RAM of the store plus the SSD tier's I/O pool for this placement (nothing allocated)."""
    store = sum(store_bytes_by_role(layouts, compute_dtype, accumulate=accumulate, ssd_units=ssd_units).values())
    pool = io_buffers * max((state_bytes(layouts[u]) for u in ssd_units), default=0)
    return store + pool


def choose_ssd_units(config: SSDConfig, layouts: list[UnitLayout], compute_dtype: torch.dtype, *,
                     accumulate: bool, host_budget_bytes: int | None) -> frozenset[int]:
    """The units whose state goes to SSD; ValueError when an index is out of range or the budget cannot hold
    even the placement asked for."""
    num_units = len(layouts)

    def cost(units: frozenset[int]) -> int:
        return ram_bytes(layouts, compute_dtype, accumulate=accumulate, ssd_units=units,
                         io_buffers=config.io_buffers)

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
