"""The trainer's preflight: the estimate against this machine, before anything is allocated.

Why: a run that does not fit in host RAM is killed by the kernel (or the container's OOM killer)
minutes into loading, with no message. ``horizon estimate --check`` answers that before renting a
machine; the trainer asks the same question of the machine it runs on, with the same estimate (``estimate_memory``, which sizes
the store with the store's own function), before building the store. The batch shape is not known
yet, so the host activation buffers (allocated at the first step) are not counted: what is checked
is the host store and, on ``device="cpu"``, the engine's device buffers (weight slots, gradients in
flight), which live in RAM too. Neither
depends on the blocks' activation policies, so the estimate is taken with every block RECOMPUTE
(the estimate does not model SWAP) and the plan's own slot count.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from horizon.config import TrainConfig
from horizon.engine.plan import ActivationPolicy
from horizon.estimate.fit import ram_needed_bytes
from horizon.estimate.footprint import estimate_memory
from horizon.store.capacity import HostCapacity, HostMemoryError, format_bytes, probe_host_capacity

__all__ = ["preflight", "applies"]

_OPT_OUT = "or pass TrainConfig(preflight=False) to skip this check"


def applies(config: TrainConfig, multi_rank: bool) -> bool:
    """Whether the estimate describes this run's host store: not with an SSD tier (the estimate keeps
    all state in RAM) nor with the optimizer state sharded across ranks; their stores check themselves."""
    sharded = multi_rank and config.distributed.shard_optimizer_state
    return config.preflight and config.ssd is None and not sharded


def _machine(capacity: HostCapacity) -> str:
    parts = [f"available RAM {format_bytes(capacity.available_bytes)}"]
    if capacity.cgroup_limit_bytes is not None:
        parts.append(f"cgroup limit {format_bytes(capacity.cgroup_limit_bytes)} with "
                     f"{format_bytes(capacity.cgroup_usage_bytes or 0)} in use")
    return ", ".join(parts)


def _all_recompute(config: TrainConfig) -> TrainConfig:
    """``config`` with its plan's slots and every block RECOMPUTE (the warnings were given for ``config``)."""
    plan = dataclasses.replace(config.resolved_plan, default=ActivationPolicy.RECOMPUTE, per_unit={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dataclasses.replace(config, plan=plan)


def preflight(model: nn.Module, config: TrainConfig, *, capacity: HostCapacity | None = None) -> int:
    """Raise HostMemoryError (a ValueError) with the shortfall when the run's host bytes exceed what this
    machine can give; else return the host bytes.

    The locked-memory limit is not a reason to refuse: whether the NVIDIA driver enforces it for
    cudaHostRegister depends on the driver, so the store warns and falls back to pageable memory instead."""
    estimate = estimate_memory(model, _all_recompute(config), batch_size=1, seq_len=1)
    device_type = torch.device(config.device).type
    needed = ram_needed_bytes(estimate, device_type) - estimate.host_bytes_by_role["activations"]
    capacity = capacity if capacity is not None else probe_host_capacity()
    if needed > capacity.allocatable_bytes:
        where = "host store and device buffers (device='cpu')" if device_type == "cpu" else "host store"
        raise HostMemoryError(
            f"preflight: this {estimate.num_params:,}-parameter model needs {format_bytes(needed)} for its {where} "
            f"but this machine can give {format_bytes(capacity.allocatable_bytes)} ({_machine(capacity)}): "
            f"{format_bytes(needed - capacity.allocatable_bytes)} short. Use a smaller model, keep optimizer "
            f"state on SSD (TrainConfig(ssd=...)), free memory or raise the container's limit, {_OPT_OUT}")
    return needed
