"""The trainer's preflight: the estimate against a (monkeypatched) machine, before anything is allocated."""

import psutil
import pytest
import torch

import horizon
import horizon.estimate.preflight as preflight_module
from helpers import forbid_host_store
from horizon.estimate import estimate_memory
from horizon.estimate.preflight import preflight
from horizon.models import Decoder, decoder_config
from horizon.store.capacity import HostCapacity, HostMemoryError

GIB = 2**30


def machine(available_bytes, *, memlock_bytes=None, root=False, cgroup=None):
    return HostCapacity(available_bytes=available_bytes, cgroup_limit_bytes=cgroup,
                        cgroup_usage_bytes=0 if cgroup else None, memlock_limit_bytes=memlock_bytes,
                        can_lock_unlimited=root)


def needed_bytes(model, config):
    """What the preflight must compare: the host store, plus the slots when the device is the CPU."""
    e = estimate_memory(model, config, batch_size=1, seq_len=1)
    store = e.host_bytes - e.host_bytes_by_role["activations"]
    return store + (e.device_peak_bytes if config.device == "cpu" else 0)


def test_refuses_before_any_allocation_with_the_shortfall(monkeypatch):
    with torch.device("meta"):
        model = Decoder(decoder_config("1b"))  # 1.2 B parameters: ~20 GiB of store, never allocated
    config = horizon.TrainConfig()
    need = needed_bytes(model, config)
    monkeypatch.setattr(preflight_module, "probe_host_capacity", lambda: machine(need - 5 * 2**20, cgroup=64 * GIB))
    forbid_host_store(monkeypatch)
    rss_before = psutil.Process().memory_info().rss
    with pytest.raises(HostMemoryError, match="5.0 MiB short") as info:
        horizon.Trainer(model, config)
    assert psutil.Process().memory_info().rss - rss_before < 256 * 2**20  # far below the 20 GiB store
    message = str(info.value)
    assert "preflight=False" in message and "cgroup limit 64.00 GiB" in message
    assert isinstance(info.value, ValueError)


def test_exactly_enough_passes_and_the_count_is_the_estimate():
    model = Decoder(decoder_config("tiny"))
    config = horizon.TrainConfig()
    need = needed_bytes(model, config)
    assert preflight(model, config, capacity=machine(need)) == need
    with pytest.raises(HostMemoryError, match="1 B short"):
        preflight(model, config, capacity=machine(need - 1))


def test_the_memlock_limit_is_left_to_the_stores_fallback():
    """Over ``ulimit -l`` the store warns and pins nothing (the driver may not enforce the limit):
    the preflight does not refuse, and returns the same count with or without a limit."""
    with torch.device("meta"):
        model = Decoder(decoder_config("tiny"))
    config = horizon.TrainConfig(device="cuda")  # only estimated: no CUDA needed
    unlimited = preflight(model, config, capacity=machine(100 * GIB))
    assert preflight(model, config, capacity=machine(100 * GIB, memlock_bytes=0)) == unlimited


def test_opt_out_skips_the_check(monkeypatch):
    monkeypatch.setattr(preflight_module, "probe_host_capacity", lambda: machine(0))
    with pytest.raises(HostMemoryError):
        horizon.Trainer(Decoder(decoder_config("tiny")), horizon.TrainConfig())
    with horizon.Trainer(Decoder(decoder_config("tiny")), horizon.TrainConfig(preflight=False)) as trainer:
        assert trainer.global_step == 0
    with pytest.raises(ValueError, match="preflight must be True or False"):
        horizon.TrainConfig(preflight="yes")


@pytest.mark.parametrize("plan", ["keep", "swap", horizon.Plan.uniform("keep", num_slots=3)])
def test_every_plan_is_checked_as_all_recompute_with_its_slots(plan):
    """The store and slots do not depend on the activation policy (and the estimate does not model SWAP)."""
    model = Decoder(decoder_config("tiny"))
    config = horizon.TrainConfig(plan=plan)
    recompute = horizon.TrainConfig(plan=horizon.Plan.uniform("recompute", num_slots=config.resolved_plan.num_slots))
    assert preflight(model, config, capacity=machine(100 * GIB)) == needed_bytes(model, recompute)
    with horizon.Trainer(model, config) as trainer:  # and the trainer runs with it
        trainer.step({"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.zeros(1, 1, dtype=torch.long)})


def test_the_count_is_the_runtimes_own_accounting():
    """On CPU: the store (activations aside) plus the engine ledger's peak of a 1 x 1 step."""
    model = Decoder(decoder_config("tiny"))
    config = horizon.TrainConfig(plan=horizon.Plan.uniform("recompute", num_slots=3))
    predicted = preflight(model, config, capacity=machine(100 * GIB))
    with horizon.Trainer(model, config) as trainer:
        trainer.step({"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.zeros(1, 1, dtype=torch.long)})
        memory = trainer.memory()
    assert predicted == memory.host_bytes - memory.host_bytes_by_role["activations"] + memory.device_peak_bytes
