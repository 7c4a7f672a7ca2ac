"""Exact global-norm gradient clipping over the host gradient buffers.

The norm is the 2-norm of all gradients, computed as ``clip_grad_norm_`` does (the norm of the
per-buffer norms, in fp32) and the scale ``min(1, max_norm / (norm + 1e-6))`` is applied to every
gradient before the update.
"""

from __future__ import annotations

import torch

__all__ = ["global_grad_norm", "clip_scale"]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def clip_scale(total_norm: torch.Tensor, max_norm: float) -> float:
    return float(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
