"""Export a checkpoint's weights as Hugging Face-style safetensors a user can load back.

Why: a checkpoint holds master weights and optimizer moments in the runtime's own layout; a
finished model is wanted as ``model.safetensors`` (or shards plus ``model.safetensors.index.json``)
keyed by ``model.state_dict()`` names, with ``config.json`` when the model had a config. Every
tensor's CRC is checked on the way, so a corrupt checkpoint is never exported.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from horizon.checkpoint.commit import committed_steps, step_dir_name
from horizon.checkpoint.load import each_tensor
from horizon.checkpoint.manifest import read_manifest

__all__ = ["resolve", "export"]


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
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"export dtype must be float32, bfloat16 or float16, got {dtype}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    manifest = read_manifest(directory)
    os.makedirs(out, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for _, record, t in each_tensor(directory, manifest):
        if record["role"] != "master":
            continue
        t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][record["param"]] = t
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
    if manifest.get("model_config") is not None:
        _write_json(os.path.join(out, "config.json"), manifest["model_config"])
        written.append("config.json")
    return written


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
