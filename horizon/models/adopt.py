"""What Horizon needs from a user's model before the store adopts it.

Why a module of its own: the trainer refuses a model it cannot train exactly (frozen, integer or
device-resident parameters, meta buffers) before anything is allocated, initialises models built
on the meta device the way their authors do, and carries the model's config into checkpoints so
an export loads back with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from torch import nn

__all__ = ["check_trainable", "init_fn", "model_config_json"]


def check_trainable(model: nn.Module) -> None:
    """A ValueError listing every parameter or buffer Horizon cannot take over."""
    problems = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            problems.append(f"{name} is frozen (requires_grad=False); frozen parameters are not supported yet")
        elif not p.is_floating_point():
            problems.append(f"{name} has dtype {p.dtype}; parameters must be floating point")
        elif p.device.type not in ("cpu", "meta"):
            problems.append(f"{name} is on {p.device}; build the model on 'cpu' or 'meta', horizon places it")
    for name, b in model.named_buffers():
        if b.is_meta:
            problems.append(f"buffer {name} is on the meta device; horizon materialises parameters only")
    if problems:
        raise ValueError("unsupported model: " + "; ".join(problems[:5]) + (" …" if len(problems) > 5 else ""))


def init_fn(model: nn.Module) -> Callable[[], None]:
    """The model's own ``init_weights``, else every submodule's ``reset_parameters``."""
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        return init_weights

    def reset_all() -> None:
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    return reset_all


def model_config_json(model: nn.Module, check_json: Callable[[object, str], None]) -> dict | None:
    """The model's config as JSON (HF's config.json as ``from_pretrained`` reads it, or a dataclass);
    None when it has none or it is not JSON-serialisable."""
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_json_string", None)):
        value = json.loads(config.to_json_string(use_diff=False))
    elif callable(getattr(config, "to_dict", None)):
        value = config.to_dict()
    elif dataclasses.is_dataclass(config):
        value = dataclasses.asdict(config)
    else:
        return None
    try:
        check_json(value, "model.config")
    except ValueError:
        return None
    return value
