"""The configurations and data the data-parallel tests run, shared by the parent and its ranks."""

import torch

import dataclasses

import horizon
from helpers import batches
from horizon.distributed import DistributedConfig

WEIGHT_RTOL = 3e-6
"""Weights of two ranks against one process after the ten steps. The ranks add two half-batch partial
gradients where one process sums the whole batch, and AdamW turns that rounding into a relative change
of each step: measured 1.29e-6 on an AMD EPYC VM (wo.weight), under 1e-6 on an Intel Sapphire Rapids
one, whose matmul kernels split the sums differently. A wrong reduction or a lost rank is off by 1e-3 or more."""
OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
GLOBAL_BATCH = 4
STEPS = 10

CASES = {
    "no_clip": horizon.TrainConfig(optimizer=OPT, plan="recompute"),
    "clip": horizon.TrainConfig(optimizer=OPT, grad_clip_norm=0.05, plan="keep"),
    "eager": horizon.TrainConfig(optimizer=OPT, on_nonfinite="ignore", plan="recompute"),
    "accum_clip": horizon.TrainConfig(optimizer=OPT, grad_clip_norm=0.05, grad_accum_steps=2, plan="recompute"),
}
"""Deferred without clipping, deferred with clipping that binds, eager updates, and accumulation."""

SHARDED = DistributedConfig(shard_optimizer_state=True)
CASES |= {f"sharded_{name}": dataclasses.replace(config, distributed=SHARDED) for name, config in list(CASES.items())}
"""The same four with master, m and v split across the ranks."""
CASES["sharded_duplex_swap"] = dataclasses.replace(CASES["sharded_no_clip"], plan="swap", cpu_link_duplex=True)
"""Sharded, every block SWAP, copies to the host on their own thread: the gathers and reduce-scatters
must still reach gloo in one order on both ranks (they stay on the first transfer thread)."""
CASES["sharded_resident"] = dataclasses.replace(CASES["sharded_clip"], plan=horizon.Plan(
    default=horizon.ActivationPolicy.KEEP, resident=("embed_tokens", "layers.1")))
CASES["sharded_resident_accum"] = dataclasses.replace(CASES["sharded_accum_clip"], plan=horizon.Plan(
    resident=("embed_tokens", "layers.1")))
"""Sharded with resident units: their own buffers are all-gathered into once a step (the tied head still
gathers the embedding's weight into its slot), and with accumulation once per update."""


def global_batches() -> list[dict[str, torch.Tensor]]:
    """Ten global batches; about a third of the labels ignored, so the ranks' label counts differ."""
    return batches(STEPS, batch=GLOBAL_BATCH, ignore_frac=0.35, seed=7)


def rank_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    rows = GLOBAL_BATCH // world_size
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}

BF16 = horizon.TrainConfig(optimizer=OPT, grad_clip_norm=1.0, plan="keep", compute_dtype=torch.bfloat16,
                           distributed=SHARDED)
"""Sharded with a bf16 compute copy: compared with plain PyTorch within the error of its bf16 autocast."""
