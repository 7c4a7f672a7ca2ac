"""Data parallel under torchrun on CPU (gloo): what a 2-core machine can measure of issue 9.

For W in --world-sizes, W ranks of this script are started with torchrun's environment. Each rank trains
the "small" reference decoder (~4.5M parameters) on its own [--batch, --seq] micro-batch, twice in the same
run: with Horizon (horizon.Trainer, gradients all-reduced in the host store on the optimizer thread) and with
the baseline users would otherwise run, plain PyTorch DDP over gloo with torch.optim.AdamW; Horizon runs three
times: replicated, with DistributedConfig(shard_optimizer_state=True) (ZeRO-3: every unit's weights
all-gathered into its slot at each load, its gradient reduce-scattered after its backward), and sharded with
a bf16 compute copy.
Warm-up steps are excluded; medians of the step time are reported, with global tokens/s and the ratio DDP
time / Horizon time (> 1: Horizon faster).

What is checked against a formula, in the same run:
  - collective bytes per update: measured (DataParallel.bytes_reduced, bytes_gathered) vs the formula:
    replicated, an all-reduce of 4 B x N (fp32 gradient); sharded, a reduce-scatter of 4 B x N' and, for
    every load of the step's schedule (assign_slots: embedding, blocks, head, blocks back, embedding, a
    resident unit not reloaded; a tied parameter's owner gathered again), an all-gather of c B x n'
    (n' = the unit's elements padded to W equal pieces, N' their sum, c = 4 in fp32, 2 in bf16); a ring
    puts 2(W-1)/W of an all-reduce and (W-1)/W of a reduce-scatter or all-gather on every rank's link;
  - host bytes per rank: the store's exact byte count against the single-process store / W (sharded, every
    role is a shard: master, m, v, compute copy, gradient), and its optimizer state (master, m, v);
  - checkpoint bytes per rank (one save(wait=True) after the timed steps): replicated, rank 0 writes all
    12 B x N; sharded, each rank writes its 12 B x N'/W (plus a page-aligned header per file).
Scaling itself cannot be measured here: W ranks share 2 cores, so each rank gets 2/W threads.

usage: python bench/distributed.py [--world-sizes 1 2] [--steps 8] [--warmup 3] [--batch 2] [--seq 128]
Run it under ../shared/tools/quiet-run on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import RESULTS_DIR, median, result_record, write_json  # noqa: E402
import horizon  # noqa: E402
from horizon.distributed import DistributedConfig  # noqa: E402
from horizon.engine.slots import assign_slots  # noqa: E402
from horizon.models import Decoder, decoder_config  # noqa: E402

OPT = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
GRAD_BYTES_PER_PARAM = 4  # fp32 gradients in the host store on CPU


def _batches(args, rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    shape = (args.batch, args.seq)
    return [{"input_ids": torch.randint(0, 256, shape, generator=g), "labels": torch.randint(0, 256, shape, generator=g)}
            for _ in range(args.steps)]


MODES = {"replicated": dict(shard=False, dtype=torch.float32), "sharded": dict(shard=True, dtype=torch.float32),
         "sharded_bf16": dict(shard=True, dtype=torch.bfloat16)}


def _checkpoint_bytes_by_rank(path: str, world_size: int) -> list[int]:
    """Bytes of the shard files each rank wrote (a sharded run names its files by rank; otherwise rank 0's)."""
    sizes = [0] * world_size
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            rank = int(name.split("-rank-")[1].split("-")[0]) if "-rank-" in name else 0
            sizes[rank] += os.path.getsize(os.path.join(path, name))
    return sizes


def _gathered_elements_per_step(trainer, world_size: int) -> int:
    """Elements all-gathered into slots in one step by the engine's load schedule (see the docstring)."""
    layouts = [u.layout for u in trainer.store.units]
    order = list(range(len(layouts))) + list(range(len(layouts) - 2, -1, -1))

    def padded(unit: int) -> int:
        return -(-layouts[unit].numel // world_size) * world_size

    return sum(padded(u) + sum(padded(b.owner) for b in layouts[u].borrowed)
               for u, use in zip(order, assign_slots(order, trainer.engine.pool.num_slots)) if use.load)


def _horizon_steps(args, rank: int, mode: str) -> dict:
    shard, dtype = MODES[mode]["shard"], MODES[mode]["dtype"]
    torch.manual_seed(0)
    model = Decoder(decoder_config("small"))
    config = horizon.TrainConfig(optimizer=horizon.AdamW(**OPT), grad_clip_norm=1.0, compute_dtype=dtype,
                                 distributed=DistributedConfig(shard_optimizer_state=shard),
                                 checkpoint=horizon.CheckpointConfig(dir=os.path.join(args.ckpt_root, mode),
                                                                     final_save=False))
    with horizon.Trainer(model, config) as trainer:
        dp = trainer.data_parallel
        world_size = dp.world.world_size if dp else 1
        times = []
        for b in _batches(args, rank):
            start = time.perf_counter()
            trainer.step(b)
            trainer.updater.wait_all()  # the step's updates included, as DDP's optimizer.step() is
            times.append(time.perf_counter() - start)
        path = trainer.save(wait=True)  # None on ranks that do not write (replicated: all but rank 0)
        if dp is not None:
            dist.barrier()  # every rank's files are in place before rank 0 counts them
        ckpt_bytes = _checkpoint_bytes_by_rank(path, world_size) if rank == 0 else None
        return {"step_s": times, "bytes_reduced": dp.bytes_reduced if dp else 0, "updates": trainer.global_step,
                "checkpoint_bytes_by_rank": ckpt_bytes,
                "bytes_gathered": dp.bytes_gathered if dp else 0,
                "host_bytes": trainer.store.total_bytes, "host_bytes_by_role": dict(trainer.store.bytes_by_role),
                "params": sum(p.numel() for p in model.parameters()),
                "padded_params": sum(-(-u.layout.numel // world_size) * world_size for u in trainer.store.units),
                "gathered_elements_per_step": _gathered_elements_per_step(trainer, world_size),
                "compute_itemsize": dtype.itemsize, "sharded": shard}


def _ddp_steps(args, rank: int, world_size: int) -> list[float]:
    torch.manual_seed(0)
    model = Decoder(decoder_config("small"))
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    times = []
    for b in _batches(args, rank):
        start = time.perf_counter()
        logits = model(b["input_ids"])
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), b["labels"].view(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def worker(args) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, args.cores // world_size))
    if world_size > 1:
        dist.init_process_group("gloo")
    out = {mode: _horizon_steps(args, rank, mode) for mode in MODES}
    out["ddp_step_s"] = _ddp_steps(args, rank, world_size)
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(out))


def launch(args, world_size: int, out: Path) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "--worker-out", str(out), "--steps", str(args.steps), "--batch",
               str(args.batch), "--seq", str(args.seq), "--cores", str(args.cores),
               "--ckpt-root", str(out.parent / f"ckpt-w{world_size}")]
        procs.append(subprocess.Popen(cmd, env=env))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a rank of the W={world_size} run failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def summarise(args, world_size: int, raw: dict, single: dict | None) -> list[dict]:
    """``single``: the W=1 runs' host bytes by mode (the store one process of that mode holds)."""
    tokens = world_size * args.batch * args.seq
    ddp_s = median(raw["ddp_step_s"][args.warmup:])
    rows = []
    for mode in MODES:
        run = raw[mode]
        step_s = median(run["step_s"][args.warmup:])
        opt_bytes = sum(run["host_bytes_by_role"][r] for r in ("master", "exp_avg", "exp_avg_sq"))
        if world_size == 1:
            formula_reduced = formula_gathered = 0
        elif run["sharded"]:
            formula_reduced = GRAD_BYTES_PER_PARAM * run["padded_params"]
            formula_gathered = run["compute_itemsize"] * run["gathered_elements_per_step"]
        else:
            formula_reduced, formula_gathered = GRAD_BYTES_PER_PARAM * run["params"], 0
        rows.append({"world_size": world_size, "mode": mode, "horizon_step_s": step_s, "ddp_step_s": ddp_s,
                     "horizon_tokens_per_s": tokens / step_s, "ddp_tokens_per_s": tokens / ddp_s,
                     "checkpoint_bytes_by_rank": run["checkpoint_bytes_by_rank"],
                     "formula_checkpoint_bytes_by_rank": [12 * run["padded_params"] // world_size] * world_size
                     if run["sharded"] else [12 * run["params"]] + [0] * (world_size - 1),
                     "vs_ddp": ddp_s / step_s, "params": run["params"],
                     "reduced_bytes_per_update": run["bytes_reduced"] / run["updates"],
                     "gathered_bytes_per_update": run["bytes_gathered"] / run["updates"],
                     "formula_bytes_per_update": formula_reduced, "formula_gathered_bytes_per_update": formula_gathered,
                     "host_bytes_per_rank": run["host_bytes"], "optimizer_state_bytes_per_rank": opt_bytes,
                     "optimizer_state_vs_total_over_w": None if single is None
                     else opt_bytes / (single[mode]["optimizer_state"] / world_size),
                     "host_bytes_vs_total_over_w": None if single is None
                     else run["host_bytes"] / (single[mode]["host"] / world_size)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        return worker(args)
    rows, single = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for w in sorted(args.world_sizes):
            raw = launch(args, w, Path(tmp) / f"w{w}.json")
            if w == 1:  # one process of each mode is the total the W ranks share
                single = {mode: {"host": raw[mode]["host_bytes"], "optimizer_state": sum(
                    raw[mode]["host_bytes_by_role"][r] for r in ("master", "exp_avg", "exp_avg_sq"))} for mode in MODES}
            rows += summarise(args, w, raw, single)
    print(f"{'W':>2} {'mode':>12} {'horizon s/step':>14} {'DDP s/step':>10} {'DDP/horizon':>11} {'reduced B/upd':>13} "
          f"{'formula':>11} {'gathered B/upd':>14} {'formula':>11} {'host B/rank':>12} {'m+v+master B':>13} "
          f"{'vs total/W':>10} {'host vs total/W':>15}")
    for r in rows:
        vs, host_vs = r["optimizer_state_vs_total_over_w"], r["host_bytes_vs_total_over_w"]
        print(f"{r['world_size']:>2} {r['mode']:>12} {r['horizon_step_s']:>14.4f} {r['ddp_step_s']:>10.4f} "
              f"{r['vs_ddp']:>11.3f} {r['reduced_bytes_per_update']:>13,.0f} {r['formula_bytes_per_update']:>11,} "
              f"{r['gathered_bytes_per_update']:>14,.0f} {r['formula_gathered_bytes_per_update']:>11,} "
              f"{r['host_bytes_per_rank']:>12,} {r['optimizer_state_bytes_per_rank']:>13,} "
              f"{'' if vs is None else f'{vs:.4f}':>10} {'' if host_vs is None else f'{host_vs:.4f}':>15}")
    key = "{mode}_w{world_size}".format
    results = {f"horizon_{key(**r)}": r["horizon_tokens_per_s"] for r in rows}
    results.update({f"ddp_w{r['world_size']}": r["ddp_tokens_per_s"] for r in rows})
    ratios = {f"vs_ddp_{key(**r)}": r["vs_ddp"] for r in rows}
    ratios.update({f"reduced_bytes_vs_formula_{key(**r)}": r["reduced_bytes_per_update"] / r["formula_bytes_per_update"]
                   for r in rows if r["formula_bytes_per_update"]})
    for r in rows:
        print(f"W={r['world_size']} {r['mode']:>12}: checkpoint bytes by rank {r['checkpoint_bytes_by_rank']} "
              f"(formula, data only: {r['formula_checkpoint_bytes_by_rank']})")
    ratios.update({f"checkpoint_bytes_max_rank_vs_formula_{key(**r)}":
                   max(r["checkpoint_bytes_by_rank"]) / max(r["formula_checkpoint_bytes_by_rank"]) for r in rows})
    ratios.update({f"gathered_bytes_vs_formula_{key(**r)}":
                   r["gathered_bytes_per_update"] / r["formula_gathered_bytes_per_update"]
                   for r in rows if r["formula_gathered_bytes_per_update"]})
    ratios.update({f"optimizer_state_vs_total_over_w_{key(**r)}": r["optimizer_state_vs_total_over_w"]
                   for r in rows if r["optimizer_state_vs_total_over_w"] is not None})
    ratios.update({f"host_bytes_vs_total_over_w_{key(**r)}": r["host_bytes_vs_total_over_w"]
                   for r in rows if r["host_bytes_vs_total_over_w"] is not None})
    record = result_record("distributed", unit="tokens/s (global)", higher_is_better=True, results=results,
                           ratios=ratios, rows=rows,
                           config={k: v for k, v in vars(args).items() if k != "worker_out"} | {"model": "small"})
    print("wrote", write_json(RESULTS_DIR / "distributed.json", record))


if __name__ == "__main__":
    main()
