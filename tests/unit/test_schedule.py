"""LR schedules against their torch.optim.lr_scheduler counterparts, step by step."""

import dataclasses
import math

import pytest
import torch
from torch.optim import lr_scheduler as L

from horizon.optim.schedule import ConstantLR, Schedule, WarmupCosine, WarmupLinear

# torch's schedulers are recursive; lr_at is the closed form. Measured drift over whole schedules:
# <= 5e-14 relative at 1k steps, <= 1.6e-13 at 10k, up to 5e-12 at 100k (linear, near a zero
# floor). So 1e-12 holds with margin for schedules up to 10k steps, which is all we test.
REL = 1e-12

OPTIMIZERS = [torch.optim.SGD, torch.optim.AdamW]

# (warmup_steps, total_steps, min_lr_ratio, warmup_start_ratio)
PARAMS = [
    (10, 100, 0.0, 1e-3),
    (0, 100, 0.0, 1e-3),
    (0, 1000, 0.1, 1e-3),
    (100, 1000, 0.0, 1e-3),
    (100, 1000, 0.1, 0.01),
    (1, 2, 0.5, 0.5),
    (0, 1, 0.0, 1e-3),
    (999, 1000, 0.05, 1.0),
    (30, 1000, 1.0, 0.2),
]


def torch_lrs(make_scheduler, opt_cls, base_lr, steps):
    """The LR each of ``steps`` updates uses, scheduler.step() after every optimizer.step()."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = opt_cls([p], lr=base_lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return lrs


def torch_warmup(opt, sched: WarmupCosine | WarmupLinear, base_lr):
    w, t = sched.warmup_steps, sched.total_steps
    warm = L.LinearLR(opt, start_factor=sched.warmup_start_ratio, end_factor=1.0, total_iters=w)
    if isinstance(sched, WarmupCosine):
        decay = L.CosineAnnealingLR(opt, T_max=t - w, eta_min=sched.min_lr_ratio * base_lr)
    else:
        decay = L.LinearLR(opt, start_factor=1.0, end_factor=sched.min_lr_ratio, total_iters=t - w)
    return L.SequentialLR(opt, [warm, decay], milestones=[w])


def assert_matches(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        # exact zeros (a zero floor at total_steps) must agree exactly; rel_tol covers the rest
        assert math.isclose(a, b, rel_tol=REL, abs_tol=0.0), (step, a, b)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
@pytest.mark.parametrize("base_lr", [1e-3, 0.3])
def test_constant_matches_torch(opt_cls, base_lr):
    s = ConstantLR()
    theirs = torch_lrs(lambda opt: L.LambdaLR(opt, lambda _: 1.0), opt_cls, base_lr, 50)
    assert [s.lr_at(i, base_lr) for i in range(50)] == theirs
    assert s.lr_at(10**9, base_lr) == base_lr


@pytest.mark.parametrize("cls", [WarmupCosine, WarmupLinear])
@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "w{}-T{}-r{}-s{}".format(*p))
def test_warmup_matches_torch(cls, opt_cls, params):
    w, t, r, s0 = params
    base_lr = 3e-4
    sched = cls(warmup_steps=w, total_steps=t, min_lr_ratio=r, warmup_start_ratio=s0)
    # steps 0..total_steps inclusive: total_steps is the first step at the floor
    theirs = torch_lrs(lambda opt: torch_warmup(opt, sched, base_lr), opt_cls, base_lr, t + 1)
    assert_matches([sched.lr_at(i, base_lr) for i in range(t + 1)], theirs)


@pytest.mark.parametrize("cls", [WarmupCosine, WarmupLinear])
def test_long_schedule_within_tolerance(cls):
    base_lr = 1e-3
    sched = cls(warmup_steps=500, total_steps=10_000, min_lr_ratio=0.0)
    theirs = torch_lrs(lambda opt: torch_warmup(opt, sched, base_lr), torch.optim.SGD, base_lr, 10_001)
    assert_matches([sched.lr_at(i, base_lr) for i in range(10_001)], theirs)


@pytest.mark.parametrize("cls", [WarmupCosine, WarmupLinear])
def test_shape_and_floor(cls):
    base_lr = 2.0
    s = cls(warmup_steps=10, total_steps=110, min_lr_ratio=0.25)
    assert s.lr_at(0, base_lr) == pytest.approx(1e-3 * base_lr)
    assert s.lr_at(10, base_lr) == base_lr
    lrs = [s.lr_at(i, base_lr) for i in range(111)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))  # decay falls
    floor = 0.25 * base_lr
    assert lrs[110] == floor
    # past total_steps we clamp at the floor (torch's cosine would climb back up)
    assert all(s.lr_at(i, base_lr) == floor for i in (111, 200, 10**9))
    assert cls(warmup_steps=0, total_steps=5).lr_at(0, base_lr) == base_lr


def test_torch_cosine_climbs_past_t_max_but_we_clamp():
    base_lr = 1.0
    s = WarmupCosine(warmup_steps=0, total_steps=10)
    theirs = torch_lrs(lambda opt: torch_warmup(opt, s, base_lr), torch.optim.SGD, base_lr, 15)
    assert theirs[14] > theirs[10] == 0.0
    assert s.lr_at(14, base_lr) == 0.0


def test_frozen_keyword_only_and_alias():
    s = WarmupCosine(warmup_steps=1, total_steps=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.total_steps = 3
    with pytest.raises(TypeError):
        WarmupLinear(1, 2)
    assert isinstance(s, Schedule)
    assert isinstance(ConstantLR(), Schedule)


@pytest.mark.parametrize("cls", [WarmupCosine, WarmupLinear])
@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_steps=0, total_steps=0), "total_steps must be >= 1"),
    (dict(warmup_steps=0, total_steps=-5), "total_steps must be >= 1"),
    (dict(warmup_steps=-1, total_steps=10), "warmup_steps must be in"),
    (dict(warmup_steps=11, total_steps=10), "warmup_steps must be in"),
    (dict(warmup_steps=10, total_steps=10), "warmup_steps must be in"),
    (dict(warmup_steps=1.5, total_steps=10), "warmup_steps must be an int"),
    (dict(warmup_steps=True, total_steps=10), "warmup_steps must be an int"),
    (dict(warmup_steps=1, total_steps=10.0), "total_steps must be an int"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio=-0.1), "min_lr_ratio must be"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.5), "min_lr_ratio must be"),
    (dict(warmup_steps=1, total_steps=10, min_lr_ratio=math.nan), "min_lr_ratio must be"),
    (dict(warmup_steps=1, total_steps=10, warmup_start_ratio=0.0), "warmup_start_ratio must be"),
    (dict(warmup_steps=1, total_steps=10, warmup_start_ratio=1.1), "warmup_start_ratio must be"),
])
def test_bad_config_raises(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("sched", [ConstantLR(), WarmupCosine(warmup_steps=2, total_steps=10),
                                   WarmupLinear(warmup_steps=0, total_steps=10)])
@pytest.mark.parametrize("step, base_lr", [(-1, 1e-3), (1.0, 1e-3), (True, 1e-3),
                                           (0, -1e-3), (0, math.inf), (0, math.nan)])
def test_bad_lr_at_args_raise(sched, step, base_lr):
    with pytest.raises(ValueError, match="step must be|base_lr must be"):
        sched.lr_at(step, base_lr)
