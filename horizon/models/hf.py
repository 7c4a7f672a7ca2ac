"""Hugging Face ``transformers`` causal LMs (Llama, Qwen2/3, Mistral, Gemma 1-3, Phi-3, GPT-2) as unit chains.

Why: their decoder layers do not take ``hidden -> hidden`` alone. A Llama-style layer needs the
rotary ``position_embeddings=(cos, sin)`` that the model computes once from
``model.model.rotary_emb``, and every layer needs the attention mask the model builds before its
loop (None under SDPA without padding, where attention is ``is_causal``; an explicit causal mask
under eager attention, which is not causal without one; a sliding-window mask where the window is
shorter than the sequence). ``hf_units`` wraps each layer with the (shared, parameter-free) rotary
module and builds the mask as the model does, so that a block unit is again ``hidden -> hidden``
and the chain gives exactly the logits of ``model(input_ids)`` (no KV cache). A batch's
``attention_mask`` (padding) and ``position_ids`` reach every embedding and block call, which
build the mask and positions from them as ``model(input_ids, attention_mask=..., position_ids=...)`` does.
GPT-2 adds its learned position embedding ``wpe`` in the embedding unit. Gemma scales its
embedding by sqrt(hidden) inside its own embedding module, so that needs nothing; Gemma 2 (and 3,
when configured) soft-caps the logits, which ``SoftcappedHead`` does in the head unit; Gemma 3
keeps one rotary table per layer type, which each block asks for. Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are ordinary linears inside its layers. Any other ``transformers`` model is
refused: its blocks may need inputs (per-layer embeddings, routers' losses, caches) the chain
does not carry.

``transformers`` is imported lazily: ``import horizon`` works without it.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import nn

from horizon.models.units import HeadUnit, UnitKind, UnitSpec, _call_module

__all__ = ["HF_MODEL_TYPES", "HFDecoderBlock", "HFSlidingDecoderBlock", "GPT2Embedding", "SoftcappedHead",
           "hf_units", "is_hf_model"]

ROTARY_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")
HF_MODEL_TYPES = (*ROTARY_MODEL_TYPES, "gpt2")
_ALL_SLIDING = ("mistral", "phi3")  # a sliding_window in their config applies to every layer


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (False when transformers is absent)."""
    if sys.modules.get("transformers") is None:  # a transformers model means it is already imported
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _build_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                sliding: bool):
    """The mask ``model.forward`` builds for this ``attention_mask`` (2-D, 1 = token, 0 = padding) and no cache."""
    from transformers import masking_utils  # transformers >= 4.53 (pyproject's hf extra)

    fn = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    params = _parameters(fn)
    kwargs = {"config": config, "attention_mask": attention_mask, "past_key_values": None, "position_ids": position_ids,
              "inputs_embeds" if "inputs_embeds" in params else "input_embeds": hidden}
    if "cache_position" in params:  # transformers 4.53 – 4.x
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return fn(**kwargs)


class HFDecoderBlock(nn.Module):
    """One HF decoder layer (with the model's rotary module, if it has one): ``hidden -> hidden``.

    The rotary module has only non-persistent buffers (``inv_freq``), equal for every layer, so
    all blocks share one template structure. Attributes that differ per layer (``layer_idx``)
    matter only to a KV cache, which training does not use.
    """

    sliding = False

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module | None, config) -> None:
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb
        self.config = config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {}
        if self.rotary_emb is not None:
            kwargs["position_embeddings"] = self._rotary(hidden, position_ids)
        mask = _build_mask(self.config, hidden, attention_mask, position_ids, self.sliding)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for this layer; Gemma 3 keeps one table per layer type and takes the type."""
        if "layer_type" in _parameters(type(self.rotary_emb).forward):
            layer_type = "sliding_attention" if self.sliding else "full_attention"
            return self.rotary_emb(hidden, position_ids, layer_type)
        return self.rotary_emb(hidden, position_ids)


class HFSlidingDecoderBlock(HFDecoderBlock):
    """A layer with sliding-window attention (Mistral, Phi-3; ``sliding_attention`` layers of Qwen2/3, Gemma 2/3).

    Its own class gives it its own structure key, so its own template: sliding and full layers
    of one model never share a template.
    """

    sliding = True


class GPT2Embedding(nn.Module):
    """GPT-2's token plus learned position embedding, then its dropout: ``drop(wte(ids) + wpe(arange(T)))``."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module | None) -> None:
        super().__init__()
        self.wte = wte
        self.wpe = wpe
        self.drop = drop if drop is not None else nn.Identity()

    @property
    def num_embeddings(self) -> int:  # the vocabulary size, read by the trainer like an nn.Embedding's
        return self.wte.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.wte.embedding_dim

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(position_ids))


class SoftcappedHead(HeadUnit):
    """Final norm, head, then Gemma 2's logit soft-capping: ``tanh(logits / cap) * cap``, as its forward does."""

    def __init__(self, norm: nn.Module, head: nn.Linear, softcap: float) -> None:
        super().__init__(norm, head)
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.norm(hidden)) / self.softcap) * self.softcap


def _layer_sliding(config, model_type: str, index: int) -> bool:
    if getattr(config, "sliding_window", None) is None:
        return False
    if model_type in _ALL_SLIDING:
        return True
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[index] == "sliding_attention"
    return bool(getattr(config, "use_sliding_window", False))


def _rotary_parts(model: nn.Module):
    inner = getattr(model, "model", None)
    parts = {name: getattr(inner, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")}
    if (not isinstance(parts["embed_tokens"], nn.Embedding) or not isinstance(parts["layers"], nn.ModuleList)
            or not isinstance(parts["norm"], nn.Module) or not isinstance(parts["rotary_emb"], nn.Module)):
        return None
    if list(parts["rotary_emb"].parameters()):
        raise ValueError("the rotary embedding has parameters; horizon shares it between blocks as buffers only")
    return ("model.embed_tokens", parts["embed_tokens"]), ("model.layers", parts["layers"]), parts["norm"], \
        parts["rotary_emb"]


def _gpt2_parts(model: nn.Module):
    inner = getattr(model, "transformer", None)
    parts = {name: getattr(inner, name, None) for name in ("wte", "wpe", "h", "ln_f", "drop")}
    if (not isinstance(parts["wte"], nn.Embedding) or not isinstance(parts["wpe"], nn.Embedding)
            or not isinstance(parts["h"], nn.ModuleList) or not isinstance(parts["ln_f"], nn.Module)):
        return None
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("horizon trains decoder-only GPT-2; add_cross_attention=True is not supported")
    return ("transformer.wte", GPT2Embedding(parts["wte"], parts["wpe"], parts["drop"])), ("transformer.h", parts["h"]), \
        parts["ln_f"], None


def _call_embedding(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids to hidden states; GPT-2 adds its learned position embedding at ``position_ids``."""
    return module(input_ids, position_ids) if isinstance(module, GPT2Embedding) else module(input_ids)


def _call_block(module: nn.Module, hidden: torch.Tensor, **extras) -> torch.Tensor:
    return module(hidden, **extras)


def hf_units(model: nn.Module) -> list[UnitSpec] | None:
    """The unit chain of a supported HF causal LM (embedding, every layer, final norm + lm_head), else None."""
    if not is_hf_model(model):
        return None
    config = model.config
    model_type = config.model_type
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{type(model).__name__} (model_type={model_type!r}) is not a transformers family horizon "
                         f"recognises ({', '.join(HF_MODEL_TYPES)}): its layers may need inputs the unit chain does "
                         "not carry. Use one of those families, or, if its blocks really are hidden -> hidden, name "
                         "the parts with TrainConfig(units=horizon.Units(embedding=..., blocks=..., norm=..., "
                         "head=...))")
    head = getattr(model, "lm_head", None)
    parts = _gpt2_parts(model) if model_type == "gpt2" else _rotary_parts(model)
    if parts is None or not isinstance(head, nn.Linear):
        return None
    (embed_name, embedding), (blocks_name, layers), norm, rotary_emb = parts
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"{type(model).__name__} has {len(layers)} layers but its config says "
                         f"{config.num_hidden_layers}; horizon trains the chain the model's forward runs")
    specs = [UnitSpec(name=embed_name, kind=UnitKind.EMBEDDING, module=embedding, call=_call_embedding)]
    for i, layer in enumerate(layers):
        block_cls = HFSlidingDecoderBlock if _layer_sliding(config, model_type, i) else HFDecoderBlock
        specs.append(UnitSpec(name=f"{blocks_name}.{i}", kind=UnitKind.BLOCK,
                              module=block_cls(layer, rotary_emb, config), call=_call_block))
    softcap = getattr(config, "final_logit_softcapping", None)
    head_unit = HeadUnit(norm, head) if softcap is None else SoftcappedHead(norm, head, float(softcap))
    specs.append(UnitSpec(name="lm_head", kind=UnitKind.HEAD, module=head_unit, call=_call_module))
    return specs
