"""plan='auto' times whole-unit copies, so a sharded (ZeRO-3) run refuses it before anything is allocated."""

import pytest

import horizon
from dp_cases import SHARDED
from helpers import tiny_decoder


def test_auto_plan_with_a_sharded_store_is_refused_before_joining_the_group(monkeypatch):
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)  # a torchrun launch whose peer never comes: joining would hang
    config = horizon.TrainConfig(plan="auto", device_memory_budget_bytes=1 << 30, distributed=SHARDED)
    with pytest.raises(ValueError, match="plan='auto' cannot plan a sharded run"):
        horizon.Trainer(tiny_decoder(), config)
