"""The process group of a torchrun launch, or nothing for a single process.

Why its own module: whether this process is one rank of many is decided once, from torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), before
anything is allocated. Without that environment (or with ``WORLD_SIZE=1``) there is no group and
the trainer runs exactly as a single process. The host store is CPU memory, so every collective
Horizon issues runs on gloo groups, even on CUDA (NCCL cannot reduce host tensors); the default
group is ``cpu:gloo,cuda:nccl`` on CUDA so the user's own device collectives keep working.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from horizon.distributed.config import DistributedConfig

__all__ = ["Launch", "World", "launch_from_env", "init_world", "is_multi_rank"]

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer; "
                         "launch with torchrun, which sets it") from None


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """This process's place from torchrun's variables; None when it runs alone (no variables, or one rank)."""
    present = [name for name in _REQUIRED if name in environ]
    if not present:
        return None
    missing = [name for name in _REQUIRED if name not in environ]
    if missing:
        raise ValueError(f"a distributed launch needs {', '.join(_REQUIRED)} in the environment, but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: launch with "
                         "`torchrun --nproc-per-node N ...`, or unset them all to run as one process")
    rank, world_size, local_rank = (_int_var(environ, n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do not describe a "
                         "launch: need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return None if world_size == 1 else Launch(rank=rank, world_size=world_size, local_rank=local_rank)


def is_multi_rank() -> bool:
    """Whether this process is one of several: a torchrun launch, or a group the caller already made."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    return launch_from_env() is not None


@dataclasses.dataclass(kw_only=True)
class World:
    """The groups of one data-parallel run: ``scalars`` for the caller's thread (label counts,
    losses, the initial broadcast), ``grads`` for the optimizer thread (gradients), ``writer`` for
    the checkpoint writer thread of a sharded run, so no two threads issue collectives on one group."""

    rank: int
    world_size: int
    local_rank: int
    timeout_s: float
    scalars: dist.ProcessGroup
    grads: dist.ProcessGroup
    writer: dist.ProcessGroup
    owns_default_group: bool
    device: dist.ProcessGroup | None = None
    """Sharded runs: the engine's weight all-gathers and gradient reduce-scatters on device tensors (NCCL on
    CUDA, gloo on CPU), issued from the transfer's one thread in the engine's order."""

    def close(self) -> None:
        for group in (self.device, self.writer, self.grads, self.scalars):
            if group is not None:
                dist.destroy_process_group(group)
        if self.owns_default_group and dist.is_initialized():
            dist.destroy_process_group()


def init_world(config: DistributedConfig, device: torch.device) -> World | None:
    """Join the launch's process group (or reuse the one the caller made); None for a single process."""
    timeout = datetime.timedelta(seconds=config.timeout_s)
    owns = not dist.is_initialized()
    if owns:
        launch = launch_from_env()
        if launch is None:
            return None
        if device.type == "cuda":
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    elif dist.get_world_size() == 1:
        return None
    scalars = dist.new_group(backend="gloo", timeout=timeout)
    grads = dist.new_group(backend="gloo", timeout=timeout)
    writer = dist.new_group(backend="gloo", timeout=timeout)
    device_group = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout) \
        if config.shard_optimizer_state else None
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), timeout_s=config.timeout_s,
                 scalars=scalars, grads=grads, writer=writer, owns_default_group=owns, device=device_group)
