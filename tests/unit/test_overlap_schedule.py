"""When the optimizer's work starts and how many cores it takes (the overlap of docs/optim.md).

Numbers are the race tests' business (tests/unit/test_race.py); these check the timeline: an eager
update starts as soon as its gradient is in the store, and the kernel's threads follow the policy.
"""

import threading
import time

import pytest
import torch
from torch import nn

import horizon
import horizon.optim.updater as updater_module
from horizon.engine.transfer import CpuTransfer, _copy_all

_BACKWARD_S = 0.15  # generous: a loaded machine may take tens of ms to wake a thread


class _Log(list):
    """Events from every thread; the trainer's copies of the blocks (templates) share this one."""

    def __deepcopy__(self, memo):
        return self


class _Timed(torch.autograd.Function):
    """Identity whose backward sleeps ``_BACKWARD_S`` and records when it ended."""

    @staticmethod
    def forward(ctx, x, weight, log):
        ctx.log = log
        return x * weight.sum().mul(0).add(1)

    @staticmethod
    def backward(ctx, grad_out):
        time.sleep(_BACKWARD_S)
        ctx.log.append(("backward_end", None, time.perf_counter()))
        return grad_out, torch.full((4,), 1e-3), None


class _Block(nn.Module):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.log = log

    def forward(self, x):
        return _Timed.apply(x, self.weight, self.log)


class _Chain(nn.Module):
    def __init__(self, layers: int, log: list) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(_Block(log) for _ in range(layers))
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 32, bias=False)


def _record_updates(monkeypatch, trainer, log):
    real = updater_module.adamw_unit_step

    def recorded(buffers, *args, **kwargs):
        unit = next(i for i, u in enumerate(trainer.store.units) if u.master.data_ptr() == buffers.master.data_ptr())
        log.append(("update_start", unit, time.perf_counter(), kwargs["num_threads"]))
        return real(buffers, *args, **kwargs)

    monkeypatch.setattr(updater_module, "adamw_unit_step", recorded)


def test_eager_update_starts_while_the_previous_block_computes(monkeypatch):
    """Unit u's update must start before the backward of the unit before it (u - 1) ends: it only
    waits for its own gradient's copy, not for the main thread to come back to that copy."""
    log = _Log()
    torch.manual_seed(0)
    layers = 4
    batch = {"input_ids": torch.randint(0, 32, (1, 8)), "labels": torch.randint(0, 32, (1, 8))}
    with horizon.Trainer(_Chain(layers, log), horizon.TrainConfig(plan="recompute", on_nonfinite="ignore")) as trainer:
        assert trainer.config.eager_updates
        _record_updates(monkeypatch, trainer, log)
        trainer.step(batch)
        trainer.updater.wait_all()
    starts = {unit: t for kind, unit, t, *_ in log if kind == "update_start"}
    # One template serves every block, so the blocks are told apart by order: backward runs L-1 .. 0.
    ends = dict(zip(reversed(range(layers)), [t for kind, _, t, *_ in log if kind == "backward_end"], strict=True))
    assert sorted(starts) == list(range(layers + 2))
    for block in range(1, layers):  # block b is unit b + 1; the block before it in backward is b - 1
        assert starts[block + 1] < ends[block - 1], (block, starts, ends)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "deferred"])
@pytest.mark.parametrize("cores,expected", [(4, (4, 3)), (2, (2, 1)), (1, (1, 1))])
def test_kernel_threads_follow_the_schedule(monkeypatch, cores, expected, eager):
    """Eager: embedding and first block take every core (nothing overlaps them), the others leave
    one to the engine. Deferred: every update takes every core (one forward compute to hide under)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    log = _Log()
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 32, (1, 8)), "labels": torch.randint(0, 32, (1, 8))}
    config = horizon.TrainConfig(plan="recompute", **({"on_nonfinite": "ignore"} if eager else {"grad_clip_norm": 1.0}))
    with horizon.Trainer(_Chain(3, log), config) as trainer:
        _record_updates(monkeypatch, trainer, log)
        trainer.step(batch)
        trainer.updater.wait_all()
    threads = {unit: n for kind, unit, _, *rest in log if kind == "update_start" for n in rest}
    head, rest = expected if eager else (cores, cores)
    assert trainer.config.eager_updates == eager
    assert threads == {0: head, 1: head, 2: rest, 3: rest, 4: rest}


def test_host_waiter_blocks_until_the_copy_is_done_on_any_thread():
    transfer = CpuTransfer(delay_s=lambda: 0.05)
    src, dst = torch.arange(1000, dtype=torch.float32), torch.zeros(1000)
    handle = transfer.d2h([dst], [src])
    seen = []
    waiter = threading.Thread(target=lambda: (handle.host_waiter()(), seen.append(dst.clone())))
    waiter.start()
    waiter.join()
    handle.wait_host()
    transfer.close()
    assert torch.equal(seen[0], src)


def test_cpu_copy_equals_copy_and_tells_autograd():
    src = torch.randn(3, 5)
    dst = torch.empty(3, 5)
    version = dst._version
    _copy_all([dst, torch.empty(5, 3).t()], [src, src.to(torch.float64)])  # the second one takes copy_
    assert torch.equal(dst, src) and dst._version == version + 1
