"""``horizon profile`` and ``horizon plan``: the saved profile, the printed plan, and the plan file driving a run."""

import dataclasses
import json

import pytest

import horizon
from helpers import batches, tiny_decoder
from horizon.cli.main import main
from horizon.cli.plan import unit_seconds
from horizon.cli.profile import load_profile
from horizon.planner import model_step_s, simulate
from horizon.engine.plan import RowSplit
from horizon.planner.simulate import chooser, intervals
from horizon.planner.schedule import value

P = horizon.ActivationPolicy
LAYERS, BATCH, SEQ = 3, 2, 32


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    rc = main(["profile", "--model", "tiny", "--num-layers", str(LAYERS), "--seq-len", str(SEQ), "--batch-size",
               str(BATCH), "--device", "cpu", "--cpu-link-gbps", "0.5", "--cpu-link-duplex", "--rounds", "2", "--out", str(path)])
    assert rc == 0
    return path


def _plan_json(capsys, argv):
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if rc == 0 else out


def test_profile_file_holds_exact_bytes_and_its_calibration(profile_path):
    record = json.loads(profile_path.read_text())
    profile = load_profile(str(profile_path))
    dim = horizon.models.decoder_config("tiny").dim
    assert [u.name for u in profile.units] == ["embed_tokens", *(f"layers.{i}" for i in range(LAYERS)), "lm_head"]
    assert profile.hidden_bytes == BATCH * SEQ * dim * 4 and profile.tokens == BATCH * SEQ
    assert record["cpu_link_duplex"] and profile.duplex  # the link was measured as two copy engines
    # On the CPU nothing is pinned: the store's link and a copy from fresh pageable memory of the same size
    # are both the throttled transfer.
    assert record["pinned"] is False
    assert 0.67 < profile.pageable_link_bytes_per_s / profile.link_bytes_per_s < 1.5
    block_bytes = sum(p.numel() for p in tiny_decoder(num_layers=LAYERS).layers[0].parameters()) * 4
    assert all(profile.units[u].weight_bytes == block_bytes for u in profile.blocks)
    # The compute scale makes the simulator reproduce the measured all-RECOMPUTE step, timed with no update
    # pending; the profile then meets the optimizer as a run of the default configuration does.
    recompute = {u: P.RECOMPUTE for u in profile.blocks}
    alone = dataclasses.replace(profile, update_schedule="none")
    assert simulate(alone, recompute, 2).step_s == pytest.approx(record["calibration"]["measured_step_s"], rel=1e-6)
    assert profile.update_schedule == horizon.TrainConfig().update_schedule != "none"
    # The update is timed per parameter: every unit's seconds are its parameters times one rate.
    numels = [u.grad_bytes // 4 for u in profile.units]
    assert all(u.update_s > 0 and u.update_overlap_s > 0 for u in profile.units)
    assert all(u.update_s / n == pytest.approx(profile.units[1].update_s / numels[1], rel=1e-9)
               for u, n in zip(profile.units, numels))


def test_plan_fits_the_budget_its_table_adds_up_and_its_file_drives_a_run(profile_path, tmp_path, capsys):
    profile = load_profile(str(profile_path))
    low = simulate(profile, {u: P.RECOMPUTE for u in profile.blocks}, 2).peak_bytes
    high = simulate(profile, {u: P.KEEP for u in profile.blocks}, 2).peak_bytes
    budget, out = (low + high) // 2, tmp_path / "plan.json"
    rc, r = _plan_json(capsys, ["plan", "--profile", str(profile_path), "--budget", str(budget), "--out", str(out)])
    assert rc == 0 and r["peak_bytes"] <= budget < r["baselines"]["keep"]["peak_bytes"]
    assert r["baselines"]["recompute"]["fits"] and not r["baselines"]["keep"]["fits"]
    policies = {u: RowSplit(row["keep"], row["swap"], row["input_on_device"]) for u, row in zip(profile.blocks, r["units"])}
    resident = [u for u, unit in enumerate(profile.units) if unit.name in r["resident"]]
    assert r["model_step_s"] == pytest.approx(model_step_s(profile, policies, r["num_slots"], resident), rel=1e-9)
    # Per-unit seconds plus the prologue (weights issued before the first unit) are the step.
    prologue = intervals(profile, r["num_slots"], resident)[0]
    choose = chooser(policies)
    prologue_s = value(prologue.h2d, choose) / profile.link_bytes_per_s
    assert sum(unit_seconds(profile, policies, r["num_slots"], resident).values()) + prologue_s == pytest.approx(
        r["model_step_s"], rel=1e-9)
    with horizon.Trainer(tiny_decoder(num_layers=LAYERS), horizon.TrainConfig(plan=str(out))) as t:
        assert t.engine.plan.num_slots == r["num_slots"] and list(t.engine.plan.resident) == r["resident"]
        assert [t.engine.plan.split(row["unit"]) for row in r["units"]] == list(policies.values())
        t.step(batches(1, batch=BATCH, seq=SEQ)[0])
        assert t.memory().device_peak_bytes == r["peak_bytes"]


def test_a_slow_link_and_memory_to_spare_make_units_resident(profile_path, tmp_path, capsys):
    """On one copy queue at 1 MB/s the copies set the step; with the budget of all-KEEP and then some, the
    plan keeps units resident, and says so; its file drives a run at the predicted peak. (On a duplex link
    with nothing but weights and gradients it would not: a backward position's gradient going out takes as
    long as the weights coming in that residency saves.)"""
    record = json.loads(profile_path.read_text())
    record["profile"]["link_bytes_per_s"], record["profile"]["duplex"] = 1e6, False
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(record))
    profile = load_profile(str(slow))
    budget, out = 4 * simulate(profile, {u: P.KEEP for u in profile.blocks}, 3).peak_bytes, tmp_path / "plan.json"
    rc, r = _plan_json(capsys, ["plan", "--profile", str(slow), "--budget", str(budget), "--out", str(out)])
    assert rc == 0 and r["resident"] and r["peak_bytes"] <= budget
    assert r["simulated_step_s"] < r["baselines"]["keep"]["simulated_step_s"]
    assert main(["plan", "--profile", str(slow), "--budget", str(budget)]) == 0
    assert "resident on the device" in capsys.readouterr().out
    with horizon.Trainer(tiny_decoder(num_layers=LAYERS), horizon.TrainConfig(plan=str(out))) as t:
        t.step(batches(1, batch=BATCH, seq=SEQ)[0])
        assert t.memory().device_peak_bytes == r["peak_bytes"] and t.memory().resident_bytes > 0


def test_grad_accum_prices_resident_units_loaded_once_per_update(profile_path, tmp_path, capsys):
    """--grad-accum K plans for K micro-batches per update: the prediction is the mean step of such a window
    (resident units loaded by its first step only), as the simulator gives it for that profile."""
    profile = load_profile(str(profile_path))
    budget = 4 * simulate(profile, {u: P.KEEP for u in profile.blocks}, 3).peak_bytes
    rc, r = _plan_json(capsys, ["plan", "--profile", str(profile_path), "--budget", str(budget), "--grad-accum", "4"])
    assert rc == 0 and r["accumulation"] == 4
    windowed = dataclasses.replace(profile, accumulation=4)
    policies = {u: RowSplit(row["keep"], row["swap"], row["input_on_device"])
                for u, row in zip(profile.blocks, r["units"])}
    resident = [u for u, unit in enumerate(profile.units) if unit.name in r["resident"]]
    predicted = simulate(windowed, policies, r["num_slots"], resident).step_s
    assert r["simulated_step_s"] == pytest.approx(predicted, rel=1e-9)
    with pytest.raises(SystemExit):
        main(["plan", "--profile", str(profile_path), "--budget", str(budget), "--grad-accum", "0"])


def test_table_names_every_block_and_both_baselines(profile_path, capsys):
    profile = load_profile(str(profile_path))
    budget = simulate(profile, {u: P.KEEP for u in profile.blocks}, 3).peak_bytes
    assert main(["plan", "--profile", str(profile_path), "--budget", str(budget), "--solver", "greedy"]) == 0
    out = capsys.readouterr().out
    assert all(f"layers.{i}" in out for i in range(LAYERS)) and "all-RECOMPUTE" in out and "all-KEEP" in out


def test_bad_inputs_say_what_to_do(profile_path, tmp_path, capsys):
    assert main(["plan", "--profile", str(profile_path), "--budget", "1000"]) == 2
    assert "smallest budget that works" in capsys.readouterr().err
    not_a_profile = tmp_path / "x.json"
    not_a_profile.write_text("{}")
    assert main(["plan", "--profile", str(not_a_profile), "--budget", "1GiB"]) == 2
    assert "horizon profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--profile", str(profile_path), "--budget", "1GiB", "--slots", "1"])
    with pytest.raises(SystemExit):
        main(["profile", "--model", "tiny", "--seq-len", "8", "--device", "cuda", "--cpu-link-gbps", "1", "--out", "p"])
    with pytest.raises(SystemExit):
        main(["profile", "--model", "tiny", "--seq-len", "8", "--device", "cuda", "--cpu-link-duplex", "--out", "p"])
