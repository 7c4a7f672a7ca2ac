"""Capacity under one host budget: the largest reference decoder that trains a step with RAM only vs the SSD tier.

For a fixed width (--dim, --ffn-dim) and host budget (--host-budget-mib: the store plus, with the SSD tier,
its I/O pool), the depth is the largest whose exact host bytes (the functions the store allocates by)
fit: RAM only (16 B/param) and SSDConfig(units="all") (compute copy + gradient + pool). Each of the two
models is then built on the meta device and trains --steps steps in a fresh process, which reports its
peak RSS growth over the interpreter's baseline and the median step time (the first step excluded).
Compute is bf16 on CPU by default (--dtype), the setting of the GPU runs where the tier is 4x per param.

    python bench/capacity.py [--host-budget-mib 1024 --dim 512 --dir /tmp]
Writes bench/results/capacity.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from _common import RESULTS_DIR, median, result_record, write_json

from horizon.models import Decoder, decoder_config
from horizon.models.units import find_units
from horizon.store.layout import plan_layouts
from horizon.store.ssd_placement import ram_bytes

MIB = 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

CHILD = """
import json, resource, sys, time, psutil, torch, horizon
from horizon.models import Decoder, decoder_config
args = json.loads(sys.argv[1])
cfg = decoder_config("tiny", dim=args["dim"], ffn_dim=args["ffn_dim"], num_layers=args["layers"], num_heads=8,
                     num_kv_heads=8, vocab_size=256)
with torch.device("meta"):
    model = Decoder(cfg)
baseline = psutil.Process().memory_info().rss
ssd = horizon.SSDConfig(dir=args["dir"], units="all") if args["ssd"] else None
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args["dtype"]]
trainer = horizon.Trainer(model, horizon.TrainConfig(compute_dtype=dtype, grad_clip_norm=1.0, ssd=ssd,
                                                     host_memory_budget_bytes=args["budget"] if ssd else None))
x = torch.randint(0, 256, (1, 32))
times = []
for _ in range(args["steps"]):
    start = time.perf_counter()
    trainer.step({"input_ids": x, "labels": x})
    trainer.updater.wait_all()
    times.append(time.perf_counter() - start)
mem = trainer.memory()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"params": sum(u.layout.numel for u in trainer.store.units), "step_s": times,
                  "rss_growth_bytes": peak - baseline, "host_bytes": mem.host_bytes, "ssd_bytes": mem.ssd_bytes,
                  "cpu_slots_bytes": mem.device_peak_bytes}))
trainer.close()
"""


def host_bytes(dim: int, ffn_dim: int, layers: int, dtype: torch.dtype, ssd: bool) -> int:
    cfg = decoder_config("tiny", dim=dim, ffn_dim=ffn_dim, num_layers=layers, num_heads=8, num_kv_heads=8,
                         vocab_size=256)
    with torch.device("meta"):
        specs = find_units(Decoder(cfg))
    layouts = plan_layouts([s.name for s in specs], [s.module for s in specs])
    units = frozenset(range(len(layouts))) if ssd else frozenset()
    return ram_bytes(layouts, dtype, accumulate=False, ssd_units=units, io_buffers=2 if ssd else 0)


def deepest(budget: int, dim: int, ffn_dim: int, dtype: torch.dtype, ssd: bool) -> int:
    layers = 1
    while host_bytes(dim, ffn_dim, layers * 2, dtype, ssd) <= budget:
        layers *= 2
    lo, hi = layers, layers * 2  # fits at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if host_bytes(dim, ffn_dim, mid, dtype, ssd) <= budget else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host-budget-mib", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn-dim", type=int, default=1536)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    budget, dtype = args.host_budget_mib * MIB, DTYPES[args.dtype]
    runs = {}
    for name, ssd in (("ram_only", False), ("horizon_ssd", True)):
        layers = deepest(budget, args.dim, args.ffn_dim, dtype, ssd)
        child = {"dim": args.dim, "ffn_dim": args.ffn_dim, "layers": layers, "ssd": ssd, "dir": args.dir,
                 "dtype": args.dtype, "budget": budget, "steps": args.steps}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child)], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["layers"] = layers
        r["host_bytes_formula"] = host_bytes(args.dim, args.ffn_dim, layers, dtype, ssd)
        r["next_depth_host_bytes"] = host_bytes(args.dim, args.ffn_dim, layers + 1, dtype, ssd)
        r["median_step_s"] = median(r["step_s"][1:] or r["step_s"])
        runs[name] = r
        print(f"{name:12s} {layers:4d} layers {r['params'] / 1e6:8.1f} M params  host {r['host_bytes_formula'] / MIB:7.1f}"
              f" MiB (budget {args.host_budget_mib})  peak RSS growth {r['rss_growth_bytes'] / MIB:7.1f} MiB  "
              f"SSD {r['ssd_bytes'] / MIB:7.1f} MiB  step {r['median_step_s']:.2f} s")
    ratio = runs["horizon_ssd"]["params"] / runs["ram_only"]["params"]
    print(f"ssd_vs_ram_params {ratio:.2f}")
    results = {name: r["params"] for name, r in runs.items()}
    record = result_record("capacity", unit="parameters", higher_is_better=True, results=results,
                           ratios={"ssd_vs_ram_params": round(ratio, 3)}, details=runs,
                           config={"host_budget_mib": args.host_budget_mib, "dim": args.dim, "ffn_dim": args.ffn_dim,
                                   "dtype": args.dtype, "steps": args.steps, "batch": [1, 32],
                                   "budget_counts": "host store + SSD I/O pool (not the CPU engine's slots)"})
    print("wrote", write_json(RESULTS_DIR / "capacity.json", record))


if __name__ == "__main__":
    main()
