"""``TrainConfig(plan="auto")`` at the first step: measure, calibrate, solve, rebuild the engine.

Why apart from the trainer: the planner (horizon/planner) is pure (profile, simulate, solve); this is
the one place that runs the trainer's engine for it: two timed all-RECOMPUTE passes on the first
batch to calibrate the profile, then the engine rebuilt to execute the chosen plan. Under torchrun
rank 0 measures and solves while the others wait, and every rank executes rank 0's plan: ranks that
timed themselves could choose different plans, and the step would go at the pace of the slowest.
"""

from __future__ import annotations

import time

import torch

from horizon.engine.engine import Engine

__all__ = ["plan_at_first_step"]


def plan_at_first_step(trainer, input_ids: torch.Tensor, labels: torch.Tensor,
                       extras: dict[str, torch.Tensor]) -> None:
    """Measure the units at this batch shape, calibrate on two forward-backward passes of the starting
    all-RECOMPUTE engine (the first a warm-up; gradients are overwritten by the step that follows, the
    RNG is left as it was), solve the plan, and rebuild ``trainer.engine`` to execute it."""
    from horizon.planner.apply import auto_plan

    device = trainer.device
    batch = [t.to(device) for t in (input_ids, labels)]
    extras = {k: v.to(device) for k, v in extras.items()}

    def recompute_step_s() -> float:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for _ in range(2):
                start_s = time.perf_counter()
                trainer.engine.forward_backward(*batch, max(1, int((labels != -100).sum())), extras=extras)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        return time.perf_counter() - start_s

    specs = trainer.engine.specs

    def solve():
        return auto_plan(specs, trainer.store, device=device, transfer=trainer.transfer,
                         batch_size=input_ids.shape[0], seq_len=input_ids.shape[1],
                         budget_bytes=trainer.config.device_memory_budget_bytes, recompute_step_s=recompute_step_s,
                         cache_dir=trainer.config.profile_cache_dir)

    dp = trainer.data_parallel
    plan, trainer.plan_profile, trainer.plan_solution = dp.from_rank_zero(solve) if dp is not None else solve()
    trainer.engine.close()
    trainer.engine = Engine(specs, trainer.store, plan=plan, device=device, transfer=trainer.transfer,
                            collectives=trainer.collectives)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        trainer.device_base_bytes = torch.cuda.memory_allocated(device)
