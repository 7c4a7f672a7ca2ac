"""``horizon profile``: measure a model's per-unit costs on this machine and save them as JSON.

Why a separate step: a plan is chosen from measured costs (forward, recompute and backward
seconds per block, activation bytes per policy, link bandwidth). Measuring takes real compute on
the machine that will train; solving takes none. Profile once, then plan for as many budgets as
you like (``horizon plan``). Each round measures the units once and runs one real all-RECOMPUTE
step; the medians over the rounds are saved, with the compute scale that makes the simulator
reproduce the measured steps (``horizon.planner.calibrate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

import horizon
from horizon.cli.models import resolve_model
from horizon.planner.calibrate import calibrate
from horizon.planner.apply import read_record
from horizon.planner.measure import measure_profile, median_profile
from horizon.planner.profile import Profile

__all__ = ["add_arguments", "check_arguments", "run", "load_profile", "FORMAT"]

FORMAT = "horizon-profile/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a decoder preset (tiny, small, 125m, 1b, ...) or the path of a Hugging Face config.json")
    parser.add_argument("--num-layers", type=int, help="blocks to build (count; default: the model's own)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (tokens)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (count)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where units compute")
    parser.add_argument("--cpu-link-gbps", type=float,
                        help="device=cpu only: throttle the transfer thread to this many GB/s (1e9 bytes/s)")
    parser.add_argument("--cpu-link-duplex", action="store_true",
                        help="device=cpu only: copies to and from the device at once, each direction at the "
                             "link's GB/s (a GPU's two copy engines)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds, each one unit measurement and one real step (count; after 2 warm-up rounds)")
    parser.add_argument("--out", required=True, help="profile JSON to write (path)")
    parser.add_argument("--json", action="store_true",
                        help="print the profile record (what --out holds, plus its path) as one JSON document")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("seq_len", "batch_size", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_layers is not None and args.num_layers <= 0:
        parser.error(f"--num-layers must be positive, got {args.num_layers}")
    if args.cpu_link_gbps is not None and (args.device != "cpu" or not args.cpu_link_gbps > 0):
        parser.error("--cpu-link-gbps needs --device cpu and a positive number of GB/s")
    if args.cpu_link_duplex and args.device != "cpu":
        parser.error("--cpu-link-duplex needs --device cpu (CUDA copies are duplex already)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")


_WARMUP_ROUNDS = 2


def run(args: argparse.Namespace) -> int:
    spec = resolve_model(args.model)
    model = spec.build(args.num_layers or spec.num_layers)
    link = args.cpu_link_gbps * 1e9 if args.cpu_link_gbps else None
    config = horizon.TrainConfig(device=args.device, plan="recompute", cpu_link_bytes_per_s=link,
                                 cpu_link_duplex=args.cpu_link_duplex)
    g = torch.Generator().manual_seed(0)
    profiles, steps_s = [], []
    with horizon.Trainer(model, config) as trainer:
        pinned = trainer.store.pinned
        for i in range(_WARMUP_ROUNDS + args.rounds):
            trainer.updater.wait_all()  # the units' weights stay put while they are timed
            profile = measure_profile(trainer.engine.specs, trainer.store, device=trainer.device,
                                      transfer=trainer.transfer, batch_size=args.batch_size, seq_len=args.seq_len,
                                      reps=3, warmup=1)
            ids = torch.randint(0, trainer.vocab_size, (args.batch_size, args.seq_len), generator=g)
            seconds = trainer.step({"input_ids": ids, "labels": ids}).seconds
            if i >= _WARMUP_ROUNDS:
                profiles.append(profile)
                steps_s.append(seconds)
    profile = median_profile(profiles)
    recompute = {u: horizon.ActivationPolicy.RECOMPUTE for u in profile.blocks}
    measured_s = statistics.median(steps_s)
    # Each step was timed with no update pending (wait_all before each round): calibrated without the
    # optimizer, then the profile meets the optimizer as a run of this configuration does.
    profile = dataclasses.replace(calibrate(profile, [(recompute, 2, measured_s)]),
                                  update_schedule=config.update_schedule, accumulation=config.grad_accum_steps)
    record = {"format": FORMAT, "model": spec.description, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "device": args.device, "cpu_link_bytes_per_s": link,
              "cpu_link_duplex": args.cpu_link_duplex, "pinned": pinned, "torch": torch.__version__,
              "calibration": {"plan": "recompute", "num_slots": 2, "measured_step_s": measured_s},
              "profile": profile.to_dict()}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    if args.json:
        print(json.dumps({**record, "out": args.out}, indent=2))
        return 0
    print(f"{spec.description}: {len(profile.blocks)} blocks at {args.batch_size} x {args.seq_len} tokens on "
          f"{args.device}; all-RECOMPUTE step {measured_s:.4f} s measured, compute scale "
          f"{profile.compute_scale:.2f}; link {profile.link_bytes_per_s / 1e9:.2f} GB/s from the "
          f"{'pinned' if pinned else 'pageable'} store, {profile.pageable_link_bytes_per_s / 1e9:.2f} GB/s "
          "from pageable memory")
    print(f"wrote {args.out}")
    return 0


def load_profile(path: str) -> Profile:
    """The ``Profile`` in a file written by ``horizon profile``."""
    record = read_record(path, FORMAT, "profile", " (write one with horizon profile)")
    try:
        return Profile.from_dict(record["profile"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the profile inside is malformed ({e}); measure it again with horizon profile") from e
