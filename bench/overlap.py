"""Is the CPU optimizer hidden under compute? Step time with AdamW on vs a no-op optimizer.

What it measures: a chain of blocks whose "compute" is a stand-in that takes a known time per
unit (a sleep, so the measurement does not depend on how fast this CPU multiplies), with real
parameters (a flat weight of --block-params elements per block, so the update, the gradient
copy and the weight copy move real bytes), on the CPU engine with the transfer thread throttled
to a PCIe-like bandwidth. The stand-in compute per unit is set to --compute-ratio × the measured
time of one unit's AdamW update as that schedule runs it: with its thread count, and round-robin
over the blocks' buffers so the state comes from DRAM as in a step. For each schedule (eager: updates start as gradients land;
deferred: clipping, updates run in forward order under the next forward) the bench alternates
rounds of the real optimizer and a no-op one and reports the median seconds per step in steady
state (``run_round``; the drain after a round apart) and their ratio, ``exposed_slowdown`` (goal
≤ 1.05 when the compute per unit is at least the update time).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import horizon
import horizon.optim.updater as updater_module
from horizon.optim.adamw import optimizer_threads, overlap_threads
from _common import CpuMeter, median, result_record, write_json


class _StandIn(torch.autograd.Function):
    """Takes ``compute_s`` in forward and in backward; the weight's gradient is a fixed zero buffer,
    so the stand-in itself moves no memory (a real device computes off the host's memory bus)."""

    @staticmethod
    def forward(ctx, x, weight, compute_s, zero_grad):
        ctx.compute_s, ctx.zero_grad = compute_s, zero_grad
        time.sleep(compute_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad_out):
        time.sleep(ctx.compute_s)
        return grad_out, ctx.zero_grad, None, None


class StandInBlock(nn.Module):
    """A block with ``numel`` real parameters whose forward (and backward) takes ``compute_s`` seconds."""

    def __init__(self, dim: int, numel: int, compute_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(numel) * 0.02)
        self.compute_s = compute_s
        self._zero_grad = torch.zeros(numel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StandIn.apply(x, self.weight, self.compute_s, self._zero_grad)


class Chain(nn.Module):
    def __init__(self, *, vocab: int, dim: int, layers: int, numel: int, compute_s: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(StandInBlock(dim, numel, compute_s) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


def update_time_s(numel: int, *, units: int, num_threads: int, rounds: int = 3) -> float:
    """Median seconds of one unit's AdamW update as a step meets it: the kernel the updater runs, with
    ``num_threads``, round-robin over ``units`` units' buffers, so each update reads its state from DRAM
    as in a step (one unit's 16 B/param would stay in this machine's L3 if timed over and over)."""
    from horizon.optim.adamw import AdamW, adamw_unit_step
    from horizon.store.host_store import UnitBuffers
    from horizon.store.layout import ParamSlot, UnitLayout

    layout = UnitLayout(name="u", own=(ParamSlot(local_name="w", offset=0, shape=torch.Size([numel])),), borrowed=())
    all_buffers = []
    for _ in range(units):
        master = torch.randn(numel)
        all_buffers.append(UnitBuffers(layout=layout, master=master, exp_avg=torch.zeros(numel),
                                       exp_avg_sq=torch.zeros(numel), grad=torch.randn(numel), compute=master))
    step, times = torch.zeros(()), []
    for _ in range(rounds):
        step += 1
        for buffers in all_buffers:
            start = time.perf_counter()
            adamw_unit_step(buffers, step, AdamW(), lr=1e-3, grad=buffers.grad, grad_scale=None,
                            decay_runs=[(0, numel, 0.01)], num_threads=num_threads)
            times.append(time.perf_counter() - start)
    return median(times[units:])  # the first round is a warm-up


def _noop_step(*args, **kwargs) -> None:
    return None


def run_round(trainer: horizon.Trainer, batch: dict, steps: int, *, noop: bool) -> tuple[float, float]:
    """(seconds per step in steady state, seconds of the drain after the round).

    One untimed step first, so the first timed step's forward waits for a previous step's updates as
    every step of a run does; then ``steps`` timed steps, from the start of the first to the return
    of the last: each timed interval holds one update sweep per step. The last step's updates, which
    a run meets once at its very end (no forward follows them), are waited for after the clock
    stops and returned apart (docs/optim.md: counted per step they were a third of the deferred
    schedule's exposed time at 3 steps per round)."""
    real = updater_module.adamw_unit_step
    if noop:
        updater_module.adamw_unit_step = _noop_step
    try:
        trainer.step(batch)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step(batch)
        end = time.perf_counter()
        trainer.updater.wait_all()
        return (end - start) / steps, time.perf_counter() - end
    finally:
        updater_module.adamw_unit_step = real


def trace(trainers: dict, batch: dict, steps: int, path: str) -> dict:
    """One traced round per configuration (not among the timed ones): milliseconds per step each
    thread spent in each kind of work (bench/_timeline.py); every span goes to ``path``."""
    from _timeline import Timeline

    busy, spans = {}, {}
    for name, trainer in trainers.items():
        for mode in ("adamw", "noop"):
            timeline = Timeline()
            with timeline.attached(_StandIn, horizon.Trainer):
                run_round(trainer, batch, steps, noop=mode == "noop")
            busy[f"{name}_{mode}"] = timeline.summary(steps + 1)  # the untimed first step and the drain too
            spans[f"{name}_{mode}"] = timeline.rows()
    write_json(path, spans)
    for key, value in busy.items():
        print(f"{key:16s} " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
    return busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="blocks (count)")
    p.add_argument("--block-params", type=int, default=4_000_000, help="parameters per block (count)")
    p.add_argument("--compute-ratio", type=float, default=1.5, help="stand-in compute per unit / update time")
    p.add_argument("--link-gb-s", type=float, default=16.0, help="throttle of the transfer thread (GB/s)")
    p.add_argument("--duplex", action="store_true",
                   help="copies to and from the device at once, each direction at --link-gb-s (a GPU's two copy engines)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration (count)")
    p.add_argument("--steps", type=int, default=3, help="steps per round (count)")
    p.add_argument("--out", default="bench/results/overlap.json")
    p.add_argument("--timeline", default=None,
                   help="also trace one more round per configuration and write its spans here (JSON)")
    args = p.parse_args()

    # Each schedule's stand-in compute is compute_ratio x the update time its own updates take: eager
    # updates leave a core to the compute (overlap_threads), deferred ones use every core.
    schedules = {"eager": dict(on_nonfinite="ignore"), "deferred": dict(grad_clip_norm=1.0)}
    threads = {"eager": overlap_threads(), "deferred": optimizer_threads()}
    update_s = {name: update_time_s(args.block_params, units=args.layers, num_threads=threads[name])
                for name in schedules}
    compute_s = {name: args.compute_ratio * update_s[name] for name in schedules}
    batch = {"input_ids": torch.randint(0, 256, (1, 16)), "labels": torch.randint(0, 256, (1, 16))}
    trainers = {}
    for name, kw in schedules.items():
        torch.manual_seed(0)
        model = Chain(vocab=256, dim=64, layers=args.layers, numel=args.block_params, compute_s=compute_s[name])
        trainers[name] = horizon.Trainer(model, horizon.TrainConfig(
            plan="recompute", cpu_link_bytes_per_s=args.link_gb_s * 1e9, cpu_link_duplex=args.duplex, **kw))
    samples = {f"{name}_{mode}": [] for name in schedules for mode in ("adamw", "noop")}
    drains = {key: [] for key in samples}
    meter = CpuMeter().start()
    for name, trainer in trainers.items():  # warm-up, not recorded
        run_round(trainer, batch, 1, noop=False)
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            for mode in ("adamw", "noop"):
                step_s, drain_s = run_round(trainer, batch, args.steps, noop=mode == "noop")
                samples[f"{name}_{mode}"].append(step_s)
                drains[f"{name}_{mode}"].append(drain_s)
    noise = meter.stop()
    busy_ms = trace(trainers, batch, args.steps, args.timeline) if args.timeline else None
    for trainer in trainers.values():
        trainer.close()

    results = {key: median(v) for key, v in samples.items()}
    slowdowns = {name: results[f"{name}_adamw"] / results[f"{name}_noop"] for name in schedules}
    drain_ms = {key: median(v) * 1e3 for key, v in drains.items()}
    for key, value in results.items():
        print(f"{key:16s} {value * 1e3:8.1f} ms/step, drain after a round {drain_ms[key]:5.1f} ms")
    for name in schedules:
        print(f"{name}: update per unit {update_s[name] * 1e3:.1f} ms ({threads[name]} threads), "
              f"stand-in compute per unit {compute_s[name] * 1e3:.1f} ms")
    print("exposed slowdown: " + ", ".join(f"{k} {v:.3f}" for k, v in slowdowns.items()))
    record = result_record(
        "overlap", unit="s/step", higher_is_better=False, results={**results, "limit": None},
        ratios={"exposed_slowdown": max(slowdowns.values()), **{f"exposed_slowdown_{k}": v for k, v in slowdowns.items()}},
        goals={"exposed_slowdown": 1.05}, samples=samples, noise=noise, busy_ms_per_step=busy_ms,
        drain_ms_after_round=drain_ms,
        config={**vars(args), "update_s": update_s, "update_threads": threads,
                "compute_s_per_unit": compute_s})
    print(f"wrote {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
