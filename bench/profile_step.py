"""Where a Horizon step's time goes: the PyTorch profiler around a few steps, summarised per stream.

Prints the step time, how busy the compute stream and the two copy streams were (the union of
their kernels' and copies' intervals over the profiled window), the longest idle gaps of the
compute stream with the host range that was running at the time, and the top operators. Writes
the Chrome trace (gzipped) next to --out for a closer look in Perfetto.

    python bench/profile_step.py --model 1b --seq 4096 --batch 4 [--plan keep] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import BETAS, CLIP, LR, WD, decoder_cfg  # noqa: E402


def _union_s(intervals) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total / 1e6


def summarise(trace: dict, top: int = 12) -> dict:
    """Busy time per CUDA stream and the compute stream's largest gaps, from a Chrome trace dict."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_stream = collections.defaultdict(list)
    for e in gpu:
        by_stream[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    host_ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("horizon.")]
    start = min(s for v in by_stream.values() for s, _ in v)
    end = max(e for v in by_stream.values() for _, e in v)
    window_s = (end - start) / 1e6
    busy = {str(tid): round(_union_s(v), 4) for tid, v in by_stream.items()}
    compute = max(by_stream, key=lambda t: sum(e - s for s, e in by_stream[t]))
    spans = sorted(by_stream[compute])
    gaps = []
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        if s1 - e0 > 200:  # µs
            during = [h["name"] for h in host_ranges if h["ts"] <= e0 <= h["ts"] + h["dur"]]
            gaps.append(((s1 - e0) / 1e3, during[-3:]))
    gaps.sort(reverse=True)
    return {"window_s": round(window_s, 4), "busy_s_by_stream": busy, "compute_stream": str(compute),
            "compute_busy_fraction": round(_union_s(by_stream[compute]) / window_s, 3),
            "gaps_ms_total": round(sum(g for g, _ in gaps), 1), "largest_gaps_ms": gaps[:top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--plan", default="recompute")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--eager", action="store_true", help="no clipping, on_nonfinite=ignore: updates start as grads land")
    p.add_argument("--out", default="/tmp/horizon-profile")
    args = p.parse_args()

    import horizon
    from horizon.models import Decoder

    cfg = decoder_cfg(args.model)
    with torch.device("meta"):
        model = Decoder(cfg)
    config = horizon.TrainConfig(device="cuda", plan=args.plan, grad_clip_norm=None if args.eager else CLIP,
                                 on_nonfinite="ignore" if args.eager else "skip",
                                 optimizer=horizon.AdamW(lr=LR, betas=BETAS, weight_decay=WD))
    trainer = horizon.Trainer(model, config)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    for _ in range(3):
        trainer.step(batch)
    trainer.updater.wait_all()
    torch.cuda.synchronize()
    step_s = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.step(batch)
            step_s.append(time.perf_counter() - start)
        trainer.updater.wait_all()
        torch.cuda.synchronize()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace_path = out / f"trace-{args.model}-{args.plan}{'-eager' if args.eager else ''}.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    with gzip.open(f"{trace_path}.gz", "wt") as f:
        json.dump(trace, f)
    trace_path.unlink()
    print(f"{args.model} {args.plan} eager={args.eager}: step_s={[round(s, 3) for s in step_s]}")
    print(json.dumps(summarise(trace)))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))
    trainer.close()


if __name__ == "__main__":
    main()
