"""Resident units where the link sets the step: the planner's plan with and without them, one trainer.

What it measures: seconds per training step (median of the timed steps, warm-up excluded) of one
Decoder on CPU with a throttled link and few tokens per step (batch 1 x 128 by default), so that
streaming the weights, not the compute, is what a step waits for; the device budget is all-KEEP's peak
plus ``--spare-blocks`` blocks' weights. Two plans take turns step by step on one trainer
(bench/planner.py's ``PlanSwitch``):
  * streamed   the MIP's plan at that budget, every unit streamed through the slots
  * resident   the same plan with the units ``horizon.planner.residency.add_resident`` makes resident
               (what plan="auto" runs): the budget left over spent on units copied once a step, not twice
Both print beside the simulator's prediction. The link is one copy queue by default; ``--duplex``
gives each direction its own, where residency pays only if a backward position brings in more than
the gradient it sends out (docs/planner.md, "Resident units"). ``--grad-accum K``: K micro-batches per
update, the plans taking turns by update; a resident unit is then loaded once per update.

    python bench/residency.py [--steps 11 --warmup 3 --link-gbps 0.5 --duplex ...]
Writes bench/results/residency.json (see --out).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

import horizon
from horizon.planner import simulate, solve_mip
from horizon.planner.apply import to_plan
from horizon.planner.measure import measure_profile, median_profile
from horizon.planner.residency import add_resident

from _common import (RESULTS_DIR, CpuMeter, add_decoder_args, median, planner_decoder, result_record,
                     write_json)
from planner import PlanSwitch

P = horizon.ActivationPolicy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=3)
    add_decoder_args(p, batch=1, seq=128)
    p.add_argument("--duplex", action="store_true", help="a copy queue per direction (a GPU's two copy engines)")
    p.add_argument("--spare-blocks", type=int, default=16, help="budget above all-KEEP's peak, in blocks' weights")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per update: the plans take turns by update, a step's time is the mean of "
                        "its micro-batches")
    p.add_argument("--out", default=str(RESULTS_DIR / "residency.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    model = planner_decoder(a)
    link = {"cpu_link_bytes_per_s": a.link_gbps * 1e9, "cpu_link_duplex": a.duplex}
    train = {**link, "grad_accum_steps": a.grad_accum}
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(**link)) as t:
        profile = median_profile([measure_profile(t.engine.specs, t.store, device=t.device, transfer=t.transfer,
                                                  batch_size=a.batch, seq_len=a.seq, reps=3, warmup=1)
                                  for _ in range(3)])
    profile = dataclasses.replace(profile, accumulation=a.grad_accum)  # resident units load once per update
    keep_peak = simulate(profile, {u: P.KEEP for u in profile.blocks}, 2).peak_bytes
    budget = keep_peak + a.spare_blocks * profile.units[1].weight_bytes
    streamed = solve_mip(profile, budget)
    resident = add_resident(profile, streamed, budget)
    solutions = {"streamed": streamed, "resident": resident}
    runs = PlanSwitch(copy.deepcopy(model), train, {n: to_plan(profile, s) for n, s in solutions.items()})
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in solutions}
    meter = CpuMeter().start()
    for i in range(a.warmup + a.steps):
        batch = {"input_ids": torch.randint(0, a.vocab, (a.batch, a.seq), generator=g),
                 "labels": torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)}
        for name in solutions:
            # StepMetrics.seconds is the update's so far: the last micro-batch's is the whole update's
            seconds = [runs.step(name, batch)[0] for _ in range(a.grad_accum)][-1] / a.grad_accum
            if i >= a.warmup:
                times[name].append(seconds)
    load = meter.stop()
    peaks = {name: runs.device_peak_bytes(name) for name in solutions}
    runs.close()
    results = {name: median(times[name]) for name in solutions}
    simulated = {n: simulate(profile, s.choices, s.num_slots, s.resident).step_s for n, s in solutions.items()}
    ratios = {"resident_vs_streamed": results["resident"] / results["streamed"],
              "simulated_resident_vs_streamed": simulated["resident"] / simulated["streamed"]}
    names = [profile.units[u].name for u in resident.resident]
    for name in solutions:
        print(f"{name:9s} measured {results[name]:.4f} s/step  simulated {simulated[name]:.4f} s  "
              f"peak {peaks[name]:,} B (budget {budget:,})")
    print(f"resident units ({len(names)}): {', '.join(names) or 'none'}")
    print("ratios " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"other processes used {load['other_cpu_s']} CPU-s during {load['wall_s']} s")
    record = result_record("residency", unit="s/step", higher_is_better=False, results=results, ratios=ratios,
                           simulated_s=simulated, device_peak_bytes=peaks, samples_s=times, resident=names,
                           load=load, config={**vars(a), "budget_bytes": budget, "num_slots": streamed.num_slots,
                                              "plan": {str(u): str(c) for u, c in streamed.choices.items()}})
    print("wrote", write_json(a.out, record))


if __name__ == "__main__":
    main()
