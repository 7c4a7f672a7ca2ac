"""One rank of a data-parallel run, started by the tests with torchrun's environment.

Usage: dp_child.py OUT_DIR parity          every configuration of test_data_parallel, 10 steps each;
       dp_child.py OUT_DIR fail MODE TIMEOUT_S   rank 1 is killed ("kill") or hangs ("hang") in its
                                                 third step's optimizer task; rank 0 must fail.
"""

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import horizon  # noqa: E402
import horizon.planner.measure  # noqa: E402
from horizon.distributed import DistributedConfig  # noqa: E402
from dp_cases import CASES, global_batches, rank_batch  # noqa: E402
from helpers import tiny_decoder  # noqa: E402


def parity(out: Path, rank: int, world_size: int) -> None:
    dist.init_process_group("gloo")  # the trainers below reuse the caller's group
    for name, config in CASES.items():
        data = [rank_batch(b, rank, world_size) for b in global_batches()]
        with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True), config) as trainer:
            metrics = [trainer.step(b) for b in data]
            state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
            moments = {k: (s["exp_avg"].clone(), s["exp_avg_sq"].clone())
                       for k, s in trainer.optimizer_state_dict()["state"].items()}
            dp = trainer.data_parallel
            sent = {"bytes_reduced": dp.bytes_reduced, "bytes_gathered": dp.bytes_gathered,
                    "bytes_broadcast": dp.bytes_broadcast}
            by_role = dict(trainer.store.bytes_by_role)
        torch.save({"losses": [m.loss for m in metrics], "tokens": [m.tokens for m in metrics], "state": state,
                    "moments": moments, "by_role": by_role, **sent}, out / f"{name}-rank{rank}.pt")
    resume_in_halves(out, rank, world_size)
    auto_plan_run(out, rank, world_size)
    dist.destroy_process_group()


def auto_plan_run(out: Path, rank: int, world_size: int) -> None:
    """plan="auto" on both ranks, with the real measurement counted (the cache off, so it must measure)."""
    measured, real = [0], horizon.planner.measure.measure_profile

    def counting(*args, **kwargs):
        measured[0] += 1
        return real(*args, **kwargs)

    horizon.planner.measure.measure_profile = counting
    config = horizon.TrainConfig(optimizer=CASES["no_clip"].optimizer, plan="auto", profile_cache_dir=None,
                                 device_memory_budget_bytes=1 << 30)
    data = [rank_batch(b, rank, world_size) for b in global_batches()[:3]]
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True), config) as trainer:
        for b in data:
            trainer.step(b)
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        plan = repr(trainer.engine.plan)
    horizon.planner.measure.measure_profile = real
    torch.save({"measured": measured[0], "plan": plan, "state": state}, out / f"auto-rank{rank}.pt")


def resume_in_halves(out: Path, rank: int, world_size: int) -> None:
    """The "clip" case again: 5 steps with a checkpoint at step 5, then new trainers resume and do 5 more."""
    config = dataclasses.replace(CASES["clip"], checkpoint=horizon.CheckpointConfig(dir=str(out / "ckpt"),
                                                                                    every_steps=5))
    data = [rank_batch(b, rank, world_size) for b in global_batches()]
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True), config) as trainer:
        first = [trainer.step(b).loss for b in data[:5]]
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True, seed=9),
                         dataclasses.replace(config, resume=True)) as trainer:
        resumed_at = trainer.global_step
        second = [trainer.step(b).loss for b in data[resumed_at:]]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    torch.save({"losses": first + second, "resumed_at": resumed_at, "state": state}, out / f"resumed-rank{rank}.pt")


def fail(rank: int, world_size: int, mode: str, timeout_s: float) -> None:
    calls = [0]

    def delay_s() -> float:
        calls[0] += 1
        if rank == 1 and calls[0] == 20:  # the last update of step 2 (5 units: a fold and an update each)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return 3600.0
        return 0.0

    config = horizon.TrainConfig(grad_clip_norm=1.0, distributed=DistributedConfig(timeout_s=timeout_s))
    data = [rank_batch(b, rank, world_size) for b in global_batches()]
    with horizon.Trainer(tiny_decoder(num_layers=3), config, optimizer_delay_s=delay_s) as trainer:
        for b in data:
            trainer.step(b)
            print("step", trainer.global_step, time.monotonic(), flush=True)


def main() -> None:
    torch.set_num_threads(1)
    out, what = Path(sys.argv[1]), sys.argv[2]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if what == "parity":
        parity(out, rank, world_size)
    else:
        fail(rank, world_size, sys.argv[3], float(sys.argv[4]))
    print("done", flush=True)


if __name__ == "__main__":
    main()
