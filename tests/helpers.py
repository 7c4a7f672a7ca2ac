"""Shared test helpers: the plain-PyTorch reference step and small models."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import horizon
from horizon.models import Decoder, decoder_config


def forbid_host_store(monkeypatch, why: str = "the host store was built") -> None:
    """Fail the test if the trainer builds its host store: for errors that must come before anything is allocated."""
    import horizon.trainer

    def no_store(*args, **kwargs):
        raise AssertionError(why)

    monkeypatch.setattr(horizon.trainer, "HostStore", no_store)


def tiny_decoder(*, seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(decoder_config("tiny", **overrides))


def batches(num: int, *, vocab: int = 256, batch: int = 2, seq: int = 16, seed: int = 1, ignore_frac: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.randint(0, vocab, (batch, seq), generator=g)
        if ignore_frac:
            y[torch.rand(y.shape, generator=g) < ignore_frac] = -100
        out.append({"input_ids": x, "labels": y})
    return out


def plain_run(model: torch.nn.Module, data, *, opt: horizon.AdamW, clip: float | None,
              logits_of=lambda output: output):
    """Losses and final state of plain autograd + torch.optim.AdamW on a copy of ``model``.

    ``logits_of`` takes the logits out of the model's output (``.logits`` for Hugging Face models)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    losses = []
    for b in data:
        logits = logits_of(model(b["input_ids"]))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), b["labels"].view(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def horizon_run(model: torch.nn.Module, data, *, config: horizon.TrainConfig, transfer=None):
    model = copy.deepcopy(model)
    with horizon.Trainer(model, config, transfer=transfer) as trainer:
        losses = [trainer.step(b).loss for b in data]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        memory = trainer.memory()
    return losses, state, memory


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def chain_logits(specs, input_ids):
    """Run a unit chain as plain modules, unit by unit (what find_units recognised, end to end)."""
    h = input_ids
    for spec in specs:
        h = spec.call(spec.module, h)
    return h
