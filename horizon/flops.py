"""Model FLOPs per token and MFU: one formula for the benchmarks and the progress bar.

Why one place: MFU is only comparable between runs, systems and the benchmark tables if every
one counts the same FLOPs. The count is the model's, whatever a system recomputes: 6 × the
parameters of every matmul (the blocks and the head; the embedding lookup is not a matmul, a
tied head's matrix is) plus 6 × layers × seq_len × hidden for causal attention (QK^T and AV,
forward and backward, half the square). MFU is model FLOP/s over the device's dense bf16 peak.
"""

from __future__ import annotations

import torch
from torch import nn

from horizon.models.units import UnitKind, Units, find_units

__all__ = ["PEAK_BF16_FLOPS", "flops_per_token", "device_peak_flops", "mfu"]

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 FLOP/s by device name (SXM parts), matched as a substring of the device's name."""


def flops_per_token(model: nn.Module, seq_len: int, *, units: Units | None = None) -> float:
    """Training FLOPs per token of ``model`` (any device, meta included) at ``seq_len`` tokens."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    specs = find_units(model, units)
    matmul = sum(p.numel() for spec in specs if spec.kind is not UnitKind.EMBEDDING
                 for p in spec.module.parameters() if p.dim() == 2)
    num_layers = sum(spec.kind is UnitKind.BLOCK for spec in specs)
    hidden = specs[0].module.embedding_dim
    return 6.0 * matmul + 6.0 * num_layers * seq_len * hidden


def device_peak_flops(device: torch.device | str) -> float | None:
    """The dense bf16 peak of ``device`` from ``PEAK_BF16_FLOPS``; None when unknown (the CPU, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation, a fraction of ``peak_flops``; None when the peak is not known."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops
