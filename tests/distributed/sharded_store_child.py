"""One rank of test_sharded_store.py, started with torchrun's environment.

Usage: sharded_store_child.py OUT_DIR RSS_HF_DIR
  rss:  a 28M-parameter decoder built on the meta device on every rank, bf16 compute, sharded: the
        growth of peak RSS (sampled every millisecond) while the trainer is built, and the store's bytes
        by role; once initialised by rank 0 and scattered, once read by slices from RSS_HF_DIR;
  bf16: the tiny decoder trained 10 steps with a bf16 compute copy, sharded;
  meta: the tiny decoder built on the meta device on every rank: rank 0 initialises it and scatters;
  hf:   the tiny decoder on the meta device filled from safetensors, each rank reading its slices.
"""

import dataclasses
import gc
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import horizon  # noqa: E402
from dp_cases import BF16, CASES, global_batches, rank_batch  # noqa: E402
from helpers import tiny_decoder  # noqa: E402
from horizon.models import Decoder, decoder_config  # noqa: E402

RSS_MODEL = dict(vocab_size=4096, dim=512, num_layers=8, num_heads=8, num_kv_heads=4, ffn_dim=1408)
META_SEED = 5
HF_SEED = 3


def meta_decoder(**cfg) -> Decoder:
    with torch.device("meta"):
        return Decoder(decoder_config("tiny", **cfg))


class PeakRss:
    """The highest RSS of this process while the block runs, sampled every millisecond on a thread."""

    def __enter__(self) -> "PeakRss":
        self.process, self.stop = psutil.Process(), threading.Event()
        self.before = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def rss(hf_dir: str | None) -> dict:
    config = dataclasses.replace(BF16, grad_clip_norm=None, hf_weights=hf_dir)
    model = meta_decoder(**RSS_MODEL)
    gc.collect()
    with PeakRss() as peak, horizon.Trainer(model, config) as trainer:
        by_role = dict(trainer.store.bytes_by_role)
        numels = [unit.layout.numel for unit in trainer.store.units]
    return {"growth_bytes": peak.peak - peak.before, "by_role": by_role, "numels": numels}


def train(model, config, data, **kwargs) -> dict:
    with horizon.Trainer(model, config, **kwargs) as trainer:
        at_start = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        losses = [trainer.step(b).loss for b in data]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    return {"losses": losses, "state": state, "at_start": at_start}


def write_hf(out: Path, rank: int) -> Path:
    directory = out / "hf"
    if rank == 0:
        directory.mkdir()
        state = tiny_decoder(num_layers=3, tie_embeddings=True, seed=HF_SEED).state_dict()
        del state["lm_head.weight"]  # tied: saved once, as save_pretrained does
        save_file(state, directory / "model.safetensors")
    dist.barrier()
    return directory


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    data = [rank_batch(b, rank, world_size) for b in global_batches()]
    horizon.Trainer(tiny_decoder(), BF16).close()  # warm-up: lazy imports and first allocations are not the store
    result = {"rss": rss(None), "rss_hf": rss(sys.argv[2])}
    result["bf16"] = train(tiny_decoder(num_layers=3, tie_embeddings=True), BF16, data)
    model = meta_decoder(num_layers=3, tie_embeddings=True)
    torch.manual_seed(META_SEED)
    result["meta"] = train(model, CASES["sharded_clip"], data)
    hf = dataclasses.replace(CASES["sharded_clip"], hf_weights=str(write_hf(out, rank)))
    result["hf"] = train(meta_decoder(num_layers=3, tie_embeddings=True), hf, data)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()
    print("done", flush=True)


if __name__ == "__main__":
    main()
