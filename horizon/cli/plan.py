"""``horizon plan``: choose the activation plan for a device budget from a saved profile.

Why offline: solving needs only the measured costs (``horizon profile``), not the machine, so a
plan can be chosen, read and reviewed before a run, for as many budgets as you like. Prints per
block the fractions of its rows kept, swapped and recomputed, the device bytes it holds until its backward and the predicted seconds of its
positions in the step, the units kept resident on the device with the memory left over, then the
predicted step time and peak against all-RECOMPUTE and all-KEEP; ``--out`` saves a plan JSON that
``TrainConfig(plan="plan.json")`` executes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from horizon.cli.estimate import parse_bytes
from horizon.cli.profile import load_profile
from horizon.engine.plan import ActivationPolicy as P
from horizon.planner import Profile, simulate, solve_greedy, solve_mip
from horizon.planner.choice import Choice, host_bytes_of, kept_bytes
from horizon.planner.apply import save_plan, to_plan
from horizon.planner.residency import add_resident
from horizon.planner.schedule import value
from horizon.planner.simulate import chooser, intervals
from horizon.store import format_bytes

__all__ = ["add_arguments", "check_arguments", "run", "unit_seconds"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile JSON written by horizon profile (path)")
    parser.add_argument("--budget", required=True, type=parse_bytes,
                        help="device bytes the engine may hold (bytes; 8GiB, 80GB, 1073741824, ...)")
    parser.add_argument("--solver", default="mip", choices=["mip", "greedy"], help="MIP (HiGHS or CBC) or greedy")
    parser.add_argument("--slots", default="2,3", help="slot counts to consider (comma-separated counts, each >= 2)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="MIP time limit per slot count (seconds)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-batches per update the run will use (count; default: the profile's); "
                             "resident units are then loaded once per update")
    parser.add_argument("--out", help="plan JSON to write, for TrainConfig(plan=...) (path)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.slot_options = tuple(int(s) for s in args.slots.split(","))
    except ValueError:
        parser.error(f"--slots must be comma-separated integers, got {args.slots!r}")
    if not args.slot_options or min(args.slot_options) < 2:
        parser.error(f"--slots options must each be at least 2 (double buffering), got {args.slots!r}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if not args.time_limit > 0:
        parser.error(f"--time-limit must be positive seconds, got {args.time_limit}")
    if args.grad_accum is not None and args.grad_accum < 1:
        parser.error(f"--grad-accum must be at least 1, got {args.grad_accum}")


def unit_seconds(profile: Profile, policies: dict[int, P | Choice], num_slots: int,
                 resident: tuple[int, ...] = ()) -> dict[int, float]:
    """Per unit, the model's seconds of the positions it computes in (forward and backward)."""
    n = len(profile.units)
    order = list(range(n)) + list(range(n - 2, -1, -1))
    choose = chooser(policies)
    bw, out = profile.link_bytes_per_s, {u: 0.0 for u in range(n)}
    for unit, iv in zip(order, intervals(profile, num_slots, resident)[1:]):  # [0] is the prologue
        h2d, d2h = value(iv.h2d, choose) / bw, value(iv.d2h, choose) / bw
        link = max(h2d, d2h) if profile.duplex else h2d + d2h
        out[unit] += max(value(iv.compute, choose), link)
    return out


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    if args.grad_accum is not None:  # accumulation updates after the window (the deferred schedule)
        schedule = "deferred" if args.grad_accum > 1 and profile.update_schedule == "eager" else profile.update_schedule
        profile = dataclasses.replace(profile, accumulation=args.grad_accum, update_schedule=schedule)
    solve = solve_mip if args.solver == "mip" else solve_greedy
    solution = add_resident(profile, solve(profile, args.budget, num_slots=args.slot_options,
                                           time_limit_s=args.time_limit), args.budget)
    baselines = {}
    for name, policy in (("recompute", P.RECOMPUTE), ("keep", P.KEEP)):
        policies = {u: policy for u in profile.blocks}
        sim = simulate(profile, policies, 2)
        baselines[name] = {"simulated_step_s": sim.step_s, "peak_bytes": sim.peak_bytes,
                           "fits": sim.peak_bytes <= args.budget}
    choices = solution.choices
    chosen = simulate(profile, choices, solution.num_slots, solution.resident)
    seconds = unit_seconds(profile, choices, solution.num_slots, solution.resident)
    report = {"budget_bytes": args.budget, "solver": args.solver, "num_slots": solution.num_slots,
              "accumulation": profile.accumulation,
              "resident": [profile.units[u].name for u in solution.resident],
              "optimal": solution.optimal, "solve_s": solution.solve_s,
              "model_step_s": solution.step_s, "simulated_step_s": chosen.step_s, "peak_bytes": solution.peak_bytes,
              "units": [{"unit": profile.units[u].name, "keep": choices[u].keep, "swap": choices[u].swap,
                         "recompute": choices[u].recompute, "input_on_device": choices[u].input_on_device,
                         "device_bytes": kept_bytes(profile, u, choices[u]),
                         "host_bytes": host_bytes_of(profile, u, choices[u]),
                         "predicted_s": seconds[u]} for u in profile.blocks],
              "baselines": baselines}
    if args.out:
        save_plan(args.out, to_plan(profile, solution), profile=profile, budget_bytes=args.budget, solution=solution)
        report["out"] = args.out
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _print_table(r: dict) -> None:
    print(f"budget {format_bytes(r['budget_bytes'])}; {r['solver']} plan, {r['num_slots']} slots "
          f"({'optimal' if r['optimal'] or r['solver'] == 'greedy' else 'time limit reached'}, "
          f"{r['solve_s']:.2f} s to solve)")
    row = "  {:<16} {:>6} {:>6} {:>9} {:>12} {:>12} {:>12}"
    print("  fractions of the block's rows kept, swapped and recomputed (d: their input waits on the device);")
    print("  device bytes held until its backward")
    print(row.format("unit", "keep", "swap", "recompute", "device", "host", "predicted"))
    for u in r["units"]:
        recompute = f"{u['recompute']:g}" + (" d" if u["input_on_device"] else "")
        print(row.format(u["unit"], f"{u['keep']:g}", f"{u['swap']:g}", recompute,
                         format_bytes(u["device_bytes"]), format_bytes(u["host_bytes"]),
                         f"{u['predicted_s'] * 1e3:.1f} ms"))
    if r["resident"]:
        print(f"  resident on the device (loaded once a step): {', '.join(r['resident'])}")
    print(f"predicted step {r['simulated_step_s']:.4f} s, peak {format_bytes(r['peak_bytes'])}")
    for name, b in r["baselines"].items():
        ratio = r["simulated_step_s"] / b["simulated_step_s"]
        print(f"  all-{name.upper():<9} {b['simulated_step_s']:.4f} s ({ratio:.2f}x), peak "
              f"{format_bytes(b['peak_bytes'])}{'' if b['fits'] else ' (over budget)'}")
    if "out" in r:
        print(f"wrote {r['out']}: TrainConfig(plan={r['out']!r})")
