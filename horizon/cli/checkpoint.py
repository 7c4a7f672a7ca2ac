"""``horizon checkpoint list|verify|export DIR``: inspect, check and export checkpoints.

``list`` shows every step directory under DIR with its size and state (committed, quarantined,
in flight or left by a dead run); ``verify`` checks sizes and every tensor's CRC-32 and exits 1
if any checkpoint fails (it only reads: nothing is moved); ``export`` writes the master weights
of one checkpoint as Hugging Face-style safetensors (plus config.json when the model had one).
"""

from __future__ import annotations

import argparse
import os

import torch

from horizon.checkpoint.commit import committed_steps
from horizon.checkpoint.export import export, resolve
from horizon.checkpoint.load import verify
from horizon.checkpoint.manifest import CorruptCheckpoint, read_manifest
from horizon.store import format_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="steps under DIR with size and state")
    ls.add_argument("dir", help="checkpoint root (CheckpointConfig.dir)")
    check = actions.add_parser("verify", help="check sizes and CRC-32s; exit 1 if any checkpoint fails")
    check.add_argument("dir", help="checkpoint root, or one step directory")
    check.add_argument("--step", type=int, default=None, help="only this step (default: every committed step)")
    out = actions.add_parser("export", help="master weights as HF-style safetensors")
    out.add_argument("dir", help="checkpoint root, or one step directory")
    out.add_argument("--out", required=True, help="output directory (created)")
    out.add_argument("--step", type=int, default=None, help="step to export (default: the newest)")
    out.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the exported weights")
    out.add_argument("--max-shard-bytes", type=int, default=5 << 30,
                     help="largest file before splitting into shards with an index (bytes)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not os.path.isdir(args.dir):
        parser.error(f"{args.dir} is not a directory")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _state(name: str) -> str:
    if ".corrupt-" in name:
        return "quarantined"
    if name.startswith(".inflight."):
        return "in flight or left by a dead run"
    return "committed" if name.startswith("step-") else ""


def run_list(args) -> int:
    for name in sorted(os.listdir(args.dir)):
        path = os.path.join(args.dir, name)
        if not os.path.isdir(path) or not _state(name):
            continue
        step = ""
        if _state(name) == "committed":
            try:
                step = f"step {read_manifest(path)['step']}"
            except CorruptCheckpoint:
                step = "bad manifest"
        print(f"{name:48s} {format_bytes(_dir_bytes(path)):>10s}  {_state(name)}  {step}")
    return 0


def run_verify(args) -> int:
    if os.path.isfile(os.path.join(args.dir, "manifest.json")):
        targets = [args.dir]
    else:
        steps = [args.step] if args.step is not None else committed_steps(args.dir)
        targets = [resolve(args.dir, s) for s in steps]
    if not targets:
        print(f"{args.dir}: no committed checkpoints")
        return 1
    failed = 0
    for path in targets:
        try:
            manifest = verify(path)
            print(f"ok       {path}  step {manifest['step']}, {len(manifest['tensors'])} tensors")
        except CorruptCheckpoint as e:
            failed += 1
            print(f"CORRUPT  {path}: {e}")
    return 1 if failed else 0


def run_export(args) -> int:
    path = resolve(args.dir, args.step)
    written = export(path, args.out, dtype=_DTYPES[args.dtype], max_shard_bytes=args.max_shard_bytes)
    print(f"exported {path} to {args.out}: {', '.join(written)}")
    return 0


def run(args) -> int:
    return {"list": run_list, "verify": run_verify, "export": run_export}[args.action](args)


__all__ = ["add_arguments", "check_arguments", "run"]
