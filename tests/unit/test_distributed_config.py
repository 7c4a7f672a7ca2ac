"""Bad launches and distributed settings fail with a ValueError that names the fix, before anything runs."""

import pytest

import horizon
from horizon.distributed import DistributedConfig, launch_from_env
from helpers import tiny_decoder

FULL = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def test_no_environment_is_a_single_process():
    assert launch_from_env({}) is None
    assert launch_from_env({"PATH": "/bin"}) is None


def test_one_rank_is_a_single_process():
    assert launch_from_env(dict(FULL, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")) is None


def test_a_full_launch_is_read():
    launch = launch_from_env(FULL)
    assert (launch.rank, launch.world_size, launch.local_rank) == (1, 2, 1)


def test_a_partial_environment_names_what_is_missing():
    env = dict(FULL)
    del env["MASTER_PORT"], env["LOCAL_RANK"]
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_PORT are missing: launch with `torchrun"):
        launch_from_env(env)


@pytest.mark.parametrize("change, match", [
    (dict(RANK="x"), "RANK='x' is not an integer"),
    (dict(RANK="2"), "0 <= RANK < WORLD_SIZE"),
    (dict(WORLD_SIZE="0", RANK="0"), "WORLD_SIZE >= 1"),
    (dict(LOCAL_RANK="-1"), "LOCAL_RANK >= 0"),
])
def test_inconsistent_numbers_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        launch_from_env(dict(FULL, **change))


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), float("nan"), True, "60"])
def test_timeout_must_be_positive_seconds(timeout_s):
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
        DistributedConfig(timeout_s=timeout_s)


def test_train_config_checks_its_distributed_field():
    with pytest.raises(ValueError, match="must be a horizon.DistributedConfig"):
        horizon.TrainConfig(distributed=60)


def test_sharded_checkpoints_that_may_skip_are_refused_before_joining(monkeypatch, tmp_path):
    for key, value in FULL.items():
        monkeypatch.setenv(key, value)
    config = horizon.TrainConfig(checkpoint=horizon.CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=1,
                                                                     on_busy="skip"),
                                 distributed=DistributedConfig(shard_optimizer_state=True))
    # No rank 0 listens on MASTER_PORT: had it tried to join, this would hang rather than raise.
    with pytest.raises(ValueError, match="on_busy='skip'\\) cannot shard: the ranks would disagree"):
        horizon.Trainer(tiny_decoder(), config)
    assert not (tmp_path / "ckpt").exists()


def test_a_malformed_launch_fails_before_the_store(monkeypatch):
    for key, value in dict(FULL, WORLD_SIZE="two").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        horizon.Trainer(tiny_decoder(), horizon.TrainConfig())


def test_shard_flag_must_be_a_bool():
    with pytest.raises(ValueError, match="shard_optimizer_state must be True or False"):
        DistributedConfig(shard_optimizer_state="yes")
