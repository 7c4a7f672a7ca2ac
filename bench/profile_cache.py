"""What the profile cache saves at start: plan="auto"'s first step with the cache empty vs filled.

What it measures: seconds from building the ``horizon.Trainer`` to the end of its first step with
``TrainConfig(plan="auto")`` on the planner bench's model (bench/planner.py's defaults: dim 256, 12
blocks, batch 4 x 256, a 0.5 GB/s duplex CPU link), alternating a start with an empty cache folder
(``cold``: measure the units, store the profile, calibrate on two all-RECOMPUTE passes, solve, step)
and a start with the folder the cold start filled (``warm``: load, calibrate, solve, step). The
steps after the first are the same in both and are not timed. The ratio warm / cold is the share of
a start that remains once the profile is cached.

    python bench/profile_cache.py [--pairs 3 --layers 12 ...]
Writes bench/results/profile_cache.json (see --out).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import horizon

from _common import (RESULTS_DIR, CpuMeter, add_decoder_args, median, planner_decoder, result_record,
                     write_json)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="cold and warm starts, alternated")
    add_decoder_args(p, batch=4, seq=256)
    p.add_argument("--budget-gib", type=float, default=1.0, help="device budget (not binding by default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "profile_cache.json"))
    return p.parse_args(argv)


def first_step_s(model, a, cache_dir: str) -> float:
    """Seconds from building a plan='auto' trainer to the end of its first step."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    config = horizon.TrainConfig(plan="auto", device_memory_budget_bytes=int(a.budget_gib * 2**30),
                                 cpu_link_bytes_per_s=a.link_gbps * 1e9, cpu_link_duplex=True,
                                 profile_cache_dir=cache_dir)
    start_s = time.perf_counter()
    with horizon.Trainer(copy.deepcopy(model), config) as trainer:
        trainer.step({"input_ids": ids, "labels": ids})
        seconds = time.perf_counter() - start_s
    return seconds


def main(argv=None) -> None:
    a = parse_args(argv)
    model = planner_decoder(a)
    cold, warm = [], []
    meter = CpuMeter().start()
    for i in range(a.pairs):
        with tempfile.TemporaryDirectory() as cache_dir:
            cold.append(first_step_s(model, a, cache_dir))
            warm.append(first_step_s(model, a, cache_dir))
        print(f"pair {i}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s")
    load = meter.stop()
    results = {"cold_first_step_s": median(cold), "warm_first_step_s": median(warm),
               "samples": {"cold_s": cold, "warm_s": warm}, "load": load}
    ratios = {"warm_vs_cold": median(warm) / median(cold)}
    print(f"first step with plan='auto': cold {results['cold_first_step_s']:.2f} s, "
          f"warm {results['warm_first_step_s']:.2f} s, warm / cold {ratios['warm_vs_cold']:.3f} (medians of "
          f"{a.pairs}); other processes used {load['other_cpu_s']} CPU-s during {load['wall_s']} s")
    record = result_record("profile_cache", unit="s", higher_is_better=False, results=results, ratios=ratios,
                           config=vars(a))
    print(f"wrote {write_json(a.out, record)}")


if __name__ == "__main__":
    main()
