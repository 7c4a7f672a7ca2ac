"""Naming a model on the command line: a decoder preset or a Hugging Face config, built on meta.

Why its own module: ``horizon estimate`` builds the model many times (once per depth it tries),
always on the meta device so that nothing is allocated, and ``horizon train`` will name models
the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from horizon.models import PRESETS, Decoder, decoder_config

__all__ = ["ModelSpec", "resolve_model"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    description: str
    num_layers: int
    build: Callable[[int], nn.Module]
    """The model with this many blocks, on the meta device."""


def _preset(name: str) -> ModelSpec:
    def build(num_layers: int) -> nn.Module:
        with torch.device("meta"):
            return Decoder(decoder_config(name, num_layers=num_layers))

    return ModelSpec(description=f"decoder preset '{name}'", num_layers=PRESETS[name]["num_layers"], build=build)


def _hf_config(path: Path):
    try:
        import transformers
    except ImportError as e:
        raise ValueError(f"{path} is a Hugging Face config, which needs transformers: "
                         "pip install 'horizon[hf]'") from e
    try:
        return transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read a Hugging Face config from {path}: {e}") from e


def _hf(path: Path) -> ModelSpec:
    import transformers

    config = _hf_config(path)

    def build(num_layers: int) -> nn.Module:
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = num_layers
        layer_types = getattr(cfg, "layer_types", None)
        if isinstance(layer_types, list) and layer_types:  # repeat the model's pattern to the new depth
            cfg.layer_types = [layer_types[i % len(layer_types)] for i in range(num_layers)]
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)

    return ModelSpec(description=f"{config.model_type} from {path}", num_layers=config.num_hidden_layers,
                     build=build)


def resolve_model(name: str) -> ModelSpec:
    """``name`` is a preset of ``horizon.models.PRESETS`` or a path to an HF config.json (or its directory)."""
    if name in PRESETS:
        return _preset(name)
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf(path)
    if path.is_file():
        return _hf(path)
    raise ValueError(f"--model {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a Hugging Face "
                     "config.json or a directory holding one")
