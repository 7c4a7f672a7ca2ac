"""Evaluation: one forward sweep over the chain of units, without autograd, the loss in chunks.

Why not ``model(x)``: the user's model holds fp32 master views in host RAM, so calling it would
run on the CPU in fp32 however the trainer computes. Evaluation streams the same compute copy
through the same slots as a training step (weights for position j + slots - 1 are copied while
position j computes), runs every unit under ``torch.no_grad``, and sums token cross-entropies
chunk by chunk in the loss head, so the logits of the whole batch never exist at once. Nothing
is written: no gradient, no host buffer, no optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import torch
import torch.nn.functional as F

from horizon.engine.engine import Engine
from horizon.engine.sweep import Sweep
from horizon.engine.loss import IGNORE_INDEX
from horizon.models.units import UnitKind

__all__ = ["forward_loss_sum"]


def _head_loss_sum(call: Callable[[torch.Tensor], torch.Tensor], hidden_BTD: torch.Tensor, labels_BT: torch.Tensor,
                   chunk_tokens: int) -> torch.Tensor:
    hidden = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    labels = labels_BT.reshape(-1)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden.shape[0])
        logits = call(hidden[start:end]).float()
        loss_sum += F.cross_entropy(logits, labels[start:end], ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum


@torch.no_grad()
def forward_loss_sum(engine: Engine, input_ids: torch.Tensor, labels: torch.Tensor, *,
                     load_after: Callable[[int], Future | None] = lambda unit: None,
                     extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The sum of token cross-entropies over labels that are not -100 (a 0-d fp32 device tensor).

    ``load_after(unit)``: the future a copy of ``unit``'s weights must wait for (its pending update)."""
    order = list(range(len(engine.specs)))
    sweep = Sweep(input_ids=input_ids, labels=labels, loss_divisor=1, order=order,
                   uses=engine.pool.uses(order), load_after=load_after, extras=extras or {})
    try:
        return _sweep(engine, sweep)
    except BaseException:
        engine.pool.mark_stale()  # a resident unit's load may not have happened
        raise


def _sweep(engine: Engine, sweep: Sweep) -> torch.Tensor:
    order, depth = sweep.order, engine.pool.num_slots - 1
    for position in range(min(depth, len(order))):
        engine.traffic.issue_weights(sweep, position)
    hidden, loss_sum = sweep.input_ids, None
    for position, unit in enumerate(order):
        if position + depth < len(order):
            engine.traffic.issue_weights(sweep, position + depth)
        for handle in sweep.ready.pop(position):
            handle.wait_device()
        spec, template = engine.specs[unit], engine.pool.template(sweep.uses[position].slot, unit)
        with torch.profiler.record_function(f"horizon.evaluate.{spec.name}"):
            if spec.kind is UnitKind.HEAD:
                loss_sum = _head_loss_sum(lambda x: spec.call(template, x), hidden, sweep.labels,
                                          engine.plan.loss_chunk(engine.vocab_size))
            else:
                hidden = engine._call(sweep, unit, template, hidden)
    assert loss_sum is not None, "the chain ends with its head"
    return loss_sum
