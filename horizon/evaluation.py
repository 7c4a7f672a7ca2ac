"""``Trainer.evaluate``: the mean loss of the current weights over held-out batches.

Why apart from the trainer: evaluation shares the trainer's engine, batch checks and data-parallel
group but none of its step logic. It streams the same compute copy through the same slots as a
step (horizon.engine.evaluate), without autograd: no gradient, weight or optimizer state changes.
Each unit's pending update is waited for before its weights are read, dropout is off for the
sweep, and under torchrun the loss is the token-weighted mean over every rank's batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch

from horizon.batch import check_batch, check_extras
from horizon.engine.evaluate import forward_loss_sum
from horizon.metrics import EvalMetrics

__all__ = ["evaluate"]


def _loss_sum(trainer, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed token loss, counted labels) over ``batches``, with the engine in eval mode meanwhile."""
    loss_sum, tokens = 0.0, 0
    trainer.engine.set_training(False)
    try:
        for batch in batches:
            input_ids, labels, num_valid = check_batch(batch, vocab_size=trainer.vocab_size,
                                                       num_classes=trainer.num_classes)
            extras = check_extras(batch, input_ids.shape, accepted=trainer.takes_extras)
            loss_sum += float(forward_loss_sum(trainer.engine, input_ids.to(trainer.device),
                                               labels.to(trainer.device), load_after=trainer.updater.pending,
                                               extras={k: v.to(trainer.device) for k, v in extras.items()}))
            tokens += num_valid
    finally:
        trainer.engine.set_training(trainer.model.training)
    return loss_sum, tokens


def evaluate(trainer, batches: Iterable[Mapping[str, torch.Tensor]]) -> EvalMetrics:
    """The metrics of ``trainer``'s weights over ``batches``; runs the on_eval callbacks."""
    start_s = time.perf_counter()
    loss_sum, tokens = _loss_sum(trainer, batches)
    if trainer.data_parallel is not None:
        loss_sum, tokens = trainer.data_parallel.global_sum(loss_sum), trainer.data_parallel.global_count(tokens)
    if tokens == 0:
        raise ValueError("evaluate() got no batches: pass a non-empty iterable of dict(input_ids=..., labels=...)")
    metrics = EvalMetrics(step=trainer.global_step, loss=loss_sum / tokens, tokens=tokens,
                          seconds=time.perf_counter() - start_s)
    trainer.callbacks.run("on_eval", trainer, metrics)
    return metrics
