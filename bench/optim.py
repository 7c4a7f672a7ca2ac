"""CPU AdamW throughput on one flat buffer of >= 100M fp32 parameters: horizon's one-pass kernel vs baselines.

Systems (each one update of the same N parameters, fp32 gradient, on `--threads` threads):
  horizon            horizon.optim.native.fused_adamw_: master, m, v AND the bf16 compute copy in one pass
  horizon_reference  horizon.optim.native.reference_adamw_: torch._fused_adamw_ + compute_out.copy_(master)
  torch_fused        torch.optim.AdamW(fused=True).step() on one flat parameter (no bf16 copy)
  torch_foreach      torch.optim.AdamW(foreach=True).step() on one flat parameter (no bf16 copy)
  deepspeed_cpu_adam deepspeed.ops.adam.DeepSpeedCPUAdam.step() (no bf16 copy), when deepspeed imports and its
                     op builds (JIT, ~100 s the first time; cached under TORCH_EXTENSIONS_DIR), else null + reason
All systems update the same buffers (same pages, same NUMA placement); values drift harmlessly. Each timed call
follows --settle seconds of idle, so no system pays for the previous one's spinning OpenMP workers.

The limit: bytes one horizon update must move (read master, grad, m, v: 16 B; write master, m, v: 12 B; write the
bf16 copy: 2 B; 30 B/param) divided by the machine's copy bandwidth, measured in the same run as a ~1 GB torch
`copy_` on the same thread count, counting read + write bytes. Every system and the copy alternate round-robin
(the starting system rotates each round), warm-up rounds are excluded, and medians are reported.

Extra diagnostics under "details": horizon without the bf16 copy (28 B/param, byte-for-byte torch_fused's work)
and horizon with a bf16 gradient (what the engine hands it: 28 B/param), each system's samples and the bytes per
second it moved, and an in-place read-modify-write bandwidth (`x.mul_(1.0)`, read + write counted): copy_'s
destination costs a read-for-ownership that the optimizer's in-place master/m/v never pay, so a copy-based limit
understates what an update can reach. "noise" is the CPU time other processes took while the bench ran (from /proc/stat).

usage: python bench/optim.py [--numel 100000000] [--threads 2] [--rounds 9] [--warmup 2] [--settle 0.05]
                             [--no-deepspeed]
Run it under ../shared/tools/quiet-run on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# DeepSpeed's op runs OpenMP regions on the calling thread: give its pool the same size as torch's.
_THREADS_ARG = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
if _THREADS_ARG is None and "--threads" in sys.argv[:-1]:
    _THREADS_ARG = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("OMP_NUM_THREADS", _THREADS_ARG or "2")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions_horizon_bench")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from _common import RESULTS_DIR, CpuMeter, median, result_record, write_json  # noqa: E402
from horizon.optim import native as hn  # noqa: E402

HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
BYTES_PER_PARAM = {  # memory traffic one update must move
    "horizon": 4 * 4 + 3 * 4 + 2,            # read master, grad, m, v; write master, m, v, bf16 copy
    "horizon_reference": 4 * 4 + 3 * 4 + 2,  # the same work (torch moves 4 + 2 more: it re-reads the master)
    "torch_fused": 4 * 4 + 3 * 4,
    "torch_foreach": 4 * 4 + 3 * 4,
    "deepspeed_cpu_adam": 4 * 4 + 3 * 4,
    "horizon_no_copy": 4 * 4 + 3 * 4,
    "horizon_bf16_grad": 2 + 3 * 4 + 3 * 4 + 2,
}
BASELINES = ("torch_fused", "torch_foreach", "deepspeed_cpu_adam")


def _preset_state(opt: torch.optim.Optimizer, param: torch.Tensor, exp_avg, exp_avg_sq, step) -> None:
    """Make an optimizer use the shared m and v buffers instead of allocating its own on the first step."""
    opt.state[param] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def build_systems(n: int, threads: int, want_deepspeed: bool):
    master = torch.randn(n)
    grad = torch.randn(n).mul_(1e-3)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    grad_bf16 = grad.to(torch.bfloat16)
    param = torch.nn.Parameter(master, requires_grad=True)  # shares master's storage
    assert param.data_ptr() == master.data_ptr()
    param.grad = grad
    steps = {"horizon": 0}
    skipped: dict[str, str] = {}

    def horizon_step(compute_out=out, g=grad):
        def step():
            steps["horizon"] += 1
            hn.fused_adamw_(master, g, exp_avg, exp_avg_sq, compute_out, step=steps["horizon"],
                            num_threads=threads, **HYPER)
        return step

    def reference_step():
        steps["horizon"] += 1
        hn.reference_adamw_(master, grad, exp_avg, exp_avg_sq, out, step=steps["horizon"], num_threads=threads,
                            **HYPER)

    hyper_torch = dict(lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                       weight_decay=HYPER["weight_decay"])
    fused = torch.optim.AdamW([param], fused=True, **hyper_torch)
    _preset_state(fused, param, exp_avg, exp_avg_sq, torch.tensor(0.0))
    foreach = torch.optim.AdamW([param], foreach=True, **hyper_torch)
    _preset_state(foreach, param, exp_avg, exp_avg_sq, torch.tensor(0.0))

    systems = {}
    if hn.native_available():
        systems["horizon"] = horizon_step()
    else:
        skipped["horizon"] = "horizon._native not built (pip install -e .); horizon = reference path"
    systems["horizon_reference"] = reference_step
    systems["torch_fused"] = fused.step
    systems["torch_foreach"] = foreach.step
    if want_deepspeed:
        try:
            ds_step = _deepspeed_step(param, exp_avg, exp_avg_sq, hyper_torch)
        except Exception as exc:  # noqa: BLE001 - any import or op-build failure is reported, not fatal
            skipped["deepspeed_cpu_adam"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        else:
            systems["deepspeed_cpu_adam"] = ds_step
    else:
        skipped["deepspeed_cpu_adam"] = "disabled with --no-deepspeed"
    if hn.native_available():
        systems["horizon_no_copy"] = horizon_step(compute_out=None)
        systems["horizon_bf16_grad"] = horizon_step(g=grad_bf16)
    return systems, skipped


def _deepspeed_step(param, exp_avg, exp_avg_sq, hyper_torch):
    t0 = time.perf_counter()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = DeepSpeedCPUAdam([param], adamw_mode=True, fp32_optimizer_states=True, **hyper_torch)
    probe = torch.nn.Parameter(torch.zeros(64))  # builds (or loads) the op now, not inside a timed call
    probe.grad = torch.ones(64)
    DeepSpeedCPUAdam([probe], adamw_mode=True, **hyper_torch).step()
    print(f"deepspeed cpu_adam ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    _preset_state(opt, param, exp_avg, exp_avg_sq, 0)
    return opt.step


def copy_system(copy_bytes: int):
    src = torch.randn(copy_bytes // 4)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * 4  # bytes read + written


def rmw_system(nbytes: int):
    """In-place read-modify-write (x *= 1): horizon's master, m and v are updated in place, and a store to a
    line just read needs no read-for-ownership, which copy_'s destination does (diagnostic only)."""
    x = torch.randn(nbytes // 4)
    return (lambda: x.mul_(1.0)), 2 * x.numel() * 4


def run(systems: dict, *, rounds: int, warmup: int, settle_s: float) -> dict[str, list[float]]:
    names = list(systems)
    samples = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            time.sleep(settle_s)  # let the previous system's OpenMP workers stop spinning (see --settle)
            t0 = time.perf_counter()
            systems[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples[name].append(dt)
    return samples


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--copy-bytes", type=int, default=1 << 30)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated systems not to run (diagnostics)")
    ap.add_argument("--settle", type=float, default=0.05,
                    help="seconds of idle before each timed call: libgomp's workers (torch's and DeepSpeed's pools) "
                         "spin ~20 ms after a parallel region and would take a core from whichever system runs next")
    ap.add_argument("--out", default=str(RESULTS_DIR / "optim.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    systems, skipped = build_systems(a.numel, a.threads, not a.no_deepspeed)
    for name in filter(None, a.skip.split(",")):
        if systems.pop(name, None) is not None:
            skipped[name] = "skipped with --skip"
    copy_fn, copy_bytes_moved = copy_system(a.copy_bytes)
    systems["copy"] = copy_fn
    rmw_fn, rmw_bytes_moved = rmw_system(a.copy_bytes)
    systems["rmw"] = rmw_fn
    meter = CpuMeter().start()
    samples = run(systems, rounds=a.rounds, warmup=a.warmup, settle_s=a.settle)
    noise = meter.stop()

    copy_bw = copy_bytes_moved / median(samples.pop("copy"))
    rmw_bw = rmw_bytes_moved / median(samples.pop("rmw"))
    rate = {name: a.numel / median(ts) for name, ts in samples.items()}
    limit = copy_bw / BYTES_PER_PARAM["horizon"]
    results = {name: rate.get(name) for name in ("horizon", "horizon_reference", "torch_fused", "torch_foreach",
                                                 "deepspeed_cpu_adam")}
    if results["horizon"] is None:  # no native kernel: horizon runs its reference path
        results["horizon"] = results["horizon_reference"]
    results["limit"] = limit
    best_name = max((b for b in BASELINES if results[b] is not None), key=lambda b: results[b])
    ratios = {"vs_best_baseline": results["horizon"] / results[best_name], "vs_limit": results["horizon"] / limit,
              "best_baseline": best_name}
    details = {
        name: {"params_per_s": rate[name], "median_s": median(ts), "min_s": min(ts), "max_s": max(ts),
               "samples_s": [round(t, 5) for t in ts], "bytes_per_param": BYTES_PER_PARAM[name],
               "effective_GB_per_s": rate[name] * BYTES_PER_PARAM[name] / 1e9}
        for name, ts in samples.items()
    }
    details["copy"] = {"GB_per_s_read_plus_write": copy_bw / 1e9, "bytes": a.copy_bytes}
    details["rmw_in_place"] = {"GB_per_s_read_plus_write": rmw_bw / 1e9, "bytes": a.copy_bytes,
                               "limit_params_per_s": rmw_bw / BYTES_PER_PARAM["horizon"],
                               "horizon_vs_this_limit": results["horizon"] * BYTES_PER_PARAM["horizon"] / rmw_bw}
    config = {"numel": a.numel, "threads": a.threads, "rounds": a.rounds, "warmup_rounds": a.warmup,
              "grad_dtype": "float32", "compute_copy": "bfloat16 (horizon systems only)", **HYPER,
              "native_isa": hn.native_isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "copy_bytes": a.copy_bytes, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "settle_s": a.settle, "shared_buffers": True}
    record = result_record("optim", unit="params/s", higher_is_better=True, results=results, ratios=ratios,
                           skipped=skipped, details=details, noise=noise, config=config)
    path = write_json(a.out, record)
    for name, r in results.items():
        print(f"{name:20s} {'-' if r is None else f'{r / 1e6:8.1f} M params/s'}")
    for name in ("horizon_no_copy", "horizon_bf16_grad"):
        if name in rate:
            print(f"{name:20s} {rate[name] / 1e6:8.1f} M params/s (diagnostic)")
    print(f"in-place read-modify-write bandwidth {rmw_bw / 1e9:.2f} GB/s -> {rmw_bw / 30e6:.1f} M params/s at 30 B")
    print(f"copy bandwidth {copy_bw / 1e9:.2f} GB/s (read+write); horizon/best baseline ({best_name}) "
          f"{ratios['vs_best_baseline']:.3f}; horizon/limit {ratios['vs_limit']:.3f}")
    print(f"other processes' CPU {noise['other_cpu_s']} s over {noise['wall_s']} s wall; wrote {path}")


if __name__ == "__main__":
    main()
