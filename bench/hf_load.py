"""Loading a Hugging Face checkpoint into Horizon: peak RSS and time, from_pretrained vs the streaming loader.

The usual way (baseline): ``AutoModelForCausalLM.from_pretrained(dir)`` builds the model (in the
checkpoint's dtype, transformers 5's default, or in fp32, transformers 4's default and what fp32
master weights suggest), then ``horizon.Trainer(model)`` copies it into the host store unit by unit. Horizon's way:
``empty_hf_model(dir)`` (parameters on the meta device) and ``TrainConfig(hf_weights=dir)``, which
reads each tensor with safetensors into its place in the store. The checkpoint is bf16, as most
published ones are. Each run is a fresh process; a thread samples /proc/self/status every 2 ms for
the peak growth of anonymous RSS (memory the process owns: the store, any copy of the model) and of
file-backed RSS (mmap'd safetensors pages, which the kernel can drop), and the wall time from the
start of loading to a trainer ready to step is taken. One unmeasured run of each first warms the page
cache, then ``--repeats`` runs each; medians are quoted. The store itself needs ``store_bytes``
either way; ``ratios.peak_anon_vs_baseline`` (> 1: Horizon needs less) is the point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

import torch
import transformers

from _common import RESULTS_DIR, CpuMeter, result_record, write_json

MEASURE = """
import json, sys, threading, time, torch, transformers
import horizon
from horizon.models.hf_weights import empty_hf_model

def rss():  # (anonymous, file-backed) resident bytes: a copy in RAM is anonymous, mmap'd safetensors are file pages
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024

peak, done = [0, 0], threading.Event()
def sample():
    while not done.is_set():
        for i, value in enumerate(rss()):
            peak[i] = max(peak[i], value)
        time.sleep(0.002)

path, way = sys.argv[1:3]
base = rss()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
if way.startswith("from_pretrained"):
    dtype = torch.float32 if way.endswith("fp32") else "auto"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    trainer = horizon.Trainer(model, horizon.TrainConfig())
else:
    trainer = horizon.Trainer(empty_hf_model(path), horizon.TrainConfig(hf_weights=path))
seconds = time.perf_counter() - start
done.set()
sampler.join()
print(json.dumps({"seconds": seconds, "peak_anon_growth_bytes": peak[0] - base[0],
                  "peak_file_growth_bytes": peak[1] - base[1], "store_bytes": trainer.store.total_bytes}))
"""


WAYS = ("from_pretrained", "from_pretrained_fp32", "horizon")
"""The checkpoint's own dtype (transformers 5's default), fp32 (transformers 4's default), the streaming loader."""


def _save_model(path: str, args) -> int:
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                      num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)  # as most published checkpoints are
    model.save_pretrained(path, max_shard_size="200MB")
    return sum(p.numel() for p in model.parameters())


def _run(path: str, way: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, path, way], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768, help="Llama hidden size (features)")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (count)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per way (count)")
    args = parser.parse_args()
    meter = CpuMeter().start()
    with tempfile.TemporaryDirectory() as path:
        num_params = _save_model(path, args)
        runs = {}
        for way in WAYS:
            _run(path, way)  # warm-up: the page cache holds the files for every measured run
            runs[way] = [_run(path, way) for _ in range(args.repeats)]
    keys = ("seconds", "peak_anon_growth_bytes", "peak_file_growth_bytes")
    med = {way: {key: statistics.median(r[key] for r in rs) for key in keys}
           for way, rs in runs.items()}
    store_bytes = runs["horizon"][0]["store_bytes"]
    for way, m in med.items():
        print(f"{way:>16}: peak anonymous RSS growth {m['peak_anon_growth_bytes'] / 2**20:8.1f} MiB "
              f"({m['peak_anon_growth_bytes'] / store_bytes:.2f} x the store), file-backed "
              f"{m['peak_file_growth_bytes'] / 2**20:.1f} MiB, {m['seconds']:.2f} s")
    ratios = {"peak_anon_vs_baseline": med["from_pretrained"]["peak_anon_growth_bytes"]
              / med["horizon"]["peak_anon_growth_bytes"],
              "peak_anon_vs_fp32_baseline": med["from_pretrained_fp32"]["peak_anon_growth_bytes"]
              / med["horizon"]["peak_anon_growth_bytes"],
              "speed_vs_baseline": med["from_pretrained"]["seconds"] / med["horizon"]["seconds"],
              "horizon_peak_anon_vs_store": med["horizon"]["peak_anon_growth_bytes"] / store_bytes}
    print(f"{num_params:,} parameters, store {store_bytes / 2**20:.1f} MiB; baseline / horizon: peak RSS "
          f"{ratios['peak_anon_vs_baseline']:.2f}x (fp32 baseline "
          f"{ratios['peak_anon_vs_fp32_baseline']:.2f}x), time {ratios['speed_vs_baseline']:.2f}x")
    record = result_record("hf_load", unit="peak anonymous RSS growth bytes", higher_is_better=False,
                           results={way: m["peak_anon_growth_bytes"] for way, m in med.items()},
                           file_backed_bytes={way: m["peak_file_growth_bytes"] for way, m in med.items()},
                           seconds={way: m["seconds"] for way, m in med.items()}, ratios=ratios, runs=runs,
                           contention=meter.stop(),
                           config={"model": "llama", "hidden": args.hidden, "layers": args.layers,
                                   "num_params": num_params, "store_bytes": store_bytes, "repeats": args.repeats,
                                   "device": "cpu", "shards": "200MB",
                                   "checkpoint_dtype": "bfloat16", "sampling_s": 0.002})
    print(f"wrote {write_json(RESULTS_DIR / 'hf_load.json', record)}")


if __name__ == "__main__":
    main()
