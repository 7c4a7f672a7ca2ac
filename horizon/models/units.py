"""Recognise a model as a chain of streamable units: embedding → N blocks → final norm + head.

Why: the engine streams one unit at a time through device slots and runs its backward by hand,
so it must know where the chain is cut. Most causal LMs follow one shape under a handful of
attribute names; ``find_units`` looks for those and ``Units`` names the parts explicitly for
anything else. A model that matches neither is refused with what was found and what is needed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["Units", "UnitKind", "UnitSpec", "find_units"]

EMBEDDING_NAMES = ("embed_tokens", "wte", "tok_embeddings", "embedding")
BLOCKS_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "ln_f", "final_norm")
HEAD_NAMES = ("lm_head", "output", "head")
_CONTAINERS = ("model", "transformer", "decoder")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Units:
    """The parts of a model, named by hand when auto-detection does not fit."""

    embedding: nn.Module
    blocks: Sequence[nn.Module]
    norm: nn.Module
    head: nn.Linear

    def __post_init__(self) -> None:
        if not isinstance(self.embedding, nn.Embedding):
            raise ValueError(f"Units.embedding must be an nn.Embedding, got {type(self.embedding).__name__}")
        if len(self.blocks) == 0:
            raise ValueError("Units.blocks is empty: the chain needs at least one block")
        if not isinstance(self.head, nn.Linear):
            raise ValueError(f"Units.head must be an nn.Linear, got {type(self.head).__name__}")
        if not isinstance(self.norm, nn.Module):
            raise ValueError(f"Units.norm must be an nn.Module, got {type(self.norm).__name__}")


class UnitKind(enum.Enum):
    EMBEDDING = "embedding"  # input_ids -> hidden
    BLOCK = "block"          # hidden -> hidden
    HEAD = "head"            # hidden -> logits (final norm + head)


class HeadUnit(nn.Module):
    """The final norm and the head as one streamable module (shares them with the user's model)."""

    def __init__(self, norm: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


def _call_block(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = module(hidden)
    return out[0] if isinstance(out, tuple) else out


def _call_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitSpec:
    """One link of the chain: the module whose parameters stream together, and how to call it."""

    name: str
    kind: UnitKind
    module: nn.Module
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _first_attr(module: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _search_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    roots = [("", model)]
    for name in _CONTAINERS:
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            roots.append((name + ".", child))
    return roots


def _detect(model: nn.Module) -> tuple[Units, dict[str, str]]:
    found: dict[str, tuple[str, nn.Module]] = {}
    for prefix, root in _search_roots(model):
        for role, names in (("embedding", EMBEDDING_NAMES), ("blocks", BLOCKS_NAMES), ("norm", NORM_NAMES)):
            hit = _first_attr(root, names)
            if role not in found and hit is not None:
                found[role] = (prefix + hit[0], hit[1])
    head = _first_attr(model, HEAD_NAMES)
    if head is not None:
        found["head"] = head
    problems = []
    if not isinstance(found.get("embedding", (None, None))[1], nn.Embedding):
        problems.append(f"an nn.Embedding named one of {EMBEDDING_NAMES}")
    if not isinstance(found.get("blocks", (None, None))[1], nn.ModuleList):
        problems.append(f"an nn.ModuleList of blocks named one of {BLOCKS_NAMES}")
    if "norm" not in found:
        problems.append(f"a final norm named one of {NORM_NAMES}")
    if not isinstance(found.get("head", (None, None))[1], nn.Linear):
        problems.append(f"an nn.Linear head named one of {HEAD_NAMES} on the model itself")
    if problems:
        seen = ", ".join(f"{n}: {type(m).__name__}" for n, m in model.named_children()) or "no children"
        raise ValueError(
            f"horizon cannot find the unit chain of {type(model).__name__} (top-level children: {seen}). "
            f"Missing: {'; '.join(problems)}. Supported models are embedding → blocks → final norm → head; "
            "name the parts explicitly with horizon.Units(embedding=..., blocks=..., norm=..., head=...)."
        )
    units = Units(embedding=found["embedding"][1], blocks=list(found["blocks"][1]),
                  norm=found["norm"][1], head=found["head"][1])
    return units, {role: path for role, (path, _) in found.items()}


def _check_coverage(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    covered = {id(p) for m in modules for p in m.parameters()}
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(
            f"parameters outside the unit chain would never be trained: {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}. Move them into a block or name the parts with horizon.Units."
        )


def find_units(model: nn.Module, units: Units | None = None) -> list[UnitSpec]:
    """The model's chain as ``[embedding, block 0 … block N-1, head]``, each with its call."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"horizon trains an nn.Module, got {type(model).__name__}")
    paths = {"embedding": "embedding", "blocks": "blocks", "norm": "norm", "head": "head"}
    if units is None:
        from horizon.models.hf import hf_units  # imports transformers only for a transformers model

        specs = hf_units(model)
        if specs is not None:
            _check_coverage(model, [spec.module for spec in specs])
            return specs
        units, paths = _detect(model)
    _check_coverage(model, [units.embedding, units.norm, units.head, *units.blocks])
    specs = [UnitSpec(name=paths["embedding"], kind=UnitKind.EMBEDDING, module=units.embedding, call=_call_module)]
    specs += [UnitSpec(name=f"{paths['blocks']}.{i}", kind=UnitKind.BLOCK, module=block, call=_call_block)
              for i, block in enumerate(units.blocks)]
    specs.append(UnitSpec(name=paths["head"], kind=UnitKind.HEAD,
                          module=HeadUnit(units.norm, units.head), call=_call_module))
    return specs
