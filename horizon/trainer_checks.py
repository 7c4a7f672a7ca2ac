"""What the trainer refuses before it allocates anything: checks that need the model's layouts or the
launch, beyond what ``TrainConfig`` validates on its own.

Why apart: each is a rule with its own error message and fix; the trainer's constructor reads as the
order in which it checks, builds and wires, and a rule can be read and tested by itself.
"""

from __future__ import annotations

from horizon.checkpoint.commit import committed_steps
from horizon.checkpoint.manager import staging_plan
from horizon.config import TrainConfig
from horizon.distributed.world import is_multi_rank
from horizon.engine.slots import slot_numel
from horizon.store.layout import UnitLayout

__all__ = ["refuse_sharded_choices", "check_auto_budget", "check_checkpoint_dir"]


def refuse_sharded_choices(config: TrainConfig) -> None:
    """What a sharded run under torchrun cannot do yet, refused before the process group is joined."""
    if not (config.distributed.shard_optimizer_state and is_multi_rank()):
        return
    if config.checkpoint is not None and config.checkpoint.on_busy == "skip":
        raise ValueError("CheckpointConfig(on_busy='skip') cannot shard: the ranks would disagree on which "
                         "checkpoints to write; use on_busy='wait' with shard_optimizer_state=True")
    if config.plan == "auto":
        raise ValueError("plan='auto' cannot plan a sharded run yet: its profile times whole-unit copies, "
                         "not the shard copy and device all-gather of DistributedConfig(shard_optimizer_state"
                         "=True); pass a fixed plan (plan='keep', 'recompute' or a horizon.Plan)")


def check_auto_budget(config: TrainConfig, layouts: list[UnitLayout]) -> None:
    """plan="auto" needs a budget that holds at least the two weight slots every plan streams through."""
    slot_bytes = slot_numel(layouts) * config.resolved_compute_dtype.itemsize
    if config.plan == "auto" and config.device_memory_budget_bytes < 2 * slot_bytes:
        raise ValueError(f"device_memory_budget_bytes={config.device_memory_budget_bytes:,} cannot hold two "
                         f"weight slots of {slot_bytes:,} bytes; raise it")


def check_checkpoint_dir(config: TrainConfig, layouts: list[UnitLayout], *, world_size: int) -> None:
    """A staging budget too small for one unit (or this rank's shard of it), or a directory that already
    holds checkpoints without ``resume=True``, fails before anything is allocated."""
    staging_plan(config.checkpoint, layouts, world_size=world_size)
    existing = committed_steps(str(config.checkpoint.dir))
    if existing and not config.resume:
        raise ValueError(f"{config.checkpoint.dir} already holds checkpoints (newest: step {existing[-1]}): "
                         "pass TrainConfig(resume=True) to continue from it, or use an empty directory")
