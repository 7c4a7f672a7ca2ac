"""How a data-parallel run behaves when a peer rank fails: one keyword-only dataclass."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["DistributedConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    timeout_s: float = 1800.0
    """Longest a collective waits for the other ranks before the run fails with PeerFailure. It must
    cover the longest gap between two collectives on a healthy rank, which under offload is a whole
    CPU optimizer phase plus a checkpoint copy; torch's own default for gloo is 1800 s."""

    shard_optimizer_state: bool = False
    """Split the whole host store across the ranks (ZeRO-3): each rank holds and updates 1/W of every
    unit's fp32 master, Adam m and v, compute copy (fp32 or bf16) and summed gradient. The engine
    all-gathers a unit's weights into its device slot before it computes and reduce-scatters its
    gradient on the device after its backward; the model's parameters become meta tensors."""

    def __post_init__(self) -> None:
        if not isinstance(self.shard_optimizer_state, bool):
            raise ValueError(f"DistributedConfig.shard_optimizer_state must be True or False, "
                             f"got {self.shard_optimizer_state!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"DistributedConfig.timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
