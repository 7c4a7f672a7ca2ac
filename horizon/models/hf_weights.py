"""Hugging Face safetensors checkpoints streamed straight into the host store.

Why: ``from_pretrained`` materialises the whole model in RAM before horizon could move it into
the host store, so a model that needs the store's whole budget would need it twice. Here the
model is built on the meta device (``empty_hf_model``: no parameter memory at all), the
checkpoint's headers are read and checked against the model's parameter names and shapes before
anything is allocated (``HFWeights.open``), and once the store exists each parameter is read
with ``safe_open`` (memory-mapped, one tensor at a time) and copied into its master view, unit by
unit. A single ``model.safetensors`` and shards listed by ``model.safetensors.index.json`` both
work; tied weights are read once, as ``save_pretrained`` writes them once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = ["HFWeights", "empty_hf_model", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def empty_hf_model(config_or_dir) -> nn.Module:
    """``AutoModelForCausalLM`` of a config (or a directory with config.json): parameters on the meta
    device, nothing allocated for them; the rotary embedding's buffers computed on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_or_dir
    if isinstance(config_or_dir, (str, os.PathLike)):
        if not Path(config_or_dir, "config.json").is_file():
            raise ValueError(f"{config_or_dir} has no config.json: pass a directory save_pretrained wrote, "
                             "or a transformers config")
        config = AutoConfig.from_pretrained(config_or_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None and any(b.is_meta for b in rotary.buffers()):
        inner.rotary_emb = type(rotary)(config=model.config)  # parameter-free: buffers only, tiny
    embed = getattr(inner, "embed_tokens", None)
    scale = getattr(embed, "scalar_embed_scale", None)  # Gemma's sqrt(hidden) embedding scale, a 0-d buffer
    if scale is not None and embed.embed_scale.is_meta:
        embed.embed_scale = torch.tensor(scale)
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if meta_buffers:
        raise ValueError(f"{type(model).__name__} keeps buffers horizon cannot rebuild off the meta device: "
                         f"{meta_buffers[:3]}; build it on the CPU instead")
    return model


@dataclasses.dataclass(frozen=True)
class _Source:
    file: Path
    key: str


def _key_files(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise ValueError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}: save the model with "
                     "save_pretrained(dir) (safetensors is its default) or horizon.export_hf")


def _header_shapes(files: set[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    shapes = {}
    for file in sorted(files):
        if not file.is_file():
            raise ValueError(f"{file} is listed in {INDEX_FILE} but missing")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                shapes[key] = (tuple(s.get_shape()), s.get_dtype())
    return shapes


class HFWeights:
    """Where each parameter of a model lives in a HF safetensors directory (checked, not yet read)."""

    def __init__(self, model: nn.Module, sources: dict[str, _Source]) -> None:
        self.model, self.sources = model, sources
        self._name_of = {id(p): name for name, p in model.named_parameters()}

    @classmethod
    def open(cls, model: nn.Module, directory) -> "HFWeights":
        """Match every parameter of ``model`` to a tensor of the same shape; ValueError otherwise."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"hf_weights={str(directory)!r} is not a directory")
        files = _key_files(directory)
        shapes = _header_shapes(set(files.values()))
        prefix = getattr(model, "base_model_prefix", "") + "."
        sources, problems = {}, []
        for name, p in model.named_parameters():
            key = name if name in files else name.removeprefix(prefix)  # GPT-2's original keys lack "transformer."
            if key not in files:
                problems.append(f"{name} is missing")
                continue
            if key not in shapes:
                problems.append(f"{key} is listed in {INDEX_FILE} but not in {files[key].name}")
                continue
            shape, dtype = shapes[key]
            if shape != tuple(p.shape) or dtype not in _DTYPES:
                problems.append(f"{key} is {dtype}{list(shape)}, the model wants a float {list(p.shape)}")
            sources[name] = _Source(files[key], key)
        if problems:
            raise ValueError(f"{directory} does not fit {type(model).__name__}: {'; '.join(problems[:4])}"
                             f"{' …' if len(problems) > 4 else ''}. Build the model from the config.json saved "
                             "with these weights (horizon.models.hf_weights.empty_hf_model(dir))")
        return cls(model, sources)

    def load(self) -> None:
        """Copy every tensor into the model's parameters (views into the store), one at a time."""
        with contextlib.ExitStack() as stack, torch.no_grad():
            handles = {}
            for name, p in self.model.named_parameters():
                source = self.sources[name]
                if source.file not in handles:
                    handles[source.file] = stack.enter_context(safe_open(source.file, framework="pt"))
                p.copy_(handles[source.file].get_slice(source.key)[:])

    def read_flat(self, param: nn.Parameter, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of ``param`` flattened, read from its file: only the rows that hold them
        (a sharded store's rank reads its slices, never the whole model)."""
        source = self.sources[self._name_of[id(param)]]
        with safe_open(source.file, framework="pt") as f:
            piece = f.get_slice(source.key)
            shape = piece.get_shape()
            if len(shape) == 0:
                return piece[...].reshape(-1)[start:end]
            row = int(torch.Size(shape[1:]).numel())
            first, last = start // row, -(-end // row)
            return piece[first:last].reshape(-1)[start - first * row:end - first * row]
