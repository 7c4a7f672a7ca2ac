"""Data-parallel training of the reference decoder on the Python standard library's source.

    torchrun --nproc-per-node 2 examples/train_torchrun.py [--steps 50] [--shard]

Each rank draws its own micro-batch (its generator is seeded with its rank), the trainer sums the
gradients across ranks, and rank 0 prints the loss of the global batch. With --shard, master, m
and v are split across the ranks. Without torchrun it runs as one process.
"""

import argparse
import os

import torch

import horizon
from horizon.data.text import load_corpus, sample_batch
from horizon.models import Decoder, decoder_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--shard", action="store_true", help="split master, m and v across the ranks")
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    data, _ = load_corpus("stdlib", 4 << 20)
    generator = torch.Generator().manual_seed(1000 + rank)
    config = horizon.TrainConfig(optimizer=horizon.AdamW(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
                                 grad_clip_norm=1.0,
                                 distributed=horizon.DistributedConfig(shard_optimizer_state=args.shard))
    # Sharded, only rank 0 initialises the model and scatters it: build it on the meta device, never W copies.
    with torch.device("meta" if args.shard else "cpu"):
        model = Decoder(decoder_config("tiny"))
    with horizon.Trainer(model, config) as trainer:
        for _ in range(args.steps):
            m = trainer.step(sample_batch(data, args.batch_size, args.seq_len, generator))
            if rank == 0 and m.step % 10 == 0:
                print(f"step {m.step}: loss {m.loss:.3f} over {m.tokens} tokens (all ranks)", flush=True)


if __name__ == "__main__":
    main()
