"""``TrainConfig(plan="auto")``: measure, calibrate, solve, rebuild the engine, for the largest batch yet.

Why apart from the trainer: the planner (horizon/planner) is pure (profile, simulate, solve); this is
the one place that runs the trainer's engine for it: two timed all-RECOMPUTE passes on the first
batch to calibrate the profile, then the engine rebuilt to execute the chosen plan. Under torchrun
rank 0 measures and solves while the others wait, and every rank executes rank 0's plan: ranks that
timed themselves could choose different plans, and the step would go at the pace of the slowest.

Why again later: a plan's device bytes grow with the batch, so a plan holds for every batch up to the
shape it was made for (fewer rows round a split's rows down: ``Plan.round_rows``), and a batch with
more rows or a longer sequence than any before would run over the budget. Such a batch is planned
for first, at the element-wise largest shape seen (across ranks under torchrun), with the compute
scale fitted at the first step: the timing passes would overwrite gradients being accumulated.
"""

from __future__ import annotations

import time

import torch

from horizon.engine.engine import Engine

__all__ = ["plan_for_batch", "needs_plan"]


def needs_plan(trainer, shape: tuple[int, int]) -> bool:
    """Whether a batch of ``shape`` (rows, tokens per row) needs a plan first: none yet, or a larger one."""
    planned = trainer.planned_shape
    return planned is None or any(new > old for new, old in zip(shape, planned))


def plan_for_batch(trainer, input_ids: torch.Tensor, labels: torch.Tensor, extras: dict[str, torch.Tensor],
                   shape: tuple[int, int]) -> None:
    """Plan for batches up to ``shape`` and rebuild ``trainer.engine`` to execute the plan.

    The first time, the units are measured at this batch's shape and the profile calibrated on two
    forward-backward passes of the starting all-RECOMPUTE engine (the first a warm-up; gradients are
    overwritten by the step that follows, the RNG is left as it was). Later, the units are measured at
    ``shape`` (the largest so far) once the optimizer's updates in flight are done, and the first
    calibration's compute scale is kept."""
    from horizon.planner.apply import auto_plan

    device = trainer.device
    first = trainer.plan_profile is None
    if tuple(input_ids.shape) != shape:  # another rank's batch is larger: time a batch of the planned shape
        input_ids = labels = torch.randint(0, trainer.vocab_size, shape)
        extras = {}
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

    if not first:
        trainer.updater.wait_all()  # the profile reads the compute copies the optimizer writes
    specs = trainer.engine.specs

    def solve():
        return auto_plan(specs, trainer.store, device=device, transfer=trainer.transfer, batch_size=shape[0],
                         seq_len=shape[1], budget_bytes=trainer.config.device_memory_budget_bytes,
                         recompute_step_s=recompute_step_s if first else None,
                         compute_scale=None if first else trainer.plan_profile.compute_scale,
                         cache_dir=trainer.config.profile_cache_dir,
                         update_schedule=trainer.config.update_schedule,
                         accumulation=trainer.config.grad_accum_steps)

    dp = trainer.data_parallel
    plan, trainer.plan_profile, trainer.plan_solution = dp.from_rank_zero(solve) if dp is not None else solve()
    trainer.planned_shape = shape
    trainer.engine.close()
    trainer.engine = Engine(specs, trainer.store, plan=plan, device=device, transfer=trainer.transfer,
                            collectives=trainer.collectives)
    if first and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        trainer.device_base_bytes = torch.cuda.memory_allocated(device)
