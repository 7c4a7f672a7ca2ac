"""Accumulation, schedules, weight-decay exclusions and non-finite gradients against plain PyTorch."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import horizon
from horizon.optim.schedule import WarmupCosine
from horizon.optim.updater import NonFiniteGradientError
from helpers import batches, horizon_run, plain_run, rel_err, tiny_decoder

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _concat(micro):
    return {k: torch.cat([b[k] for b in micro]) for k in ("input_ids", "labels")}


def _store_grads(trainer, role):
    """The store's gradient buffers by model parameter name."""
    name_of = {p.data_ptr(): n for n, p in trainer.model.named_parameters()}
    out = {}
    for unit in trainer.store.units:
        masters = unit.views(unit.master)
        for local, grad in unit.views(getattr(unit, role)).items():
            out[name_of[masters[local].data_ptr()]] = grad.clone()
    return out


def test_accumulated_gradient_equals_the_large_batch_gradient():
    model = tiny_decoder(num_layers=3, tie_embeddings=True)
    micro = batches(3, ignore_frac=0.3)  # uneven label counts: a mean of means would differ
    ref = copy.deepcopy(model)
    big = _concat(micro)
    F.cross_entropy(ref(big["input_ids"]).view(-1, 256), big["labels"].view(-1)).backward()
    cfg = horizon.TrainConfig(optimizer=horizon.AdamW(lr=0.0, weight_decay=0.0), grad_accum_steps=3)
    with horizon.Trainer(copy.deepcopy(model), cfg) as trainer:
        for b in micro:
            trainer.step(b)
        trainer.state_dict()  # waits for the worker's folds
        sums = _store_grads(trainer, "grad_accum")
    labels = sum(int((b["labels"] != -100).sum()) for b in micro)
    for name, p in ref.named_parameters():
        assert rel_err(sums[name] / labels, p.grad) <= 1e-6, name


@pytest.mark.parametrize("clip", [None, 0.5])
def test_accumulating_k_micro_batches_equals_one_large_batch(clip):
    """After updates, compared with one large batch and with torch's own accumulation.

    Adam's first steps amplify rounding in gradients near eps (update = lr·g/(|g|+eps)), so even
    torch's own micro-batch accumulation differs from the large batch by ~1e-6 here; Horizon's
    must stay within 1e-6 or within 10x of torch's own largest difference.
    """
    model = tiny_decoder(num_layers=3, tie_embeddings=True)
    micro = batches(9, ignore_frac=0.3)
    large = [_concat(micro[i:i + 3]) for i in range(0, 9, 3)]
    ref_losses, ref_state = plain_run(model, large, opt=OPT, clip=clip)
    torch_accum = _torch_accumulation(model, micro, clip=clip)
    cfg = horizon.TrainConfig(optimizer=OPT, grad_clip_norm=clip, grad_accum_steps=3)
    with horizon.Trainer(copy.deepcopy(model), cfg) as trainer:
        metrics = [trainer.step(b) for b in micro]
        state = trainer.state_dict()
        assert [m.updated for m in metrics] == [False, False, True] * 3
        assert trainer.global_step == 3
        assert trainer.memory().host_bytes_by_role["grad_accum"] == trainer.store.bytes_by_role["master"]
    for m, want in zip(metrics[2::3], ref_losses):
        assert abs(m.loss - want) <= 1e-6 * want
    torch_own = max(rel_err(torch_accum[k], ref_state[k]) for k in ref_state)
    ours = max(rel_err(state[k], ref_state[k]) for k in ref_state)
    assert ours <= max(1e-6, 10 * torch_own)


def _torch_accumulation(model, micro, *, clip):
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=OPT.lr, betas=OPT.betas, eps=OPT.eps, weight_decay=OPT.weight_decay)
    for i in range(0, len(micro), 3):
        group = micro[i:i + 3]
        total = sum(int((b["labels"] != -100).sum()) for b in group)
        opt.zero_grad()
        for b in group:
            logits = ref(b["input_ids"])
            (F.cross_entropy(logits.view(-1, 256), b["labels"].view(-1), reduction="sum") / total).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}


def test_lr_schedule_steps_like_torch_schedulers():
    model = tiny_decoder(num_layers=2)
    data = batches(8)
    schedule = WarmupCosine(warmup_steps=3, total_steps=8, min_lr_ratio=0.1)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=OPT.lr, betas=OPT.betas, weight_decay=OPT.weight_decay)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=schedule.warmup_start_ratio, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.1 * OPT.lr)], milestones=[3])
    ref_lrs = []
    for b in data:
        loss = F.cross_entropy(ref(b["input_ids"]).view(-1, 256), b["labels"].view(-1))
        opt.zero_grad()
        loss.backward()
        ref_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(optimizer=OPT, lr_schedule=schedule)) as t:
        lrs = [t.step(b).lr for b in data]
        state = t.state_dict()
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lrs, ref_lrs))
    ref_state = ref.state_dict()
    assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)


def test_weight_decay_exclusions_match_torch_param_groups():
    model = tiny_decoder(num_layers=2)
    data = batches(5)
    opt_cfg = horizon.AdamW(lr=1e-2, weight_decay=0.5, weight_decay_exclude=(r"norm", r"embed"))
    ref = copy.deepcopy(model)
    no_decay = [p for n, p in ref.named_parameters() if "norm" in n or "embed" in n]
    decay = [p for n, p in ref.named_parameters() if not ("norm" in n or "embed" in n)]
    assert no_decay and decay
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2,
                            weight_decay=0.5)
    for b in data:
        loss = F.cross_entropy(ref(b["input_ids"]).view(-1, 256), b["labels"].view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, state, _ = horizon_run(model, data, config=horizon.TrainConfig(optimizer=opt_cfg))
    _, all_decay, _ = horizon_run(model, data, config=horizon.TrainConfig(optimizer=horizon.AdamW(
        lr=1e-2, weight_decay=0.5)))
    ref_state = ref.state_dict()
    assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)
    assert rel_err(all_decay["norm.weight"], ref_state["norm.weight"]) > 1e-3  # the exclusion mattered


def test_eager_updates_match_plain_pytorch():
    model = tiny_decoder(num_layers=3, tie_embeddings=True)
    data = batches(6)
    ref_losses, ref_state = plain_run(model, data, opt=OPT, clip=None)
    cfg = horizon.TrainConfig(optimizer=OPT, on_nonfinite="ignore")
    assert cfg.eager_updates
    losses, state, _ = horizon_run(model, data, config=cfg)
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) <= 1e-6
    assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)


def _poison(trainer, unit=2):
    """Make one element of a unit's gradient NaN on the device, as the engine lands it."""
    traffic = trainer.engine.traffic
    land_grads = traffic.land_grads

    def poisoned(sweep, u, grads):
        if u == unit:
            grads[0] = grads[0].clone()
            grads[0].view(-1)[5] = float("nan")
        return land_grads(sweep, u, grads)

    traffic.land_grads = poisoned


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nan_gradient_skips_the_update_and_changes_nothing(clip):
    model = tiny_decoder(num_layers=3)
    data = batches(2)
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(optimizer=OPT, grad_clip_norm=clip)) as t:
        t.step(data[0])
        before = {k: v.clone() for k, v in t.state_dict().items()}
        moments = {k: v["exp_avg"].clone() for k, v in t.optimizer_state_dict()["state"].items()}
        _poison(t)
        m = t.step(data[1])
        assert m.skipped and not m.updated and math.isnan(m.grad_norm)
        assert t.global_step == 1 and t.skipped_steps == 1
        assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
        state = t.optimizer_state_dict()["state"]
        assert all(torch.equal(moments[k], state[k]["exp_avg"]) and float(state[k]["step"]) == 1 for k in state)


def test_nan_gradient_raises_when_asked_and_changes_nothing():
    with horizon.Trainer(tiny_decoder(num_layers=3), horizon.TrainConfig(on_nonfinite="raise")) as t:
        before = {k: v.clone() for k, v in t.state_dict().items()}
        _poison(t)
        with pytest.raises(NonFiniteGradientError, match="nothing was updated"):
            t.step(batches(1)[0])
        assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


@pytest.mark.parametrize("kernel", ["native", "fallback"])
@pytest.mark.parametrize("clip,exclude", [(None, ()), (1.0, ()), (1.0, ("norm",))])
def test_ten_steps_match_torch_adamw_with_either_kernel(monkeypatch, kernel, clip, exclude):
    import horizon.optim.native as native

    if kernel == "native" and not native.native_available():
        pytest.skip("the native extension is not built here")
    if kernel == "fallback":
        monkeypatch.setattr(native, "_native", None)
    model = tiny_decoder(num_layers=2, tie_embeddings=True)
    data = batches(10)
    opt_cfg = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, weight_decay_exclude=exclude)
    ref = copy.deepcopy(model)
    groups = [{"params": [p for n, p in ref.named_parameters() if opt_cfg.decays(n)]},
              {"params": [p for n, p in ref.named_parameters() if not opt_cfg.decays(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for b in data:
        loss = F.cross_entropy(ref(b["input_ids"]).view(-1, 256), b["labels"].view(-1))
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
    _, state, _ = horizon_run(model, data, config=horizon.TrainConfig(optimizer=opt_cfg, grad_clip_norm=clip))
    ref_state = ref.state_dict()
    assert all(rel_err(state[k], ref_state[k]) <= 1e-6 for k in ref_state)


def test_optimizer_threads_follow_affinity_and_local_ranks(monkeypatch):
    import os

    from horizon.optim.adamw import optimizer_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's setting must not shrink the optimizer
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert optimizer_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert optimizer_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert optimizer_threads() == 1
