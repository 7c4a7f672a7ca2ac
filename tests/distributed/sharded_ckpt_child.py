"""One rank of the sharded-checkpoint tests (test_sharded_checkpoint.py), started with torchrun's environment.

Usage: sharded_ckpt_child.py OUT_DIR ONE_PROCESS_CKPT
  straight: the "sharded_clip" case for 10 steps with a checkpoint every 5 (OUT_DIR/ckpt);
  2 -> 2:   two new ranks resume from its step 5 and train steps 6-10; the same for the eager
            schedule and for a bf16 compute copy (OUT_DIR/<case>/straight, OUT_DIR/<case>/resumed);
  1 -> 2:   two new ranks resume from ONE_PROCESS_CKPT (one process's step 5) and train steps 6-10;
  failure:  rank 1's disk is full during one save(wait=True); then a second save succeeds;
  wrong_model: a 2-layer model resuming the 3-layer checkpoints: ValueError on every rank.
"""

import dataclasses
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import horizon  # noqa: E402
from ckpt_helpers import FullDisk  # noqa: E402
from dp_cases import BF16, CASES, global_batches, rank_batch  # noqa: E402
from helpers import tiny_decoder  # noqa: E402

CASE = CASES["sharded_clip"]
MORE_CASES = {"sharded_eager": CASES["sharded_eager"], "sharded_bf16": BF16}
"""Resumed 2 -> 2 as well: updates during the backward (the copier's order reversed), and a bf16 compute copy."""


def _config(directory: Path, case: horizon.TrainConfig = CASE, **overrides) -> horizon.TrainConfig:
    return dataclasses.replace(case, checkpoint=horizon.CheckpointConfig(dir=str(directory), every_steps=5), **overrides)


def _copy_on_rank0(rank: int, src: Path, dst: Path) -> None:
    if rank == 0:
        shutil.copytree(src, dst / src.name)
    dist.barrier()


def straight(directory: Path, data, case: horizon.TrainConfig = CASE) -> dict:
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True), _config(directory, case)) as trainer:
        losses = [trainer.step(b).loss for b in data[:5]]
        at5 = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        losses += [trainer.step(b).loss for b in data[5:]]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        by_role = dict(trainer.store.bytes_by_role)
    return {"losses": losses, "state_at_5": at5, "state": state, "by_role": by_role}


def resumed(directory: Path, data, case: horizon.TrainConfig = CASE) -> dict:
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True, seed=9),
                         _config(directory, case, resume=True)) as trainer:
        at = trainer.global_step
        losses = [trainer.step(b).loss for b in data[at:]]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    return {"resumed_at": at, "losses": losses, "state": state}


def failure(out: Path, rank: int, data) -> dict:
    disk = FullDisk()
    config = dataclasses.replace(CASE, checkpoint=horizon.CheckpointConfig(dir=str(out / "fail"), final_save=False))
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True), config, checkpoint_disk=disk) as trainer:
        for b in data[:2]:
            trainer.step(b)
        disk.full = rank == 1
        try:
            trainer.save(wait=True)
            error = None
        except horizon.checkpoint.CheckpointError as e:
            error = str(e)
        committed_after_failure = sorted(os.listdir(out / "fail"))
        disk.full = False
        trainer.step(data[2])
        path = trainer.save(wait=True)
    return {"error": error, "listing": committed_after_failure, "path": path}


def wrong_model(out: Path) -> str | None:
    """Resuming another model's checkpoints: rank 0 finds out, every rank raises its ValueError."""
    try:
        horizon.Trainer(tiny_decoder(num_layers=2, tie_embeddings=True), _config(out / "ckpt", resume=True))
    except ValueError as e:
        return str(e)
    return None


def main() -> None:
    torch.set_num_threads(1)
    out, one_process = Path(sys.argv[1]), Path(sys.argv[2])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    data = [rank_batch(b, rank, world_size) for b in global_batches()]
    result = {"straight": straight(out / "ckpt", data)}
    for name, src in (("two_to_two", out / "ckpt" / "step-000000005"), ("one_to_two", one_process)):
        _copy_on_rank0(rank, src, out / name)
        result[name] = resumed(out / name, data)
    for name, case in MORE_CASES.items():
        result[name] = {"straight": straight(out / name / "straight", data, case)}
        _copy_on_rank0(rank, out / name / "straight" / "step-000000005", out / name / "resumed")
        result[name]["two_to_two"] = resumed(out / name / "resumed", data, case)
    result["failure"] = failure(out, rank, data)
    result["wrong_model"] = wrong_model(out)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()
    print("done", flush=True)


if __name__ == "__main__":
    main()
