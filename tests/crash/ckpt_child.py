"""A training run that checkpoints every step, for the kill -9 tests (run as a subprocess).

Usage: ckpt_child.py DIR STEPS THREADS [POINT NTH]: with POINT, the process SIGKILLs itself the
NTH time that protocol point is reached; without it, the parent kills it at a random instant.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import horizon  # noqa: E402
from ckpt_helpers import KillingDisk, SlowDisk, config, data, model  # noqa: E402


class KillingSlowDisk(KillingDisk, SlowDisk):
    def __init__(self, point, nth):
        KillingDisk.__init__(self, point, nth)
        SlowDisk.__init__(self, 0.002)


def main() -> None:
    root, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    disk = KillingSlowDisk(sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 4 else SlowDisk(0.002)
    ckpt = horizon.CheckpointConfig(dir=root, every_steps=1, keep_last=3)
    with horizon.Trainer(model(), config(ckpt, resume=True), checkpoint_disk=disk) as trainer:
        print("started", trainer.global_step, flush=True)
        for b in data(steps)[trainer.global_step:]:
            trainer.step(b)
            print("step", trainer.global_step, time.perf_counter(), flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
