"""Invariant 1: a Horizon step on CPU in fp32 equals a plain PyTorch step."""

import pytest
import torch
from torch import nn

import horizon
from helpers import batches, horizon_run, plain_run, rel_err, tiny_decoder

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _config(plan, *, clip=1.0, num_slots=2, chunk=None):
    return horizon.TrainConfig(device="cpu", optimizer=OPT, grad_clip_norm=clip,
                               plan=horizon.Plan.uniform(plan, num_slots=num_slots, loss_chunk_tokens=chunk))


@pytest.mark.parametrize("plan", ["keep", "recompute"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ten_steps_match_plain_pytorch(plan, tie, clip):
    model = tiny_decoder(num_layers=3, tie_embeddings=tie)
    data = batches(10, ignore_frac=0.2)
    ref_losses, ref_state = plain_run(model, data, opt=OPT, clip=clip)
    losses, state, _ = horizon_run(model, data, config=_config(plan, clip=clip))
    assert state.keys() == ref_state.keys()
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 1e-6 * abs(want)
    for key in ref_state:
        assert state[key].shape == ref_state[key].shape
        assert rel_err(state[key], ref_state[key]) <= 1e-6, key


@pytest.mark.parametrize("num_slots", [2, 3, 4])
@pytest.mark.parametrize("chunk", [None, 5])
def test_keep_and_recompute_are_bitwise_identical(num_slots, chunk):
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    data = batches(4)
    keep = horizon_run(model, data, config=_config("keep", num_slots=num_slots, chunk=chunk))
    recompute = horizon_run(model, data, config=_config("recompute", num_slots=2, chunk=chunk))
    assert keep[0] == recompute[0]
    assert all(torch.equal(keep[1][k], recompute[1][k]) for k in keep[1])


def test_mixed_plan_matches_uniform():
    model = tiny_decoder(num_layers=4)
    data = batches(3)
    mixed = horizon.Plan(default=horizon.ActivationPolicy.KEEP,
                         per_unit={"layers.1": horizon.ActivationPolicy.RECOMPUTE,
                                   "layers.3": horizon.ActivationPolicy.RECOMPUTE})
    a = horizon_run(model, data, config=horizon.TrainConfig(optimizer=OPT, plan=mixed))
    b = horizon_run(model, data, config=horizon.TrainConfig(optimizer=OPT, plan="keep"))
    assert a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


class Residual(nn.Module):
    def __init__(self, dim, p):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(p))

    def forward(self, x):
        return x + self.inner(x)


class DropoutLM(nn.Module):
    """A GPT-2-like chain with dropout inside its blocks: recompute must replay the same masks."""

    def __init__(self, vocab=64, dim=32, layers=3, p=0.3):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.h = nn.ModuleList(Residual(dim, p) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.wte(ids)
        for block in self.h:
            h = block(h)
        return self.lm_head(self.ln_f(h))


@pytest.mark.parametrize("plan", ["keep", "recompute"])
def test_dropout_is_replayed_exactly(plan):
    torch.manual_seed(0)
    model = DropoutLM()
    data = batches(3, vocab=64)
    torch.manual_seed(123)
    ref_losses, ref_state = plain_run(model, data, opt=OPT, clip=None)
    torch.manual_seed(123)
    losses, state, _ = horizon_run(model, data, config=horizon.TrainConfig(optimizer=OPT, plan=plan))
    assert len(set(ref_losses)) == 3
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 1e-6 * abs(want)
    for key in ref_state:
        assert rel_err(state[key], ref_state[key]) <= 1e-6, key


def test_optimizer_state_matches_torch():
    import copy

    import torch.nn.functional as F

    model = tiny_decoder(num_layers=2, tie_embeddings=True)
    data = batches(3)
    ref = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(ref.parameters(), lr=OPT.lr, betas=OPT.betas, weight_decay=OPT.weight_decay)
    for b in data:
        loss = F.cross_entropy(ref(b["input_ids"]).view(-1, 256), b["labels"].view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    names = {id(p): n for n, p in ref.named_parameters()}
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(optimizer=OPT)) as trainer:
        for b in data:
            trainer.step(b)
        state = trainer.optimizer_state_dict()["state"]
        assert set(state) == set(names.values())
        for p, s in optimizer.state.items():
            mine = state[names[id(p)]]
            assert float(mine["step"]) == float(s["step"]) == 3
            assert rel_err(mine["exp_avg"], s["exp_avg"]) <= 1e-6
            assert rel_err(mine["exp_avg_sq"], s["exp_avg_sq"]) <= 1e-6


@pytest.mark.parametrize("plan", ["keep", "recompute"])
def test_bf16_compute_on_cpu_is_within_the_error_of_torch_autocast(plan):
    """The bf16 path (bf16 compute copy and gradients, fp32 master) without a GPU."""
    import copy

    import torch.nn.functional as F

    model = tiny_decoder(num_layers=3, tie_embeddings=True)
    data = batches(6)

    def plain(autocast):
        ref = copy.deepcopy(model)
        opt = torch.optim.AdamW(ref.parameters(), lr=OPT.lr, betas=OPT.betas, weight_decay=OPT.weight_decay)
        losses = []
        for b in data:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = ref(b["input_ids"])
            loss = F.cross_entropy(logits.float().view(-1, 256), b["labels"].view(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        return losses, ref.state_dict()

    exact_losses, exact = plain(False)
    amp_losses, amp = plain(True)
    cfg = horizon.TrainConfig(optimizer=OPT, grad_clip_norm=1.0, plan=plan, compute_dtype=torch.bfloat16)
    losses, state, _ = horizon_run(model, data, config=cfg)
    amp_err = max(rel_err(amp[k], exact[k]) for k in exact)
    err = max(rel_err(state[k], exact[k]) for k in exact)
    assert err <= 2 * amp_err
    assert max(abs(a - e) for a, e in zip(losses, exact_losses)) <= 2 * max(
        abs(a - e) for a, e in zip(amp_losses, exact_losses)) + 1e-3
