"""The estimate of a run with an SSD tier: RAM, pinned and SSD bytes by role equal what the trainer allocates
and the exact size of the file it writes."""

import json
import os

import pytest
import torch

import horizon
from helpers import batches, tiny_decoder
from horizon.cli.main import main
from horizon.estimate import estimate_memory
from horizon.models.units import find_units
from horizon.store.layout import plan_layouts
from horizon.store.ssd_placement import ram_bytes

PLACEMENTS = {
    "all": dict(units="all"),
    "some": dict(units=[1, 2]),
    "all+weights": dict(units="all", weights=True),
    "some+weights": dict(units=[0, 2, 3], weights=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "eager"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_estimate_equals_the_trainers_bytes_and_the_file_size(tmp_path, placement, clip, dtype):
    tie = placement == "some+weights"
    model = tiny_decoder(num_layers=2, tie_embeddings=tie)
    schedule = dict(grad_clip_norm=1.0) if clip else dict(grad_clip_norm=None, on_nonfinite="ignore")
    cfg = horizon.TrainConfig(compute_dtype=dtype, **schedule,
                              ssd=horizon.SSDConfig(dir=tmp_path, **PLACEMENTS[placement]))
    batch = batches(1)[0]
    with torch.device("meta"):  # (Module.to("meta") would untie the embedding)
        meta = tiny_decoder(num_layers=2, tie_embeddings=tie)
    estimate = estimate_memory(meta, cfg, batch_size=batch["input_ids"].shape[0],
                               seq_len=batch["input_ids"].shape[1])
    with horizon.Trainer(model, cfg) as trainer:
        trainer.step(batch)
        mem = trainer.memory()
        assert estimate.ssd_units == tuple(sorted(trainer.store.ssd_units))
        assert estimate.host_bytes_by_role == mem.host_bytes_by_role
        assert estimate.ssd_bytes_by_role == mem.ssd_bytes_by_role
        assert estimate.ssd_bytes == os.path.getsize(trainer.ssd.file.path)
        assert estimate.pinned_bytes == 0  # on CPU nothing is pinned


def test_auto_placement_is_the_trainers_under_the_same_budget(tmp_path):
    model = tiny_decoder(num_layers=4)
    specs = find_units(model)
    layouts = plan_layouts([s.name for s in specs], [s.module for s in specs])
    budget = ram_bytes(layouts, torch.float32, accumulate=False, ssd_units=frozenset({1, 2, 3, 4}), io_buffers=2,
                       weights=True, spill_grads=True)
    cfg = horizon.TrainConfig(grad_clip_norm=1.0, host_memory_budget_bytes=budget,
                              ssd=horizon.SSDConfig(dir=tmp_path, units="auto", weights=True))
    with torch.device("meta"):
        meta = tiny_decoder(num_layers=4)
    estimate = estimate_memory(meta, cfg, batch_size=2, seq_len=16)
    with horizon.Trainer(model, cfg) as trainer:
        assert estimate.ssd_units == tuple(sorted(trainer.store.ssd_units))
        assert 0 < len(estimate.ssd_units) < len(layouts)
        assert estimate.ssd_bytes == os.path.getsize(trainer.ssd.file.path)
    assert estimate.host_bytes - estimate.host_bytes_by_role["activations"] <= budget


def test_cli_reports_ssd_bytes_by_role_for_a_placement(tmp_path, capsys):
    argv = ["estimate", "--model", "tiny", "--seq-len", "64", "--device", "cpu", "--ssd-path", str(tmp_path),
            "--ssd-units", "all", "--ssd-weights", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        model = horizon.models.Decoder(horizon.models.decoder_config("tiny"))
    cfg = horizon.TrainConfig(device="cpu", plan=horizon.Plan.uniform("recompute", num_slots=2),
                              ssd=horizon.SSDConfig(dir=tmp_path, units="all", weights=True))
    want = estimate_memory(model, cfg, batch_size=1, seq_len=64)
    assert r["ssd_bytes_by_role"] == want.ssd_bytes_by_role and r["ssd_bytes"] == sum(want.ssd_bytes_by_role.values())
    assert set(r["ssd_bytes_by_role"]) == {"master", "exp_avg", "exp_avg_sq", "grad"}, "fp32 on CPU: no own compute copy"
    assert r["host_bytes_by_role"]["master"] == 0 and r["host_bytes_by_role"]["ssd_weight_window"] > 0
    assert r["ssd_units"] == list(range(len(r["ssd_units"]))) and "ssd" in r["derivation"]


@pytest.mark.parametrize("argv,message", [
    (["--ssd-units", "auto"], "give --host-ram too"),
    (["--ssd-weights"], "give --ssd-units too"),
    (["--ssd-units", "one"], "write all, auto or unit indices"),
])
def test_cli_ssd_arguments_say_the_fix(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["estimate", "--model", "tiny", "--seq-len", "64"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
