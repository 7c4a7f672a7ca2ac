"""The loss head: final norm + head + cross-entropy, forward and backward in token chunks.

Why chunks: the logits of a whole batch (tokens × vocabulary, in fp32) are often larger than a
block's weights. Each chunk runs forward and backward at once and its logits are freed before
the next chunk starts; there is never one graph over all chunks. The loss is the sum of
per-token cross-entropies over non-ignored labels divided by their count, which is exactly
``F.cross_entropy(logits, labels, ignore_index=-100)``'s mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "head_forward_backward"]


def head_forward_backward(call: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor],
                          hidden_BTD: torch.Tensor, labels_BT: torch.Tensor, *, loss_divisor: int,
                          chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(sum of token losses, gradients of that sum / ``loss_divisor`` w.r.t. ``hidden_BTD`` and ``params``)."""
    hidden = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    labels = labels_BT.reshape(-1)
    grad_hidden = torch.empty_like(hidden)
    param_grads: list[torch.Tensor] | None = None
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden.shape[0])
        x = hidden[start:end].detach().requires_grad_()
        with torch.enable_grad():
            logits = call(x).float()
            loss = F.cross_entropy(logits, labels[start:end], ignore_index=IGNORE_INDEX, reduction="sum")
            grads = torch.autograd.grad(loss / loss_divisor, [x, *params])
        grad_hidden[start:end] = grads[0]
        loss_sum += loss.detach()
        if param_grads is None:
            param_grads = list(grads[1:])
        else:
            torch._foreach_add_(param_grads, grads[1:])
        del logits, loss, grads
    assert param_grads is not None
    return loss_sum, grad_hidden.view_as(hidden_BTD), param_grads
