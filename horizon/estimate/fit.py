"""Does an estimate fit a machine, and how deep can a model of the same width go?

Why: the estimate answers "what will this run take"; a user renting a machine also asks "will
it fit there" (given budgets) or "will it fit here" (``--check``: available RAM narrowed by the
cgroup limit, the locked-memory limit, free GPU memory and free disk, probed as the trainer's
own preflight probes them), and "what is the largest model of this family that would".
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable

import torch
from torch import nn

from horizon.config import TrainConfig
from horizon.estimate.footprint import MemoryEstimate, estimate_memory
from horizon.store.capacity import format_bytes, probe_host_capacity

__all__ = ["Budget", "machine_budget", "shortfalls", "most_layers"]

MAX_LAYERS = 1024
"""The deepest model ``most_layers`` searches for (each try builds the model on meta: O(depth))."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """Bytes a machine offers; None = not limited (not given)."""

    ram_bytes: int | None = None
    device_bytes: int | None = None
    ssd_bytes: int | None = None
    lockable_bytes: int | None = None
    """Bytes that may be page-locked (RLIMIT_MEMLOCK); None = unlimited."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value < 0:
                raise ValueError(f"Budget.{field.name} must be >= 0 bytes, got {value}")


def ram_needed_bytes(estimate: MemoryEstimate, device_type: str) -> int:
    """RAM a run takes: the host store and activations, plus the "device" when it is the CPU."""
    return estimate.ram_bytes_on_cpu if device_type == "cpu" else estimate.host_bytes


def machine_budget(device_type: str, ssd_path: str) -> Budget:
    """What this machine offers right now (reads only)."""
    capacity = probe_host_capacity()
    device_bytes = None
    if device_type == "cuda":
        device_bytes = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    lockable = None if capacity.can_lock_unlimited else capacity.memlock_limit_bytes
    return Budget(ram_bytes=capacity.allocatable_bytes, device_bytes=device_bytes,
                  ssd_bytes=shutil.disk_usage(ssd_path).free, lockable_bytes=lockable)


def shortfalls(estimate: MemoryEstimate, budget: Budget, device_type: str) -> list[str]:
    """One line per budget the estimate exceeds (empty when it fits). Over the memlock limit is not
    a shortfall: the store falls back to pageable memory (slower copies, with a warning)."""
    needs = (("RAM", ram_needed_bytes(estimate, device_type), budget.ram_bytes),
             ("device memory", estimate.device_peak_bytes if device_type == "cuda" else 0, budget.device_bytes),
             ("SSD", estimate.ssd_bytes, budget.ssd_bytes))
    return [f"{what}: needs {format_bytes(need)}, has {format_bytes(have)}, {format_bytes(need - have)} short"
            for what, need, have in needs if have is not None and need > have]


def fits(estimate: MemoryEstimate, budget: Budget, device_type: str) -> bool:
    return not shortfalls(estimate, budget, device_type)


def most_layers(build: Callable[[int], nn.Module], config: TrainConfig, *, batch_size: int, seq_len: int,
                budget: Budget) -> tuple[int, MemoryEstimate | None]:
    """The most blocks (up to MAX_LAYERS) of the model ``build(num_layers)`` builds that fit
    ``budget``, and that model's estimate; (0, None) when not even one block fits.

    Bytes only grow with depth (every block adds its store regions; a KEEP block its graph), so
    doubling to the first depth that does not fit, then a binary search below it, is exact."""
    device_type = torch.device(config.device).type

    def estimate(num_layers: int) -> MemoryEstimate:
        return estimate_memory(build(num_layers), config, batch_size=batch_size, seq_len=seq_len)

    low, high, best = 0, 1, None
    while high < MAX_LAYERS and fits(candidate := estimate(high), budget, device_type):
        low, best, high = high, candidate, min(2 * high, MAX_LAYERS)
    while low < high:
        mid = (low + high + 1) // 2
        candidate = estimate(mid)
        if fits(candidate, budget, device_type):
            low, best = mid, candidate
        else:
            high = mid - 1
    return low, best
