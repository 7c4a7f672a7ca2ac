"""Checking a training batch before any work is done with it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from horizon.engine.loss import IGNORE_INDEX

__all__ = ["check_batch"]


def _tensor(batch: Mapping, key: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(f"the batch has no {key!r}: pass dict(input_ids=LongTensor[B, T], labels=LongTensor[B, T])")
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch[{key!r}] must hold integer token ids (int64), got {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"batch[{key!r}] must be [batch, tokens], got shape {tuple(value.shape)}")
    return value.long()


def check_batch(batch: Mapping, *, vocab_size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, labels, number of labels that count); raises ValueError on anything malformed."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch is a dict with input_ids and labels, got {type(batch).__name__}")
    input_ids, labels = _tensor(batch, "input_ids"), _tensor(batch, "labels")
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    if input_ids.numel() == 0:
        raise ValueError(f"the batch is empty (shape {tuple(input_ids.shape)})")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids hold ids in [{low}, {high}] but the embedding has {vocab_size} rows")
    valid = labels != IGNORE_INDEX
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"every label is {IGNORE_INDEX} (ignored): the batch has nothing to learn from")
    counted = labels[valid]
    if int(counted.min()) < 0 or int(counted.max()) >= num_classes:
        raise ValueError(f"labels hold classes in [{int(counted.min())}, {int(counted.max())}] but the head has "
                         f"{num_classes} outputs (use {IGNORE_INDEX} to ignore a position)")
    return input_ids, labels, num_valid
