"""Checking a training batch before any work is done with it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from horizon.engine.loss import IGNORE_INDEX

__all__ = ["check_batch", "check_extras", "EXTRA_KEYS"]

EXTRA_KEYS = ("attention_mask", "position_ids")
"""Optional batch entries, [B, T] like input_ids, passed to Hugging Face models' embeddings and blocks."""


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


def check_extras(batch: Mapping, shape: torch.Size, *, accepted: bool) -> dict[str, torch.Tensor]:
    """The batch's attention_mask (1 = token, 0 = padding) and position_ids, checked; {} when it has neither."""
    extras = {}
    for key in EXTRA_KEYS:
        if batch.get(key) is None:
            continue
        value = batch[key]
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int64, torch.int32, torch.bool):
            raise ValueError(f"batch[{key!r}] must be an integer (or bool) torch.Tensor [batch, tokens]")
        if value.shape != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)} but input_ids {tuple(shape)}")
        extras[key] = value.long()
    if extras and not accepted:
        raise ValueError(f"the batch has {sorted(extras)}, which only Hugging Face models take (their blocks build "
                         "the padding mask and positions); drop them, or pad on the right with labels -100")
    mask = extras.get("attention_mask")
    if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("batch['attention_mask'] must hold 1 (token) and 0 (padding) only")
    if "position_ids" in extras and int(extras["position_ids"].min()) < 0:
        raise ValueError("batch['position_ids'] must be >= 0 (for left padding: (attention_mask.cumsum(-1) - 1)"
                         ".clamp(min=0))")
    return extras
