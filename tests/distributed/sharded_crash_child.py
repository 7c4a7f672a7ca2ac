"""One rank of test_sharded_crash.py: a sharded run checkpointing every 2 steps, killed or resumed.

Usage: sharded_crash_child.py CKPT_DIR OUT_FILE MODE [KILL_RANK POINT NTH]
  straight: 6 steps (checkpoints at 2, 4, 6), losses and weights saved to OUT_FILE;
  kill:     the same, but rank KILL_RANK SIGKILLs itself the NTH time its writer reaches POINT;
  resume:   new ranks resume from CKPT_DIR and train to step 6.
"""

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import horizon  # noqa: E402
from ckpt_helpers import KillingDisk  # noqa: E402
from dp_cases import CASES, global_batches, rank_batch  # noqa: E402
from helpers import tiny_decoder  # noqa: E402
from horizon.distributed import DistributedConfig  # noqa: E402

STEPS = 6


def main() -> None:
    torch.set_num_threads(1)
    ckpt, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    disk = None
    if mode == "kill" and rank == int(sys.argv[4]):
        disk = KillingDisk(sys.argv[5], int(sys.argv[6]))
    config = dataclasses.replace(CASES["sharded_clip"], distributed=DistributedConfig(shard_optimizer_state=True,
                                                                                      timeout_s=60),
                                 checkpoint=horizon.CheckpointConfig(dir=str(ckpt), every_steps=2),
                                 resume=mode == "resume")
    data = [rank_batch(b, rank, world_size) for b in global_batches()][:STEPS]
    with horizon.Trainer(tiny_decoder(num_layers=3, tie_embeddings=True, seed=9 if mode == "resume" else 0), config,
                         checkpoint_disk=disk) as trainer:
        start = trainer.global_step
        losses = [trainer.step(b).loss for b in data[start:]]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    torch.save({"resumed_at": start, "losses": losses, "state": state}, f"{out}.rank{rank}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
