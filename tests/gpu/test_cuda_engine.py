"""The CUDA path: bf16 numerics, memory bounded by the plan, overlap that changes no number.

Skipped without CUDA; run on a GPU machine with ``pytest tests/gpu``.
"""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

import horizon
from helpers import batches, tiny_decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _plain_losses(model, data, *, device, autocast):
    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPT.lr, betas=OPT.betas, weight_decay=OPT.weight_decay)
    losses = []
    for b in data:
        x, y = b["input_ids"].to(device), b["labels"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.float().cpu() for k, v in model.state_dict().items()}


def _horizon(model, data, optimizer_delay_s=None, **cfg):
    config = horizon.TrainConfig(device="cuda", optimizer=OPT, grad_clip_norm=1.0, **cfg)
    with horizon.Trainer(copy.deepcopy(model), config, optimizer_delay_s=optimizer_delay_s) as t:
        losses = [t.step(b).loss for b in data]
        return losses, {k: v.detach().clone() for k, v in t.state_dict().items()}, t.memory()


def _err(state, ref):
    return max(float((state[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


@pytest.mark.parametrize("plan", ["keep", "recompute"])
def test_bf16_within_the_error_of_torch_autocast(plan):
    model = tiny_decoder(num_layers=3, dim=128, num_heads=4, num_kv_heads=2, ffn_dim=256, tie_embeddings=True)
    data = batches(10, seq=64)
    cuda = torch.device("cuda")
    exact_losses, exact = _plain_losses(model, data, device=cuda, autocast=False)
    amp_losses, amp = _plain_losses(model, data, device=cuda, autocast=True)
    losses, state, _ = _horizon(model, data, plan=plan)
    amp_loss_err = max(abs(a - e) for a, e in zip(amp_losses, exact_losses))
    loss_err = max(abs(a - e) for a, e in zip(losses, exact_losses))
    assert loss_err <= 2 * amp_loss_err + 1e-3
    assert _err(state, exact) <= 2 * _err(amp, exact) + 1e-4


def test_fp32_on_cuda_matches_plain_fp32():
    model = tiny_decoder(num_layers=3)
    data = batches(5)
    ref_losses, ref = _plain_losses(model, data, device=torch.device("cuda"), autocast=False)
    losses, state, _ = _horizon(model, data, plan="recompute", compute_dtype=torch.float32)
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) <= 1e-5
    assert _err(state, ref) <= 1e-5


def _one_block_training_peak_bytes(model, batch, seq):
    """Allocator peak of one block's plain forward + backward in bf16 (weights, grads, activations, workspaces)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    block = copy.deepcopy(model.layers[0]).to("cuda", torch.bfloat16)
    x = torch.randn(batch, seq, model.layers[0].attention.wq.in_features, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    block(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del block, x
    return peak


def test_device_peak_does_not_grow_with_depth_and_stays_within_the_ledger():
    reports = []
    for layers in (4, 16):
        gc.collect()  # the last trainer's slots must be gone, not freed midway through this one
        torch.cuda.empty_cache()
        model = tiny_decoder(num_layers=layers, dim=256, num_heads=8, num_kv_heads=4, ffn_dim=704)
        workspace = _one_block_training_peak_bytes(model, 4, 128)
        with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(device="cuda", plan="recompute")) as t:
            for b in batches(2, batch=4, seq=128):
                t.step(b)
            reports.append((t.memory().device_peak_bytes, t.engine.ledger.peak_bytes, workspace))
    assert reports[0][0] == reports[1][0]
    # What Horizon holds is in its ledger; beyond it, at most one unit's own training workspace.
    for peak, ledger_peak, workspace in reports:
        assert ledger_peak < peak <= ledger_peak + workspace


@pytest.mark.parametrize("where", ["compute", "copies", "optimizer"])
def test_injected_delays_change_no_number(monkeypatch, where):
    """GPU busy-waits before each block or before each copy, or host sleeps before each update:
    copies overtake compute (or the reverse) and updates finish late; no number may change."""
    import random

    from horizon.engine.transfer import CudaTransfer
    from horizon.models import units as units_module

    model = tiny_decoder(num_layers=4, dim=128, num_heads=4, num_kv_heads=2, ffn_dim=256)
    data = batches(3, seq=64)
    calm = _horizon(model, data, plan="recompute")
    delay_s = None
    if where == "compute":
        block = units_module._call_block

        def slow_block(module, x):
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU busy-wait on the compute stream
            return block(module, x)

        monkeypatch.setattr(units_module, "_call_block", slow_block)
    elif where == "copies":
        enqueue = CudaTransfer._enqueue

        def slow_enqueue(stream, compute_ready, dsts, srcs, after=()):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(1_000_000)  # the copy stream starts late
            return enqueue(stream, compute_ready, dsts, srcs, after)

        monkeypatch.setattr(CudaTransfer, "_enqueue", staticmethod(slow_enqueue))
    else:
        rng = random.Random(0)
        delay_s = lambda: rng.uniform(0, 0.005)  # noqa: E731
    stormy = _horizon(model, data, plan="recompute", optimizer_delay_s=delay_s)
    # GPU attention backward may reduce in a different order run to run: compare tightly, not bitwise.
    # A missing wait shows up as stale weights or gradients, far beyond this tolerance.
    assert max(abs(a - b) for a, b in zip(calm[0], stormy[0])) <= 1e-4
    assert _err(stormy[1], calm[1]) <= 1e-4


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resident_units_on_cuda_change_no_number(monkeypatch, grad_accum):
    """A resident unit's buffer is written once per update (each step without accumulation) and read by
    its forward and its backward: with the compute stream slowed before each block, a load that did not
    wait for the last read of the buffer, or a micro-batch that skipped a load it needed, would show."""
    from horizon.models import units as units_module

    model = tiny_decoder(num_layers=4, dim=128, num_heads=4, num_kv_heads=2, ffn_dim=256)
    data = batches(4, seq=64)
    keep = dict(default=horizon.ActivationPolicy.KEEP)
    streamed = _horizon(model, data, plan=horizon.Plan(**keep), grad_accum_steps=grad_accum)
    block = units_module._call_block

    def slow_block(module, x):
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU busy-wait on the compute stream
        return block(module, x)

    monkeypatch.setattr(units_module, "_call_block", slow_block)
    plan = horizon.Plan(**keep, resident=("embed_tokens", "layers.0", "layers.3", "lm_head"))
    resident = _horizon(model, data, plan=plan, grad_accum_steps=grad_accum)
    assert max(abs(a - b) for a, b in zip(streamed[0], resident[0])) <= 1e-4
    assert _err(resident[1], streamed[1]) <= 1e-4
    assert resident[2].resident_bytes > 0


def test_host_store_is_pinned():
    with horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(device="cuda")) as t:
        assert t.store.pinned
        assert t.store.units[1].compute.is_pinned() and t.store.units[1].grad.is_pinned()
        assert t.store.units[1].compute.dtype == torch.bfloat16
