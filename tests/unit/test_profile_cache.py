"""plan="auto" measures a profile once per model shape, batch shape, link and machine, and loads it after
(horizon/planner/cache.py): counted calls of the real measurement, the cached record against what was
measured, a key for every input the measurement depends on, and every way the cache can be bad."""

import dataclasses
import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import horizon
import horizon.planner.cache as cache
import horizon.planner.measure as measure
from helpers import batches, tiny_decoder

BATCH, SEQ = 2, 16
BUDGET_BYTES = 10**9


@pytest.fixture
def measured(monkeypatch):
    """The profiles the real ``measure_profile`` returned during the test, in order."""
    profiles, real = [], measure.measure_profile

    def counting(*args, **kwargs):
        profiles.append(real(*args, **kwargs))
        return profiles[-1]

    monkeypatch.setattr(measure, "measure_profile", counting)
    return profiles


def _auto(cache_dir, **kwargs) -> horizon.TrainConfig:
    return horizon.TrainConfig(plan="auto", device_memory_budget_bytes=BUDGET_BYTES, profile_cache_dir=cache_dir,
                               **kwargs)


def _run(config, *, seed=0, seq=SEQ, dim=64):
    """Two steps from a fresh model; the trainer's calibrated profile as measured: its compute scale set back
    to 1, and the run's update schedule (not part of what is measured or cached) back to "none"."""
    with horizon.Trainer(tiny_decoder(num_layers=3, dim=dim, seed=seed), config) as trainer:
        for b in batches(2, batch=BATCH, seq=seq):
            trainer.step(b)
        assert trainer.plan_profile.update_schedule == config.update_schedule
        return dataclasses.replace(trainer.plan_profile, compute_scale=1.0, update_schedule="none")


def _records(cache_dir) -> list[dict]:
    names = sorted(n for n in os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []
    assert all(n.endswith(".json") for n in names), names  # no temporary file left behind
    records = []
    for name in names:
        with open(os.path.join(cache_dir, name)) as f:
            records.append(json.load(f))
    return records


def test_a_second_run_of_the_same_shape_loads_what_the_first_measured(tmp_path, measured):
    cache_dir = tmp_path / "profiles"
    first = _run(_auto(cache_dir), seed=0)
    second = _run(_auto(cache_dir), seed=1)  # other weights, same shapes: the same costs
    assert len(measured) == 1
    assert first == second == measured[0]
    (record,) = _records(cache_dir)
    assert horizon.planner.Profile.from_dict(record["profile"]) == measured[0]
    assert record["identity"]["batch_size"] == BATCH and record["identity"]["seq_len"] == SEQ
    _run(_auto(cache_dir), seq=2 * SEQ)  # another batch shape is measured, and kept beside the first
    assert len(measured) == 2 and len(_records(cache_dir)) == 2
    assert measured[1].tokens == 2 * measured[0].tokens


def test_off_measures_every_time_and_writes_nothing(tmp_path, measured):
    _run(_auto(None))
    _run(_auto(None))
    assert len(measured) == 2
    assert not os.listdir(os.environ["XDG_CACHE_HOME"])


def test_the_default_folder_is_under_the_cache_home(measured):
    config = horizon.TrainConfig(plan="auto", device_memory_budget_bytes=BUDGET_BYTES)
    assert config.profile_cache_dir == os.path.join(os.environ["XDG_CACHE_HOME"], "horizon", "profiles")
    _run(config)
    assert len(_records(config.profile_cache_dir)) == 1


def _identity(trainer, **changes) -> dict:
    args = dict(device=trainer.device, transfer=trainer.transfer, batch_size=BATCH, seq_len=SEQ,
                fractions=measure.FRACTIONS) | changes
    return cache.profile_identity(trainer.engine.specs, trainer.store, **args)


def test_every_input_of_the_measurement_is_in_the_key(tmp_path, monkeypatch):
    def trainer(dim=64, **config):
        return horizon.Trainer(tiny_decoder(num_layers=3, dim=dim), horizon.TrainConfig(**config))

    paths = {}
    with trainer() as base, trainer() as again, trainer(dim=32) as narrower, \
            trainer(compute_dtype=torch.bfloat16) as bf16, trainer(cpu_link_bytes_per_s=1e9) as throttled, \
            trainer(cpu_link_bytes_per_s=1e9, cpu_link_duplex=True) as duplex:
        paths["base"] = cache.cache_path(tmp_path, _identity(base))
        assert cache.cache_path(tmp_path, _identity(again)) == paths["base"]  # deterministic
        for name, t in [("dim", narrower), ("dtype", bf16), ("link", throttled), ("duplex", duplex)]:
            paths[name] = cache.cache_path(tmp_path, _identity(t))
        paths["batch"] = cache.cache_path(tmp_path, _identity(base, batch_size=2 * BATCH))
        paths["seq"] = cache.cache_path(tmp_path, _identity(base, seq_len=2 * SEQ))
        paths["fractions"] = cache.cache_path(tmp_path, _identity(base, fractions=(0.5,)))
        with monkeypatch.context() as m:
            m.setattr(base.store, "pinned", not base.store.pinned)
            paths["pinned"] = cache.cache_path(tmp_path, _identity(base))
        for name, target, attr, value in [("torch", torch, "__version__", "0.0.0"),
                                          ("cpu", cache, "cpu_model", lambda: "X"),
                                          ("threads", torch, "get_num_threads", lambda: 997),
                                          ("version", cache, "MEASURE_VERSION", cache.MEASURE_VERSION + 1)]:
            with monkeypatch.context() as m:
                m.setattr(target, attr, value)
                paths[name] = cache.cache_path(tmp_path, _identity(base))
        block = base.engine.specs[1].module
        with monkeypatch.context() as m:  # a block that prints differently (another activation, say)
            m.setattr(type(block), "extra_repr", lambda self: "act=gelu")
            paths["module"] = cache.cache_path(tmp_path, _identity(base))
    assert len(set(paths.values())) == len(paths), paths


def test_a_bad_cached_file_is_measured_again_and_replaced(tmp_path, measured):
    cache_dir = tmp_path / "profiles"
    _run(_auto(cache_dir))
    (name,) = os.listdir(cache_dir)
    path = cache_dir / name
    good = path.read_text()
    for bad in ["{ not json", json.dumps({**json.loads(good), "format": "other"}),
                json.dumps({**json.loads(good), "identity": {"seq_len": 1}}),  # a hash collision
                json.dumps({**json.loads(good), "profile": {"units": []}})]:
        path.write_text(bad)
        with pytest.warns(UserWarning, match="ignoring the cached profile .* measuring again"):
            _run(_auto(cache_dir))
        record = json.loads(path.read_text())
        assert horizon.planner.Profile.from_dict(record.pop("profile")) == measured[-1]
        assert record == {k: v for k, v in json.loads(good).items() if k != "profile"}
    assert len(measured) == 5


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failed_run(tmp_path, measured):
    blocker = tmp_path / "not-a-folder"
    config = _auto(blocker / "profiles")  # valid when built; a file then takes the parent's name
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not cache the measured profile"):
        profile = _run(config)
    assert profile == measured[0]


def test_bad_cache_folders_are_value_errors(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _auto(str(a_file))
    with pytest.raises(ValueError, match="must be a folder path or None"):
        _auto(42)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _auto(tmp_path / "not-yet").profile_cache_dir == tmp_path / "not-yet"  # created when first needed
    assert not (tmp_path / "not-yet").exists()


def test_a_cuda_profile_is_keyed_on_the_gpu(monkeypatch):
    """Runs on any machine: the GPU's properties are faked, as a lent H100 and H200 would report them."""
    gpus = {"h100": SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=85_045_870_592),
            "h200": SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_110_011_392)}
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    machines = {}
    for name, props in gpus.items():
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=props: p)
        machines[name] = cache._machine(torch.device("cuda", 0))
    assert machines["h100"]["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
                                       "memory_bytes": 85_045_870_592, "cuda": "12.8"}
    assert machines["h100"]["cpu"] == cache.cpu_model() and machines["h100"] != machines["h200"]
    assert "gpu" not in cache._machine(torch.device("cpu"))
