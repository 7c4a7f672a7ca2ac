"""Export a checkpoint's (or a live trainer's) weights as Hugging Face-style safetensors a user can load back.

Why: a checkpoint holds master weights and optimizer moments in the runtime's own layout; a
finished model is wanted as ``model.safetensors`` (or shards plus ``model.safetensors.index.json``)
keyed by ``model.state_dict()`` names, with ``config.json`` when the model had a config. Every
tensor's CRC is checked on the way, so a corrupt checkpoint is never exported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from safetensors.torch import save_file

from horizon.checkpoint.commit import committed_steps, step_dir_name
from horizon.checkpoint.load import each_tensor, unit_range
from horizon.checkpoint.manifest import read_manifest

__all__ = ["resolve", "export", "export_hf", "write_safetensors"]


def resolve(path: str, step: int | None = None) -> str:
    """A checkpoint directory from a root (its newest step, or ``step``) or a step directory itself."""
    if os.path.isfile(os.path.join(path, "manifest.json")) and step is None:
        return path
    steps = committed_steps(path)
    if not steps:
        raise ValueError(f"{path} holds no committed checkpoint (no step-* directory with a manifest)")
    if step is None:
        return os.path.join(path, step_dir_name(steps[-1]))
    if step not in steps:
        raise ValueError(f"{path} has no checkpoint of step {step}; it has steps {steps}")
    return os.path.join(path, step_dir_name(step))


def export(directory: str, out: str, *, dtype: torch.dtype = torch.float32,
           max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write the master weights of ``directory`` under ``out``; the files written."""
    _check(dtype, max_shard_bytes)
    manifest = read_manifest(directory)
    written = write_safetensors(_masters(directory, manifest), out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if manifest.get("model_config") is not None:
        _write_json(os.path.join(out, "config.json"), manifest["model_config"])
        written.append("config.json")
    return written


def _masters(directory: str, manifest: dict) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, fp32 master) in layout order, assembled per unit from its records: whole
    parameters (format 1) or the flat slices the ranks of a sharded run wrote (format 2)."""
    layout = manifest["layout"]
    flats = [torch.zeros(unit["numel"], dtype=torch.float32) for unit in layout]
    for _, record, t in each_tensor(directory, manifest, wanted=lambda record: record["role"] == "master"):
        start, end = unit_range(record, layout[record["unit"]]["numel"], t.numel())
        flats[record["unit"]][start:end] = t.reshape(-1)[:end - start]
    return [(p["name"], flat[p["offset"]:p["offset"] + torch.Size(p["shape"]).numel()].view(p["shape"]))
            for unit, flat in zip(layout, flats) for p in unit["params"]]


def export_hf(trainer, out: str, *, dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write ``trainer``'s weights after ``global_step`` updates as a directory that
    ``AutoModelForCausalLM.from_pretrained(out)`` loads: safetensors keyed by ``model.state_dict()``
    names, a tied weight once (under its first name, as ``save_pretrained`` does), and config.json."""
    _check(dtype, max_shard_bytes)
    state = trainer.state_dict()  # waits for the pending updates
    seen, named = set(), []
    for name, t in state.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            named.append((name, t))
    written = write_safetensors(named, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    config = getattr(trainer.model, "config", None)
    if callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(out)
        written.append("config.json")
    return written


def write_safetensors(named: Iterable[tuple[str, torch.Tensor]], out: str, *, dtype: torch.dtype,
                      max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus their index; the files written."""
    os.makedirs(out, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in named:
        t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {param: name for name, s in zip(names, shards) for param in s}}
        _write_json(os.path.join(out, "model.safetensors.index.json"), index)
        written.append("model.safetensors.index.json")
    return written


def _check(dtype: torch.dtype, max_shard_bytes: int) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"export dtype must be float32, bfloat16 or float16, got {dtype}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
