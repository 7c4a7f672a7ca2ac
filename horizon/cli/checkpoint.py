"""``horizon checkpoint list|verify|export DIR``: inspect, check and export checkpoints.

``list`` shows every step directory under DIR with its size and state (committed, quarantined,
in flight or left by a dead run); ``verify`` checks sizes and every tensor's CRC-32 and exits 1
if any checkpoint fails (it only reads: nothing is moved); ``export`` writes the master weights
of one checkpoint as Hugging Face-style safetensors (plus config.json when the model had one).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from horizon.checkpoint.commit import committed_steps
from horizon.checkpoint.export import export, resolve
from horizon.checkpoint.load import verify
from horizon.checkpoint.manifest import CorruptCheckpoint, read_manifest
from horizon.checkpoint.recycle import POOL
from horizon.store import format_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="steps under DIR with size and state")
    ls.add_argument("dir", help="checkpoint root (CheckpointConfig.dir)")
    ls.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    check = actions.add_parser("verify", help="check sizes and CRC-32s; exit 1 if any checkpoint fails")
    check.add_argument("dir", help="checkpoint root, or one step directory")
    check.add_argument("--step", type=int, default=None, help="only this step (default: every committed step)")
    check.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    out = actions.add_parser("export", help="master weights as HF-style safetensors")
    out.add_argument("dir", help="checkpoint root, or one step directory")
    out.add_argument("--out", required=True, help="output directory (created)")
    out.add_argument("--step", type=int, default=None, help="step to export (default: the newest)")
    out.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the exported weights")
    out.add_argument("--max-shard-bytes", type=int, default=5 << 30,
                     help="largest file before splitting into shards with an index (bytes)")
    out.add_argument("--json", action="store_true", help="print one JSON document instead of a line")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not os.path.isdir(args.dir):
        parser.error(f"{args.dir} is not a directory")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _state(name: str) -> str:
    if name == POOL:
        return "recycling pool: a retired checkpoint's files, which the next one writes over"
    if ".corrupt-" in name:
        return "quarantined"
    if name.startswith(".inflight."):
        return "in flight or left by a dead run"
    return "committed" if name.startswith("step-") else ""


def run_list(args) -> int:
    rows = []
    for name in sorted(os.listdir(args.dir)):
        path = os.path.join(args.dir, name)
        if not os.path.isdir(path) or not _state(name):
            continue
        step, error = None, None
        if _state(name) == "committed":
            try:
                step = read_manifest(path)["step"]
            except CorruptCheckpoint as e:
                error = f"bad manifest: {e}"
        rows.append({"name": name, "bytes": _dir_bytes(path), "state": _state(name), "step": step, "error": error})
    if args.json:
        print(json.dumps({"dir": args.dir, "checkpoints": rows}, indent=2))
        return 0
    for r in rows:
        step = f"step {r['step']}" if r["step"] is not None else ("bad manifest" if r["error"] else "")
        print(f"{r['name']:48s} {format_bytes(r['bytes']):>10s}  {r['state']}  {step}")
    return 0


def _verify_all(targets: list[str]) -> list[dict]:
    results = []
    for path in targets:
        try:
            manifest = verify(path)
            results.append({"path": path, "ok": True, "step": manifest["step"],
                            "num_tensors": len(manifest["tensors"]), "error": None})
        except CorruptCheckpoint as e:
            results.append({"path": path, "ok": False, "step": None, "num_tensors": None, "error": str(e)})
    return results


def run_verify(args) -> int:
    if os.path.isfile(os.path.join(args.dir, "manifest.json")):
        targets = [args.dir]
    else:
        steps = [args.step] if args.step is not None else committed_steps(args.dir)
        targets = [resolve(args.dir, s) for s in steps]
    results = _verify_all(targets)
    ok = bool(results) and all(r["ok"] for r in results)
    if args.json:
        print(json.dumps({"dir": args.dir, "ok": ok, "checkpoints": results}, indent=2))
        return 0 if ok else 1
    if not results:
        print(f"{args.dir}: no committed checkpoints")
    for r in results:
        if r["ok"]:
            print(f"ok       {r['path']}  step {r['step']}, {r['num_tensors']} tensors")
        else:
            print(f"CORRUPT  {r['path']}: {r['error']}")
    return 0 if ok else 1


def run_export(args) -> int:
    path = resolve(args.dir, args.step)
    written = export(path, args.out, dtype=_DTYPES[args.dtype], max_shard_bytes=args.max_shard_bytes)
    if args.json:
        print(json.dumps({"checkpoint": path, "out": args.out, "files": list(written)}, indent=2))
    else:
        print(f"exported {path} to {args.out}: {', '.join(written)}")
    return 0


def run(args) -> int:
    return {"list": run_list, "verify": run_verify, "export": run_export}[args.action](args)


__all__ = ["add_arguments", "check_arguments", "run"]
