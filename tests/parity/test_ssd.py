"""The SSD tier changes where the optimizer state lives, not the math: bitwise equal to RAM-resident training."""

import copy

import pytest
import torch

import horizon
from helpers import batches, tiny_decoder

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, weight_decay_exclude=(r"norm",))


def run(model, data, **config):
    with horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(optimizer=OPT, **config)) as trainer:
        losses = [trainer.step(b).loss for b in data]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        optim = trainer.optimizer_state_dict()["state"]
        ssd_units = sorted(trainer.store.ssd_units)
    return losses, state, optim, ssd_units


SCHEDULES = {
    "deferred+clip": dict(grad_clip_norm=1.0),
    "eager": dict(grad_clip_norm=None, on_nonfinite="ignore"),
    "accumulate": dict(grad_clip_norm=1.0, grad_accum_steps=2),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("units,io_buffers,backend", [("all", 2, "auto"), ((1, 3), 3, "python"), ("all", 2, "python")])
def test_ssd_resident_state_trains_bitwise_like_ram(tmp_path, schedule, units, io_buffers, backend):
    model = tiny_decoder(num_layers=3, tie_embeddings=schedule == "eager")
    data = batches(6, ignore_frac=0.1)
    ram = run(model, data, **SCHEDULES[schedule])
    ssd = run(model, data, **SCHEDULES[schedule],
              ssd=horizon.SSDConfig(dir=tmp_path, units=units, io_buffers=io_buffers, io_backend=backend))
    assert ssd[3] == ([0, 1, 2, 3, 4] if units == "all" else list(units))
    assert ssd[0] == ram[0]
    assert all(torch.equal(ssd[1][k], ram[1][k]) for k in ram[1])
    for name, state in ram[2].items():
        for role in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ssd[2][name][role], state[role]), (name, role)
        assert float(ssd[2][name]["step"]) == float(state["step"])
    assert list(tmp_path.iterdir()) == [], "the state file is removed at close"


def test_bf16_compute_copy_with_the_master_on_ssd_trains_bitwise_like_ram(tmp_path):
    model = tiny_decoder(num_layers=2, tie_embeddings=True)
    data = batches(4)
    config = dict(grad_clip_norm=1.0, compute_dtype=torch.bfloat16)
    ram = run(model, data, **config)
    ssd = run(model, data, **config, ssd=horizon.SSDConfig(dir=tmp_path, units="all"))
    assert ssd[0] == ram[0]
    assert all(ssd[1][k].dtype == torch.float32 and torch.equal(ssd[1][k], ram[1][k]) for k in ram[1])
    assert all(torch.equal(ssd[2][n]["exp_avg_sq"], s["exp_avg_sq"]) for n, s in ram[2].items())


def test_a_meta_device_model_is_initialised_on_ssd_as_in_ram(tmp_path):
    with torch.device("meta"):
        model = tiny_decoder(num_layers=2)
    data = batches(3)
    torch.manual_seed(5)
    ram = run(model, data, grad_clip_norm=1.0)
    torch.manual_seed(5)
    ssd = run(model, data, grad_clip_norm=1.0, ssd=horizon.SSDConfig(dir=tmp_path, units=[0, 2]))
    assert ssd[0] == ram[0]
    assert all(torch.equal(ssd[1][k], ram[1][k]) for k in ram[1])


def test_delays_in_the_optimizer_change_no_number(tmp_path):
    model = tiny_decoder(num_layers=3)
    data = batches(4)
    ram = run(model, data, grad_clip_norm=None, on_nonfinite="ignore")
    cfg = horizon.TrainConfig(optimizer=OPT, grad_clip_norm=None, on_nonfinite="ignore",
                              ssd=horizon.SSDConfig(dir=tmp_path))
    delays = iter([0.0, 0.02, 0.0, 0.01] * 100)
    with horizon.Trainer(copy.deepcopy(model), cfg, optimizer_delay_s=lambda: next(delays)) as trainer:
        losses = [trainer.step(b).loss for b in data]
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    assert losses == ram[0]
    assert all(torch.equal(state[k], ram[1][k]) for k in ram[1])


@pytest.mark.parametrize("eager", [False, True])
def test_each_unit_is_read_once_per_step_and_ahead_of_its_update(tmp_path, eager):
    model = tiny_decoder(num_layers=4)
    schedule = dict(grad_clip_norm=None, on_nonfinite="ignore") if eager else dict(grad_clip_norm=1.0)
    cfg = horizon.TrainConfig(optimizer=OPT, **schedule, ssd=horizon.SSDConfig(dir=tmp_path))
    with horizon.Trainer(copy.deepcopy(model), cfg) as trainer:
        tier = trainer.ssd
        reads, misses = [], []
        read, acquire = tier.io.read, tier.acquire

        def counting_read(file, buffer, offset):
            reads.append(offset)
            return read(file, buffer, offset)

        def checking_acquire(unit):
            if tier._find(unit) is None:
                misses.append(unit)
            return acquire(unit)

        tier.io.read, tier.acquire = counting_read, checking_acquire
        steps = 3
        for b in batches(steps):
            trainer.step(b)
        trainer.updater.wait_all()
    num_units = len(tier.units)
    assert num_units == 6
    # never twice per step (plus the read-ahead of the next step's first unit); at least every unit in
    # every step after the first (the pool holds 2 of 6 units; the first may find units left by initialisation)
    assert (steps - 1) * num_units <= len(reads) <= steps * num_units + 1, reads
    assert len(misses) <= 1, misses  # only the very first update can find nothing read ahead
