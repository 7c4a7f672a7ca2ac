"""Capacity under one host budget: the largest reference decoder that trains a step with RAM only vs the SSD tier.

For a fixed width (--dim, --ffn-dim) and host budget (--host-budget-mib: the store plus, with the SSD tier,
its buffers), the depth is the largest whose exact host bytes (the functions the store allocates by)
fit: RAM only (16 B/param), SSDConfig(units="all") (optimizer state on SSD; compute copy + gradient +
I/O pool in RAM) and SSDConfig(units="all", weights=True) (everything on SSD; RAM holds the I/O pool, the
weight window and the gradient ring, which do not grow with depth). The last is bounded by the disk, not by
RAM: its depth is the largest whose SSD file fits --ssd-budget-gib (capped at half the free disk at --dir).
Each model is then built on the meta device and trains --steps steps in a fresh process, which reports its
peak RSS growth over the interpreter's baseline and the median step time (the first step excluded).
Compute is bf16 on CPU by default (--dtype), the setting of the GPU runs where the tier is 4x per param.

    python bench/capacity.py [--host-budget-mib 1024 --dim 512 --dir /tmp --ssd-budget-gib 6]
Writes bench/results/capacity.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile

import torch

from _common import RESULTS_DIR, median, result_record, write_json

from horizon.models import Decoder, decoder_config
from horizon.models.units import find_units
from horizon.store.layout import plan_layouts
from horizon.store.ssd_layout import state_bytes
from horizon.store.ssd_placement import ram_bytes, streamed_units

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
ssd = horizon.SSDConfig(dir=args["dir"], units="all", weights=args["weights"]) if args["ssd"] else None
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


def layouts_of(dim: int, ffn_dim: int, layers: int):
    cfg = decoder_config("tiny", dim=dim, ffn_dim=ffn_dim, num_layers=layers, num_heads=8, num_kv_heads=8,
                         vocab_size=256)
    with torch.device("meta"):
        specs = find_units(Decoder(cfg))
    return plan_layouts([s.name for s in specs], [s.module for s in specs])


def host_bytes(layouts, dtype: torch.dtype, ssd: bool, weights: bool) -> int:
    """The store and the SSD tier's buffers (clipping on: streamed gradients are spilled)."""
    units = frozenset(range(len(layouts))) if ssd else frozenset()
    return ram_bytes(layouts, dtype, accumulate=False, ssd_units=units, io_buffers=2 if ssd else 0,
                     weights=weights, spill_grads=True)


def ssd_bytes(layouts, dtype: torch.dtype, ssd: bool, weights: bool) -> int:
    """The SSD tier's file (every unit's extent)."""
    if not ssd:
        return 0
    units = frozenset(range(len(layouts)))
    streamed = streamed_units(layouts, units, weights=weights)
    return sum(state_bytes(layouts[u], dtype, weights=u in streamed, spill_grad=True) for u in units)


def deepest(fits) -> int:
    layers = 1
    while fits(layers * 2):
        layers *= 2
    lo, hi = layers, layers * 2  # fits at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host-budget-mib", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn-dim", type=int, default=1536)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--ssd-budget-gib", type=float, default=6.0,
                    help="disk the weights=True model's SSD file may take (GiB; capped at half the free disk)")
    args = ap.parse_args()
    budget, dtype = args.host_budget_mib * MIB, DTYPES[args.dtype]
    disk_budget = int(min(args.ssd_budget_gib * 2**30, shutil.disk_usage(args.dir).free / 2))
    runs = {}
    for name, ssd, weights in (("ram_only", False, False), ("horizon_ssd", True, False),
                               ("horizon_ssd_weights", True, True)):
        def fits(layers: int) -> bool:
            layouts = layouts_of(args.dim, args.ffn_dim, layers)
            return (host_bytes(layouts, dtype, ssd, weights) <= budget
                    and ssd_bytes(layouts, dtype, ssd, weights) <= disk_budget)

        layers = deepest(fits)
        child = {"dim": args.dim, "ffn_dim": args.ffn_dim, "layers": layers, "ssd": ssd, "weights": weights,
                 "dir": args.dir, "dtype": args.dtype, "budget": budget, "steps": args.steps}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child)], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["layers"] = layers
        r["host_bytes_formula"] = host_bytes(layouts_of(args.dim, args.ffn_dim, layers), dtype, ssd, weights)
        nxt = layouts_of(args.dim, args.ffn_dim, layers + 1)
        r["next_depth_host_bytes"] = host_bytes(nxt, dtype, ssd, weights)
        r["next_depth_ssd_bytes"] = ssd_bytes(nxt, dtype, ssd, weights)
        r["bounded_by"] = "disk" if r["next_depth_host_bytes"] <= budget else "RAM"
        r["median_step_s"] = median(r["step_s"][1:] or r["step_s"])
        runs[name] = r
        print(f"{name:20s} {layers:4d} layers {r['params'] / 1e6:8.1f} M params  host {r['host_bytes_formula'] / MIB:7.1f}"
              f" MiB (budget {args.host_budget_mib})  peak RSS growth {r['rss_growth_bytes'] / MIB:7.1f} MiB  "
              f"SSD {r['ssd_bytes'] / MIB:7.1f} MiB  step {r['median_step_s']:.2f} s  bounded by {r['bounded_by']}")
    ram = runs["ram_only"]["params"]
    ratios = {"ssd_vs_ram_params": round(runs["horizon_ssd_weights"]["params"] / ram, 3),
              "ssd_state_only_vs_ram_params": round(runs["horizon_ssd"]["params"] / ram, 3)}
    print(" ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    results = {name: r["params"] for name, r in runs.items()}
    record = result_record("capacity", unit="parameters", higher_is_better=True, results=results,
                           ratios=ratios, details=runs,
                           config={"host_budget_mib": args.host_budget_mib, "dim": args.dim, "ffn_dim": args.ffn_dim,
                                   "dtype": args.dtype, "steps": args.steps, "batch": [1, 32],
                                   "ssd_budget_bytes": disk_budget, "grad_clip_norm": 1.0,
                                   "budget_counts": "host store + SSD buffers (not the CPU engine's slots)"})
    print("wrote", write_json(RESULTS_DIR / "capacity.json", record))


if __name__ == "__main__":
    main()
