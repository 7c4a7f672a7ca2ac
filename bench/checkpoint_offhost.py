"""Checkpoint throughput when the step's compute runs off the host, as it does on a GPU.

Why a second loop: in ``bench/checkpoint.py`` the model computes on this machine's 2 cores, so
the copier, the CRCs and the I/O threads of a checkpoint share those cores with the forward and
backward passes. A GPU run leaves the host's cores to the optimizer and the checkpoint. Here the
blocks' compute is the stand-in of ``bench/overlap.py`` (a sleep per unit, forward and backward),
over real parameters of the same sizes as ``bench/checkpoint.py``'s default model (the same
116 MB of master, m and v in 6 units), so the optimizer, the weight and gradient copies, the
copier and the writer move the same bytes on the same cores, and only the matmuls are gone.

What it measures, per N in 2 and 10: ``--rounds`` rounds, each a pair of runs (no checkpoint,
then a checkpoint every N steps) for Horizon and for Horizon with ``recycle_files=False`` (every
shard a new file: the control for ``horizon/checkpoint/recycle.py``), in turn; blocking ms per
checkpoint and bytes durable per checkpoint over the wall time from the request to the durable
commit (medians), against fio in the same run (``checkpoint_write.disk_limit``, 2 GiB, before and
after the loops, the better counting) and against fio writing one checkpoint's bytes
(``same_size_limit``). Same definitions as ``bench/checkpoint.py`` (issue 6: ``vs_limit`` ≥ 0.80).
The iteration-time ratio r(N) is printed but is not this bench's measure: with sleeps for compute,
an otherwise idle VM wakes from them later than a busy one, so the no-checkpoint runs measured
slower than the runs with checkpoints (r 0.92-0.94).

    python bench/checkpoint_offhost.py [--compute-ms 15 --rounds 3]
Writes bench/results/checkpoint_offhost.json.
"""

from __future__ import annotations

import argparse
import os

import torch

from _common import RESULTS_DIR, CpuMeter, median, result_record, write_json
from checkpoint import durable_rate, make_batches, run, steps_for
from checkpoint_write import disk_limit, same_size_limit
from overlap import Chain


def block_params(dim: int) -> int:
    """Parameters of one block of ``bench/checkpoint.py``'s decoder (attention 4·dim², SwiGLU 3·dim·4dim,
    two norms), so the two benches checkpoint the same bytes per unit."""
    return 4 * dim * dim + 3 * dim * 4 * dim + 2 * dim


SYSTEMS = ("horizon", "horizon_new_files")


def rounds(n: int, model, batches, args) -> dict[str, list[dict]]:
    """Per system, the rows of ``args.rounds`` (no checkpoint, system) pairs, the systems taking turns."""
    rows = {system: [] for system in SYSTEMS}
    for _ in range(args.rounds):
        for system in SYSTEMS:
            base = run("none", 0, model, batches, args)
            row = run(system, n, model, batches, args)
            rows[system].append(dict(row, r=row["mean_iter_s"] / base["mean_iter_s"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384, help="width of the embedding and head")
    parser.add_argument("--layers", type=int, default=4, help="blocks")
    parser.add_argument("--compute-ms", type=float, default=15.0,
                        help="stand-in compute per block, forward and backward each (ms); 15 ms gives the "
                             "~190 ms step of bench/checkpoint.py's CPU loop")
    parser.add_argument("--intervals", default="2,10", help="checkpoint every N steps, for each N listed")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (no checkpoint, system) pairs per N")
    parser.add_argument("--dir", default="/tmp/horizon-ckpt-offhost", help="scratch directory on the disk to test")
    parser.add_argument("--out", default=str(RESULTS_DIR / "checkpoint_offhost.json"))
    args = parser.parse_args()
    intervals = [int(n) for n in args.intervals.split(",")]
    os.makedirs(args.dir, exist_ok=True)
    torch.manual_seed(0)
    model = Chain(vocab=256, dim=args.dim, layers=args.layers, numel=block_params(args.dim),
                  compute_s=args.compute_ms / 1e3)
    params = sum(p.numel() for p in model.parameters())
    meter = CpuMeter().start()
    limit_before = disk_limit(args.dir)
    rows = {}
    for n in intervals:
        batches = make_batches(args.warmup + steps_for(n), batch=2, seq=128)
        for system, system_rows in rounds(n, model, batches, args).items():
            rows[f"{system}@{n}"] = system_rows
            durable_ms = [r["median_durable_s"] * 1e3 for r in system_rows]
            print(f"N={n:2d} {system:17s} blocking {median([r['blocking_ms_per_ckpt'] for r in system_rows]):5.2f} "
                  f"ms/ckpt  durable {median(durable_ms):5.1f} ms ({', '.join(f'{d:.1f}' for d in durable_ms)})  "
                  f"r {median([r['r'] for r in system_rows]):.3f}", flush=True)
    limit_after = disk_limit(args.dir)
    limit_bps, limit_tool, _ = max(limit_before, limit_after, key=lambda m: m[0])
    ours = [r for n in intervals for r in rows[f"horizon@{n}"]]
    same_size_bps = same_size_limit(os.path.join(args.dir, "limit"), ours[0]["bytes_per_ckpt"])
    bps = {system: durable_rate([r for n in intervals for r in rows[f"{system}@{n}"]]) for system in SYSTEMS}
    ratios = {"vs_limit": bps["horizon"] / limit_bps,
              "vs_same_size_fio": bps["horizon"] / same_size_bps if same_size_bps else None,
              "new_files_vs_limit": bps["horizon_new_files"] / limit_bps,
              "durable_recycled_over_new_files": bps["horizon"] / bps["horizon_new_files"],
              "blocking_ms_per_ckpt": median([r["blocking_ms_per_ckpt"] for r in ours])}
    print(f"disk limit {limit_bps / 1e9:.2f} GB/s ({limit_tool}); request to durable {bps['horizon'] / 1e9:.2f} GB/s = "
          f"{ratios['vs_limit']:.2f} of it; new files {bps['horizon_new_files'] / 1e9:.2f} GB/s = "
          f"{ratios['new_files_vs_limit']:.2f}; recycled/new {ratios['durable_recycled_over_new_files']:.2f}"
          + (f"; fio at one checkpoint's size {same_size_bps / 1e9:.2f} GB/s = {ratios['vs_same_size_fio']:.2f} of it"
             if same_size_bps else ""))
    print("per checkpoint (ms): " + ", ".join(
        f"{k[len('median_'):-len('_ms')]} {median([r[k] for r in ours]):.1f}" for k in ours[0]
        if k.startswith("median_") and k.endswith("_ms")))
    record = result_record(
        "checkpoint_offhost", unit="bytes durable per second", higher_is_better=True,
        results={**{f"{system}_durable_bytes_per_s": v for system, v in bps.items()},
                 "limit": {"disk_write_bytes_per_s": limit_bps, "tool": limit_tool, "before": limit_before[2],
                           "after": limit_after[2], "same_size_fio_bytes_per_s": same_size_bps}},
        ratios=ratios, rows=rows, cpu=meter.stop(),
        config={"params": params, "state_bytes": 12 * params, **vars(args), "intervals": intervals})
    print("wrote", write_json(args.out, record))


if __name__ == "__main__":
    main()
