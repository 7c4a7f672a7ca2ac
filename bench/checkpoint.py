"""Checkpoint overhead: Horizon's lazy asynchronous checkpoints vs torch.save and DCP async_save.

What it measures, in one run on one training loop (horizon.Trainer on a Decoder, CPU, clipping on):
  * none              no checkpoint: the baseline iteration time
  * horizon           CheckpointConfig(every_steps=N): copier + per-unit barrier + writer thread; the copier
                      waits while an optimizer task runs
  * horizon_no_yield  the same with the copier never waiting for the optimizer (the control for that rule)
  * horizon_new_files the same with CheckpointConfig(recycle_files=False): every shard a new file, the retired
                      checkpoint's files deleted (the control for recycling, horizon/checkpoint/recycle.py)
  * torch_save        every N steps, torch.save of the same state (master weights + AdamW state), fsynced
  * dcp_async_save    every N steps, torch.distributed.checkpoint.async_save of that state (no process group);
                      the previous save is waited for before the next one
for N in 1, 2, 10. Per system and N: blocking ms per checkpoint (time the training loop or the optimizer was
held: Horizon's request + barrier waits; torch.save's whole call; async_save's call + waiting for the
previous one), r(N) = mean iteration time / mean iteration time without checkpoints (the final drain
included; for Horizon the median over --rounds alternating pairs of runs, each against the run just before
it, because the VM drifts by up to 10% between runs a minute apart), time-to-durable, and Horizon's write throughput against the disk's sequential write limit
measured in the same run, before and after the loops, the better of the two counting
(``checkpoint_write.disk_limit``: fio when installed, else parallel dd's).
Throughput (``vs_limit``) is bytes durable per checkpoint over the wall time from the request to the
durable commit (the root fsynced after the rename: from then on a crash keeps the checkpoint), against
fio in the same run (2 GiB: the disk's sustained rate). Beside it: ``vs_same_size_fio``, against fio writing
one checkpoint's bytes to a new file and fsyncing it (median of 5 runs after the loops: the fastest the disk
makes that many bytes durable, its start-up and final flush included); ``vs_limit_with_retention``, the previous definition, which also counted
retention's deletes of an older checkpoint that the writer does after the commit, and bytes over the
writer's busy time (``writer_busy_vs_limit``: its waits for copies excluded, an upper bound). To show
where the time goes, per checkpoint (medians): request to the first shard's writes (the state of step
S does not exist until the next step's updates produce it), the copier's copying and yielding, the
writer's CRCs and waits for copies, the finisher's waits for writes and its fsyncs, the commit after
the last fsync, retention. Warm-up steps are excluded; medians are quoted where they exist.

    python bench/checkpoint.py [--dim 384 --layers 4 --warmup 3 --dir /tmp/horizon-ckpt-bench]
Writes bench/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time

import torch
import torch.distributed.checkpoint as dcp

import horizon
from horizon.models import Decoder, decoder_config

from _common import RESULTS_DIR, CpuMeter, median, result_record, write_json
from checkpoint_write import disk_limit, same_size_limit

INTERVALS = (1, 2, 10)
SYSTEMS = ("horizon", "horizon_no_yield", "horizon_new_files", "torch_save", "dcp_async_save")


def steps_for(n: int) -> int:
    return max(20, 10 * n)  # at least 10 checkpoints per interval (5 at N=10 left its blocking mean to one outlier)


def durable_rate(rows: list[dict]) -> float:
    """Bytes per second from request to durable commit: the median over runs of each run's median checkpoint."""
    return median([r["bytes_per_ckpt"] / r["median_durable_s"] for r in rows])


def make_batches(num: int, *, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (batch, seq), generator=g),
             "labels": torch.randint(0, 256, (batch, seq), generator=g)} for _ in range(num)]


def train_config(ckpt=None):
    return horizon.TrainConfig(optimizer=horizon.AdamW(lr=1e-3), grad_clip_norm=1.0, checkpoint=ckpt)


def full_state(trainer) -> dict:
    return {"model": trainer.state_dict(), "optim": trainer.optimizer_state_dict()["state"]}


def fsync_tree(path: str) -> None:
    for base, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(base, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def run(system: str, n: int, model, batches, args) -> dict:
    """Iteration times and checkpoint costs of one system at interval n (0 = no checkpoints)."""
    root = os.path.join(args.dir, f"{system}-{n}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    ours = system.startswith("horizon")
    ckpt = horizon.CheckpointConfig(dir=root, every_steps=n, final_save=False,
                                    recycle_files=system != "horizon_new_files") if ours and n else None
    trainer = horizon.Trainer(copy.deepcopy(model), train_config(ckpt))
    if system == "horizon_no_yield":
        trainer.checkpointer.optimizer_busy = None  # the copier runs even while the optimizer does
    blocking, durable, write_s, future, iters = [], [], [], None, []
    for b in batches[:args.warmup]:
        trainer.step(b)
    trainer.updater.wait_all()
    start = time.perf_counter()
    for i, b in enumerate(batches[args.warmup:], 1):
        t0 = time.perf_counter()
        trainer.step(b)
        if n and not ours and i % n == 0:
            c0 = time.perf_counter()
            if system == "torch_save":
                path = os.path.join(root, f"step-{i}.pt")
                with open(path, "wb") as f:
                    torch.save(full_state(trainer), f)
                    f.flush()
                    os.fsync(f.fileno())
                durable.append(time.perf_counter() - c0)
            else:
                if future is not None:
                    future.result()
                future = dcp.async_save(full_state(trainer), checkpoint_id=os.path.join(root, f"step-{i}"))
                requested = c0
                future.add_done_callback(lambda _, r=requested: durable.append(time.perf_counter() - r))
            blocking.append(time.perf_counter() - c0)
        iters.append(time.perf_counter() - t0)
    if future is not None:
        future.result()
    drain0 = time.perf_counter()
    if trainer.checkpointer is not None:
        cp = trainer.checkpointer
        cp.wait()
        flights = [f for f in cp.history if f.path is not None]
        blocking = [cp.request_s / max(1, len(flights)) + f.snapshot.blocked_s for f in flights]
        durable = [f.durable_s for f in flights]
        write_s = [f.write_s for f in flights]
        parts = _where_the_time_went(flights)
        bytes_per_ckpt = sum(os.path.getsize(os.path.join(flights[-1].path, x))
                             for x in os.listdir(flights[-1].path)) if flights else 0
    else:
        bytes_per_ckpt, parts = None, {}
    trainer.updater.wait_all()
    total = time.perf_counter() - start
    drain = time.perf_counter() - drain0
    trainer.close()
    shutil.rmtree(root, ignore_errors=True)
    return {"mean_iter_s": total / len(iters), "median_iter_s": median(iters), "max_iter_s": max(iters),
            "drain_s": drain, "num_checkpoints": len(blocking),
            "blocking_ms_per_ckpt": 1e3 * sum(blocking) / len(blocking) if blocking else 0.0,
            "median_durable_s": median(durable) if durable else None,
            "median_write_s": median(write_s) if write_s else None, "bytes_per_ckpt": bytes_per_ckpt, **parts}


def paired_rounds(n: int, model, batches, args) -> tuple[dict, dict]:
    """(none's row, horizon's row) at interval n from ``args.rounds`` alternating pairs of runs. Back-to-back
    runs of one system on this shared VM differ by up to 10% (a drift of minutes), as much as the effect,
    so r(N) is the median of each Horizon run over the no-checkpoint run just before it; none's row is
    the median run, horizon's the median-r run with every round's r and its checkpoints' medians pooled."""
    pairs = []
    for _ in range(args.rounds):
        base = run("none", 0, model, batches, args)
        row = run("horizon", n, model, batches, args)
        row["r"] = row["mean_iter_s"] / base["mean_iter_s"]
        pairs.append((base, row))
    by_r = sorted(pairs, key=lambda pair: pair[1]["r"])
    base = sorted((b for b, _ in pairs), key=lambda b: b["mean_iter_s"])[len(pairs) // 2]
    row = dict(by_r[len(pairs) // 2][1], r_rounds=[r["r"] for _, r in pairs])
    for key in [k for k in row if k.startswith("median_") and k != "median_iter_s"]:
        values = [r[key] for _, r in pairs if r[key] is not None]
        row[key] = median(values) if values else None
    return base, row


def _where_the_time_went(flights) -> dict:
    """Per-checkpoint medians (ms, and the old request-to-writer-done time in s) of a Horizon run."""
    if not flights:
        return {}
    ms = {"first_write": lambda f: f.first_write_s, "copier_copy": lambda f: f.snapshot.copy_s,
          "copier_yield": lambda f: f.snapshot.yielded_s, "writer_crc": lambda f: sum(p.crc_s for p in f.shards),
          "writer_wait_copy": lambda f: f.snapshot.writer_waited_s,
          "finisher_io_wait": lambda f: sum(p.io_wait_s for p in f.shards),
          "finisher_fsync": lambda f: sum(p.fsync_s for p in f.shards), "commit": lambda f: f.commit_s,
          "retain": lambda f: f.retain_s}
    out = {f"median_{name}_ms": 1e3 * median([get(f) for f in flights]) for name, get in ms.items()}
    return {"median_done_s": median([f.done_s for f in flights]), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="blocks")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating no-checkpoint/Horizon run pairs per N")
    parser.add_argument("--dir", default="/tmp/horizon-ckpt-bench", help="scratch directory on the disk to test")
    parser.add_argument("--out", default=str(RESULTS_DIR / "checkpoint.json"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    torch.manual_seed(0)
    model = Decoder(decoder_config("tiny", vocab_size=256, dim=args.dim, num_layers=args.layers,
                                   num_heads=args.dim // 64, num_kv_heads=args.dim // 64, ffn_dim=4 * args.dim))
    params = sum(p.numel() for p in model.parameters())
    meter = CpuMeter().start()
    limit_before = disk_limit(args.dir)
    rows = {}
    for n in INTERVALS:
        batches = make_batches(args.warmup + steps_for(n), batch=args.batch, seq=args.seq)
        base, horizon_rows = paired_rounds(n, model, batches, args)
        rows[f"none@{n}"], rows[f"horizon@{n}"] = base, horizon_rows
        for system in SYSTEMS:
            row = rows[f"horizon@{n}"] if system == "horizon" else run(system, n, model, batches, args)
            if system != "horizon":
                row["r"] = row["mean_iter_s"] / base["mean_iter_s"]
                rows[f"{system}@{n}"] = row
            print(f"N={n:2d} {system:15s} blocking {row['blocking_ms_per_ckpt']:8.1f} ms/ckpt  r={row['r']:.3f}  "
                  f"iter {row['mean_iter_s'] * 1e3:7.1f} ms (none {base['mean_iter_s'] * 1e3:7.1f})  "
                  f"durable {row['median_durable_s'] or 0:.2f} s", flush=True)
    limit_after = disk_limit(args.dir)  # the disk is shared too: the limit is the better of before and after
    limit_bps, limit_tool, _ = max(limit_before, limit_after, key=lambda m: m[0])
    limit_details = {"before": limit_before[2], "after": limit_after[2]}
    step_s = {n: rows[f"none@{n}"]["mean_iter_s"] for n in INTERVALS}
    worst_fraction = max(rows[f"horizon@{n}"]["blocking_ms_per_ckpt"] / 1e3 / step_s[n] for n in INTERVALS if n >= 2)
    vs_save = min(rows[f"torch_save@{n}"]["blocking_ms_per_ckpt"] / max(rows[f"horizon@{n}"]["blocking_ms_per_ckpt"],
                                                                         1e-3) for n in INTERVALS)
    h = [rows[f"horizon@{n}"] for n in INTERVALS if n >= 2]
    new_files = [rows[f"horizon_new_files@{n}"] for n in INTERVALS if n >= 2]
    same_size_bps = same_size_limit(os.path.join(args.dir, "limit"), h[0]["bytes_per_ckpt"])
    durable_bps = durable_rate(h)
    done_bps = median([r["bytes_per_ckpt"] / r["median_done_s"] for r in h])
    writer_bps = median([r["bytes_per_ckpt"] / r["median_write_s"] for r in h])
    print(f"disk limit {limit_bps / 1e9:.2f} GB/s ({limit_tool}); horizon request to durable "
          f"{durable_bps / 1e9:.2f} GB/s = {durable_bps / limit_bps:.2f} of it (old definition, retention "
          f"included: {done_bps / limit_bps:.2f}; writer busy time: {writer_bps / 1e9:.2f} GB/s = "
          f"{writer_bps / limit_bps:.2f}); worst blocking fraction (N>=2) {worst_fraction:.4f}; torch.save "
          f"blocks {vs_save:.1f}x longer")
    if same_size_bps:
        print(f"fio writing one checkpoint's bytes to a new file, fsynced (median of 5): {same_size_bps / 1e9:.2f} GB/s; "
              f"horizon's request to durable = {durable_bps / same_size_bps:.2f} of it")
    new_bps = durable_rate(new_files)
    print(f"without recycling (new files, retired ones deleted): {new_bps / 1e9:.2f} GB/s to durable; recycled "
          f"{durable_bps / new_bps:.2f}x that")
    print("per checkpoint (N>=2, ms): " + ", ".join(
        f"{k[len('median_'):-len('_ms')]} {median([r[k] for r in h]):.1f}" for k in h[0]
        if k.startswith("median_") and k.endswith("_ms")))
    record = result_record(
        "checkpoint", unit="ms blocking per checkpoint", higher_is_better=False,
        results={"horizon": {n: rows[f"horizon@{n}"]["blocking_ms_per_ckpt"] for n in INTERVALS},
                 "horizon_no_yield": {n: rows[f"horizon_no_yield@{n}"]["blocking_ms_per_ckpt"] for n in INTERVALS},
                 "horizon_new_files": {n: rows[f"horizon_new_files@{n}"]["blocking_ms_per_ckpt"] for n in INTERVALS},
                 "torch_save": {n: rows[f"torch_save@{n}"]["blocking_ms_per_ckpt"] for n in INTERVALS},
                 "dcp_async_save": {n: rows[f"dcp_async_save@{n}"]["blocking_ms_per_ckpt"] for n in INTERVALS},
                 "limit": {"disk_write_bytes_per_s": limit_bps, "tool": limit_tool, **limit_details,
                           "same_size_fio_bytes_per_s": same_size_bps}},
        ratios={"blocking_fraction_of_step": worst_fraction, "vs_torch_save_blocking": vs_save,
                "vs_limit": durable_bps / limit_bps, "vs_limit_with_retention": done_bps / limit_bps,
                "vs_same_size_fio": durable_bps / same_size_bps if same_size_bps else None,
                "writer_busy_vs_limit": writer_bps / limit_bps,
                "durable_recycled_over_new_files": durable_bps / new_bps,
                "r_no_yield_over_r_yield": {n: rows[f"horizon_no_yield@{n}"]["r"] / rows[f"horizon@{n}"]["r"]
                                            for n in INTERVALS}},
        rows=rows, cpu=meter.stop(),
        config={"params": params, "state_bytes": 12 * params, **vars(args), "intervals": INTERVALS})
    record["earlier_runs"] = _earlier_runs(args.out, record)
    print("wrote", write_json(args.out, record))


def _earlier_runs(path: str, record: dict) -> list[dict]:
    """The ratios, disk limit and CPU of earlier runs of this same commit recorded in ``path`` (repeated
    runs of one commit accumulate, so the spread is on record, not only the last run). The commit alone
    is compared: the earlier run's own output makes the tree dirty; its git state is kept."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return []
    if not record["git"] or (previous.get("git") or {}).get("commit") != record["git"]["commit"]:
        return []
    summary = {"date": previous["date"], "git": previous["git"], "ratios": previous["ratios"],
               "cpu": previous.get("cpu"), "disk_write_bytes_per_s": previous["results"]["limit"]["disk_write_bytes_per_s"],
               "blocking_ms_per_ckpt": previous["results"]["horizon"]}
    return previous.get("earlier_runs", []) + [summary]


if __name__ == "__main__":
    main()
