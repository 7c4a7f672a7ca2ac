"""SSDConfig(weights=True): compute copies and gradients stream through SSD too; training is bitwise RAM's."""

import copy

import pytest
import torch

import horizon
from helpers import batches, tiny_decoder

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, weight_decay_exclude=(r"norm",))
CLIP = dict(grad_clip_norm=1.0)                           # deferred: gradients spilled to SSD until the norm is known
EAGER = dict(grad_clip_norm=None, on_nonfinite="ignore")  # eager: each gradient consumed by its update as it lands


def run(model, data, *, trainer_kwargs=None, **config):
    cfg = horizon.TrainConfig(optimizer=OPT, **config)
    with horizon.Trainer(copy.deepcopy(model), cfg, **(trainer_kwargs or {})) as trainer:
        losses = [trainer.step(b).loss for b in data]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        optim = trainer.optimizer_state_dict()["state"]
        streamed = sorted(trainer.store.streamed)
    return losses, state, optim, streamed


def assert_same(ssd, ram):
    assert ssd[0] == ram[0]
    assert ssd[1].keys() == ram[1].keys()
    for k in ram[1]:
        assert ssd[1][k].dtype == torch.float32 and torch.equal(ssd[1][k], ram[1][k]), k
    for name, state in ram[2].items():
        for role in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ssd[2][name][role], state[role]), (name, role)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("schedule", [CLIP, EAGER], ids=["clip", "eager"])
def test_streamed_weights_train_bitwise_like_ram(tmp_path, dtype, schedule):
    model = tiny_decoder(num_layers=3)
    data = batches(5, ignore_frac=0.1)
    ram = run(model, data, compute_dtype=dtype, **schedule)
    ssd = run(model, data, compute_dtype=dtype, **schedule,
              ssd=horizon.SSDConfig(dir=tmp_path, weights=True, io_backend="python" if dtype == torch.float32 else "auto"))
    assert ssd[3] == [0, 1, 2, 3, 4]
    assert_same(ssd, ram)
    assert list(tmp_path.iterdir()) == [], "the file is removed at close"


def test_a_tied_embedding_keeps_its_compute_copy_in_ram_and_the_rest_streams(tmp_path):
    model = tiny_decoder(num_layers=2, tie_embeddings=True)
    data = batches(4)
    ram = run(model, data, compute_dtype=torch.bfloat16, **CLIP)
    ssd = run(model, data, compute_dtype=torch.bfloat16, **CLIP, ssd=horizon.SSDConfig(dir=tmp_path, weights=True))
    assert ssd[3] == [1, 2, 3], "the embedding (borrowed by the head) is not streamed"
    assert_same(ssd, ram)


def test_some_units_streamed_with_delays_everywhere_change_no_number(tmp_path):
    """Slow optimizer tasks and a slow transfer thread reorder reads, updates, write-backs and copies."""
    model = tiny_decoder(num_layers=4)
    data = batches(4)
    ram = run(model, data, **EAGER)
    delays = iter([0.0, 0.01, 0.0, 0.005] * 200)
    copies = iter([0.004, 0.0, 0.0] * 400)
    kwargs = dict(optimizer_delay_s=lambda: next(delays),
                  transfer=horizon.engine.transfer.CpuTransfer(delay_s=lambda: next(copies)))
    ssd = run(model, data, **EAGER, trainer_kwargs=kwargs,
              ssd=horizon.SSDConfig(dir=tmp_path, units=[1, 3, 4], weights=True, weight_buffers=2))
    assert ssd[3] == [1, 3, 4]
    assert_same(ssd, ram)


def test_a_meta_device_model_is_initialised_unit_by_unit_as_in_ram(tmp_path):
    with torch.device("meta"):
        model = tiny_decoder(num_layers=2)
    data = batches(3)
    torch.manual_seed(5)
    ram = run(model, data, **CLIP)
    torch.manual_seed(5)
    ssd = run(model, data, **CLIP, ssd=horizon.SSDConfig(dir=tmp_path, units=[0, 2, 3], weights=True))
    assert_same(ssd, ram)


def test_the_model_holds_placeholders_and_ram_holds_no_streamed_buffer(tmp_path):
    model = tiny_decoder(num_layers=2)
    cfg = horizon.TrainConfig(optimizer=OPT, **CLIP, ssd=horizon.SSDConfig(dir=tmp_path, units=[1, 2], weights=True))
    with horizon.Trainer(model, cfg) as trainer:
        for u, unit in enumerate(trainer.store.units):
            streamed = u in (1, 2)
            assert (unit.master is None and unit.grad is None and unit.compute is None) == streamed
            assert all(p.is_meta == streamed for p in trainer.store.parameters[u].values())
        trainer.step(batches(1)[0])
        assert all(not torch.equal(v, torch.zeros_like(v)) for v in trainer.state_dict().values())


def test_weights_refuse_what_they_cannot_do_yet(tmp_path):
    ssd = horizon.SSDConfig(dir=tmp_path, weights=True)
    with pytest.raises(ValueError, match="grad_accum_steps > 1"):
        horizon.TrainConfig(ssd=ssd, grad_accum_steps=2)
    with pytest.raises(ValueError, match='plan="auto"'):
        horizon.TrainConfig(ssd=ssd, plan="auto", device_memory_budget_bytes=1 << 30)
    with pytest.raises(ValueError, match="weight_buffers must be an int >= 2"):
        horizon.SSDConfig(dir=tmp_path, weights=True, weight_buffers=1)
    with pytest.raises(ValueError, match="weights must be True or False"):
        horizon.SSDConfig(dir=tmp_path, weights="yes")


@pytest.mark.parametrize("schedule", [CLIP, EAGER], ids=["clip", "eager"])
def test_streamed_units_can_be_resident(tmp_path, schedule):
    """A resident unit (Plan.resident) whose weights stream from SSD: its one load a step reads the window
    in step order like any other (WeightStream is told only the positions that load); bitwise RAM's."""
    model = tiny_decoder(num_layers=3)
    data = batches(4)
    plan = horizon.Plan(default=horizon.ActivationPolicy.KEEP, resident=("embed_tokens", "layers.0", "layers.2"))
    ram = run(model, data, plan=plan, **schedule)
    ssd = run(model, data, plan=plan, **schedule, ssd=horizon.SSDConfig(dir=tmp_path, weights=True, weight_buffers=2))
    assert ssd[3] == [0, 1, 2, 3, 4]
    assert_same(ssd, ram)
    assert_same(run(model, data, **schedule), ram)  # and resident or not, the same numbers
