"""``horizon estimate``: what a run needs (host RAM, pinned, device peak, SSD), before renting the machine.

The model is built on the meta device, so nothing is allocated whatever its size. Host bytes come
from the host store's own sizing function, device bytes from a replay of the engine's ledger.
With budgets (``--host-ram``, ``--gpu-mem``, ``--ssd``) or ``--check`` (this machine) it also says
whether the run fits, the shortfall if not (exit code 1), and the most blocks of the same width that
would fit.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

import horizon
from horizon.cli.models import resolve_model
from horizon.estimate import MemoryEstimate, estimate_memory
from horizon.estimate.fit import MAX_LAYERS, Budget, machine_budget, most_layers, ram_needed_bytes, shortfalls
from horizon.store import format_bytes

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}


def parse_bytes(text: str) -> int:
    """``"64G"`` / ``"64GiB"`` (powers of 1024), ``"80GB"`` (powers of 1000) or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 512G, 64GiB, 80GB or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a decoder preset (tiny, small, 125m, 1b, 7b, 8b, 13b, 70b) or the path of a "
                             "Hugging Face config.json (or its directory)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (tokens)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (count)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where units compute")
    parser.add_argument("--plan", default="recompute", choices=["recompute", "keep"],
                        help="activation policy of every block")
    parser.add_argument("--slots", type=int, default=2, help="device slots for unit weights (count, >= 2)")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per update (count)")
    parser.add_argument("--host-ram", type=parse_bytes, help="RAM budget (bytes; 512G, 64GiB, 80GB, ...)")
    parser.add_argument("--gpu-mem", type=parse_bytes, help="device memory budget (bytes; e.g. 80GB)")
    parser.add_argument("--ssd", type=parse_bytes, help="SSD budget (bytes; e.g. 2T)")
    parser.add_argument("--check", action="store_true", dest="check_machine",
                        help="also compare with this machine: available RAM within the cgroup limit, "
                             "locked-memory limit, free GPU memory, free disk at --ssd-path")
    parser.add_argument("--ssd-path", default=".",
                        help="directory on the SSD: whose free disk --check reads, where the tier would live (path)")
    parser.add_argument("--ssd-units", type=_ssd_units,
                        help="put these units' optimizer state on SSD: all, auto (as few as --host-ram allows) "
                             "or indices like 0,3,5 (0 = the embedding)")
    parser.add_argument("--ssd-weights", action="store_true",
                        help="with --ssd-units: stream their compute copies and gradients from SSD too")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _ssd_units(text: str) -> str | tuple[int, ...]:
    if text in ("all", "auto"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write all, auto or unit indices like 0,3,5") from None


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.ssd_units == "auto" and args.host_ram is None:
        parser.error("--ssd-units auto places units by the RAM budget: give --host-ram too")
    if args.ssd_weights and args.ssd_units is None:
        parser.error("--ssd-weights streams the weights of the units on SSD: give --ssd-units too")
    for name in ("seq_len", "batch_size", "grad_accum_steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.slots < 2:
        parser.error(f"--slots must be at least 2 (double buffering), got {args.slots}")


def _budget(args: argparse.Namespace) -> Budget | None:
    given = {"ram_bytes": args.host_ram, "device_bytes": args.gpu_mem, "ssd_bytes": args.ssd}
    if args.check_machine:
        machine = machine_budget(args.device, args.ssd_path)
        return Budget(**{k: v if v is not None else getattr(machine, k) for k, v in given.items()},
                      lockable_bytes=machine.lockable_bytes)
    if all(v is None for v in given.values()):
        return None
    return Budget(**given)


def _report(args, spec, estimate: MemoryEstimate, budget, short, deepest) -> dict:
    return {
        "model": spec.description, "num_params": estimate.num_params, "num_layers": spec.num_layers,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "plan": estimate.plan,
        "host_bytes": estimate.host_bytes, "host_bytes_by_role": estimate.host_bytes_by_role,
        "pinned_bytes": estimate.pinned_bytes, "ram_needed_bytes": ram_needed_bytes(estimate, args.device),
        "device_peak_bytes": estimate.device_peak_bytes, "device_bytes_at_peak": estimate.device_bytes_at_peak,
        "slot_bytes": estimate.slot_bytes, "num_slots": estimate.num_slots, "ssd_bytes": estimate.ssd_bytes,
        "ssd_bytes_by_role": estimate.ssd_bytes_by_role, "ssd_units": list(estimate.ssd_units),
        "derivation": estimate.derivation(),
        "budget": None if budget is None else {k: v for k, v in vars(budget).items()},
        "fits": None if budget is None else not short, "shortfalls": short,
        "largest": None if deepest is None else {"num_layers": deepest[0], "num_params": deepest[1]},
        "warnings": _warnings(args, estimate, budget),
    }


def _print_table(r: dict, args) -> None:
    row = "  {:<26}{:>14}"
    print(f"model: {r['model']}, {r['num_params'] / 1e9:.3f} B parameters, {r['num_layers']} blocks; "
          f"batch {r['batch_size']} x {r['seq_len']} tokens")
    print(f"plan: {r['plan']}")
    print("host RAM")
    for role, n in r["host_bytes_by_role"].items():
        if n:
            print(row.format(role, format_bytes(n)))
    print(row.format("total", format_bytes(r["host_bytes"])))
    print(row.format("of which pinned", format_bytes(r["pinned_bytes"])))
    print(f"device peak (slot {format_bytes(r['slot_bytes'])} x {r['num_slots']})")
    for part, n in r["device_bytes_at_peak"].items():
        print(row.format(part, format_bytes(n)))
    print(row.format("total", format_bytes(r["device_peak_bytes"])))
    print(f"SSD {format_bytes(r['ssd_bytes'])}" + (f" (units {r['ssd_units']})" if r["ssd_units"] else ""))
    for role, n in r["ssd_bytes_by_role"].items():
        print(row.format(role, format_bytes(n)))
    if args.device == "cpu":
        print(f"RAM needed on CPU (host + device): {format_bytes(r['ram_needed_bytes'])}")
    print("derived as:")
    for what, how in r["derivation"].items():
        print(f"  {what}: {how}")
    print("  not included: the interpreter and libraries (a few hundred MiB) and, on CUDA, one unit's "
          "compute workspace and the allocator's caching")
    if r["budget"] is None:
        return
    budget = ", ".join(f"{k.removesuffix('_bytes')} {format_bytes(v)}" for k, v in r["budget"].items()
                       if v is not None)
    print(f"budget: {budget}")
    print("fits" if r["fits"] else "does not fit: " + "; ".join(r["shortfalls"]))
    largest = r["largest"]
    if largest is not None and largest["num_layers"] == 0:
        print("largest of this width that fits: none, not even one block")
    elif largest is not None:
        cap = " (the search stops there)" if largest["num_layers"] == MAX_LAYERS else ""
        print(f"largest of this width that fits: {largest['num_layers']}{cap} blocks, "
              f"{largest['num_params'] / 1e9:.3f} B parameters")
    for warning in r["warnings"]:
        print(warning)


def _warnings(args, estimate: MemoryEstimate, budget: Budget | None) -> list[str]:
    found = []
    if args.check_machine and args.device == "cuda" and not torch.cuda.is_available():
        found.append("warning: --check with --device cuda, but this machine has no CUDA device (0 B of device memory)")
    memlock = _memlock_warning(estimate, budget)
    return found + ([memlock] if memlock else [])


def _memlock_warning(estimate: MemoryEstimate, budget: Budget | None) -> str | None:
    if budget is None or budget.lockable_bytes is None or estimate.pinned_bytes <= budget.lockable_bytes:
        return None
    return (f"warning: {format_bytes(estimate.pinned_bytes)} to pin exceeds the memlock limit of "
            f"{format_bytes(budget.lockable_bytes)}: copies will use pageable memory (slower); "
            "run `ulimit -l unlimited` first")


def run(args: argparse.Namespace) -> int:
    """Print the estimate; 1 when a budget is short, else 0."""
    spec = resolve_model(args.model)
    ssd = None if args.ssd_units is None else horizon.SSDConfig(dir=args.ssd_path, units=args.ssd_units,
                                                                  weights=args.ssd_weights)
    config = horizon.TrainConfig(device=args.device, plan=horizon.Plan.uniform(args.plan, num_slots=args.slots),
                                 grad_accum_steps=args.grad_accum_steps, ssd=ssd,
                                 host_memory_budget_bytes=args.host_ram if ssd is not None else None)
    estimate = estimate_memory(spec.build(spec.num_layers), config, batch_size=args.batch_size,
                               seq_len=args.seq_len)
    budget = _budget(args)
    short = [] if budget is None else shortfalls(estimate, budget, args.device)
    deepest = None
    if budget is not None:
        num_layers, best = most_layers(spec.build, config, batch_size=args.batch_size, seq_len=args.seq_len,
                                       budget=budget)
        deepest = (num_layers, best.num_params if best is not None else 0)
    report = _report(args, spec, estimate, budget, short, deepest)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report, args)
    return 1 if short else 0

