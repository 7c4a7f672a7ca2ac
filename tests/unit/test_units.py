"""Recognising the unit chain: common attribute names, containers, explicit Units."""

import pytest
import torch
from torch import nn

import horizon
from horizon.models import Decoder, UnitKind, decoder_config, find_units
from helpers import batches, horizon_run, plain_run, rel_err


class GPTBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return (x + self.fc(self.ln(x)), None)  # HF-style tuple output


class GPTLike(nn.Module):
    """transformer.wte / transformer.h / transformer.ln_f / lm_head, blocks returning tuples."""

    def __init__(self, vocab=64, dim=16, layers=2):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, dim)
        self.transformer.h = nn.ModuleList(GPTBlock(dim) for _ in range(layers))
        self.transformer.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids):
        h = self.transformer.wte(ids)
        for block in self.transformer.h:
            h = block(h)[0]
        return self.lm_head(self.transformer.ln_f(h))


def test_reference_decoder_chain():
    specs = find_units(Decoder(decoder_config("tiny", num_layers=3)))
    assert [s.name for s in specs] == ["embed_tokens", "layers.0", "layers.1", "layers.2", "lm_head"]
    assert [s.kind for s in specs] == [UnitKind.EMBEDDING] + [UnitKind.BLOCK] * 3 + [UnitKind.HEAD]


def test_names_under_a_container_and_tuple_outputs_train_exactly():
    torch.manual_seed(0)
    model = GPTLike()
    specs = find_units(model)
    assert [s.name for s in specs] == ["transformer.wte", "transformer.h.0", "transformer.h.1", "lm_head"]
    data = batches(4, vocab=64)
    opt = horizon.AdamW(lr=1e-2)
    ref_losses, ref_state = plain_run(model, data, opt=opt, clip=None)
    losses, state, _ = horizon_run(model, data, config=horizon.TrainConfig(optimizer=opt))
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) <= 1e-6
    assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(32, 8)
        self.stack = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.final = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 32)

    def forward(self, ids):
        h = self.tokens(ids)
        for layer in self.stack:
            h = layer(h)
        return self.proj(self.final(h))


def test_explicit_units_for_unusual_names():
    torch.manual_seed(0)
    model = Odd()
    with pytest.raises(ValueError, match="horizon.Units"):
        find_units(model)
    units = horizon.Units(embedding=model.tokens, blocks=model.stack, norm=model.final, head=model.proj)
    data = batches(3, vocab=32)
    ref_losses, ref_state = plain_run(model, data, opt=horizon.AdamW(), clip=None)
    with horizon.Trainer(model, horizon.TrainConfig(units=units)) as trainer:
        losses = [trainer.step(b).loss for b in data]
        state = trainer.state_dict()
        assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) <= 1e-6
        assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(embedding=nn.Linear(2, 2)), "nn.Embedding"),
    (dict(blocks=[]), "empty"),
    (dict(head=nn.LayerNorm(2)), "nn.Linear"),
])
def test_units_validation(kwargs, match):
    base = dict(embedding=nn.Embedding(4, 2), blocks=[nn.Linear(2, 2)], norm=nn.LayerNorm(2), head=nn.Linear(2, 4))
    with pytest.raises(ValueError, match=match):
        horizon.Units(**{**base, **kwargs})
