"""Exact global-norm gradient clipping: the scale ``clip_grad_norm_`` applies.

The norm is the 2-norm of the per-unit gradient norms in fp32 (``Updater.total_norm``), and
every gradient is multiplied by ``min(1, max_norm / (norm + 1e-6))`` before its update.
"""

from __future__ import annotations

import torch

__all__ = ["clip_scale"]


def clip_scale(total_norm: torch.Tensor, max_norm: float) -> float:
    return float(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
