"""``manifest.json``: what a committed checkpoint holds. Its directory is renamed into place only once
it and every file it lists are fsynced, so a manifest under ``step-<N>`` means complete.

Why JSON: it is read by people (``horizon checkpoint list``) and by the loader before any tensor
is touched, and it must never need pickle. It lists every file with its size and every tensor
with its file, dtype, shape and CRC-32, the model's layout (unit, parameter names, shapes) and
its hash, and the train state captured at the request.

Versions: 1 keeps one tensor per parameter and role (``param`` names it, ``offset`` is where it
starts in its unit). 2 adds ``world_size`` and lets a record be a flat slice of a unit's buffer
(``param`` null, ``offset`` the unit element it starts at, ``shape`` its length, zero padding
allowed past the unit's end): what each rank of a sharded run writes. Both load; a horizon that
reads only version 1 refuses version 2 cleanly rather than misreading slices.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version

import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "CorruptCheckpoint", "layout_of", "layout_hash",
           "tensor_name", "build_manifest", "read_manifest"]

FORMAT = "horizon-ckpt"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


class CorruptCheckpoint(Exception):
    """A checkpoint directory that fails validation: missing or bad manifest, sizes, CRCs."""


def layout_of(store, param_names: list[list[str]]) -> list[dict]:
    """Per unit: its name and its own parameters (model name, local name, element offset, shape)."""
    return [{"name": unit.layout.name, "numel": unit.layout.numel,
             "params": [{"name": model_name, "local": p.local_name, "offset": p.offset, "shape": list(p.shape)}
                        for p, model_name in zip(unit.layout.own, names)]}
            for unit, names in zip(store.units, param_names)]


def layout_hash(layout: list[dict]) -> str:
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def tensor_name(param: str, role: str) -> str:
    return f"{param}.{role}"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for package in ("horizon", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def build_manifest(*, step: int, layout: list[dict], files: dict[str, int], tensors: dict[str, dict],
                   train_state: dict, model_config: dict | None, timing: dict, world_size: int = 1) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "created_by": _versions(),
            "world_size": world_size,
            "layout_hash": layout_hash(layout), "layout": layout, "model_config": model_config,
            "files": {name: {"bytes": nbytes} for name, nbytes in files.items()}, "tensors": tensors,
            "train_state": train_state, "timing": timing}


def read_manifest(directory: str) -> dict:
    """The manifest of ``directory``, checked for shape and version; CorruptCheckpoint otherwise."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{directory}: no {MANIFEST} (an incomplete write?)") from e
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{directory}: {MANIFEST} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{directory}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise CorruptCheckpoint(f"{directory}: format_version {manifest.get('format_version')!r} is not one this "
                                f"horizon reads ({SUPPORTED_VERSIONS}); a newer checkpoint needs a newer horizon")
    missing = [k for k in ("step", "layout", "layout_hash", "files", "tensors", "train_state") if k not in manifest]
    if missing:
        raise CorruptCheckpoint(f"{directory}: {MANIFEST} lacks {missing}")
    return manifest
