"""Horizon's reference decoder: a Llama-style causal LM built as a chain of streamable units.

Why a model of our own: the engine's tests and benchmarks need a model whose shapes are chosen
freely (tiny for parity tests, 7B-70B shapes for estimates on the meta device) and whose blocks
carry no per-layer state, so one GPU template serves every block. The blocks compute rotary
embeddings from the sequence length on the fly instead of holding cos/sin buffers: a block is
its parameters and nothing else.

Layout (the names the unit detector looks for): ``embed_tokens`` → ``layers`` (RMSNorm,
grouped-query attention through ``F.scaled_dot_product_attention``, RMSNorm, SwiGLU) → ``norm``
→ ``lm_head`` (optionally tied to ``embed_tokens``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderConfig", "Decoder", "PRESETS", "decoder_config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    vocab_size: int
    """Number of token ids (the embedding's rows)."""
    dim: int
    """Hidden size."""
    num_layers: int
    """Number of blocks."""
    num_heads: int
    """Query heads; ``dim`` must divide evenly."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = ``num_heads`` (plain multi-head)."""
    ffn_dim: int | None = None
    """SwiGLU hidden size; None = Llama's rule (8/3 · dim rounded up to a multiple of 256)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    """Share ``lm_head.weight`` with ``embed_tokens.weight``."""
    init_std: float = 0.02
    """Standard deviation of the normal init of embeddings and linear layers."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"DecoderConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for rotary embeddings")
        if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"DecoderConfig.ffn_dim must be positive, got {self.ffn_dim}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def hidden_ffn_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return 256 * math.ceil(8 * self.dim / 3 / 256)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128),
    "small": dict(vocab_size=256, dim=256, num_layers=6, num_heads=8, num_kv_heads=4, ffn_dim=704),
    "125m": dict(vocab_size=32000, dim=768, num_layers=12, num_heads=12, ffn_dim=2048, tie_embeddings=True),
    "1b": dict(vocab_size=32000, dim=2048, num_layers=22, num_heads=32, num_kv_heads=4, ffn_dim=5632),
    "7b": dict(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, ffn_dim=11008),
    "8b": dict(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336,
               rope_theta=500000.0),
    "13b": dict(vocab_size=32000, dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
    "70b": dict(vocab_size=128256, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_dim=28672,
                rope_theta=500000.0),
}


def decoder_config(preset: str, **overrides) -> DecoderConfig:
    """A named preset (``tiny`` … ``70b``: Llama-2/3 shapes), with any field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; choose one of {sorted(PRESETS)}")
    return DecoderConfig(**{**PRESETS[preset], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_f.type_as(x) * self.weight


def _rotary(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _apply_rotary(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTD.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_TD - x2 * sin_TD, x2 * cos_TD + x1 * sin_TD), dim=-1)
    return out.type_as(x_BHTD)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = _rotary(T, self.head_dim, self.rope_theta, x_BTD.device)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        # Grouped-query attention without materialising repeated keys and values.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.num_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Decoder(nn.Module):
    """``Decoder(cfg)(input_ids) -> logits``; build on ``torch.device("meta")`` for large shapes."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for embeddings and linears, ones for norms (also after meta init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))
