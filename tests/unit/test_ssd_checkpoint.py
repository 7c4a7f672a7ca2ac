"""Checkpoints with the optimizer state on SSD: the snapshot is version S, and resuming continues bit for bit."""

import dataclasses
import os

import pytest

import horizon
from ckpt_helpers import SlowDisk, checkpoint_state, config, data, model, reference_states, states_equal
from horizon.checkpoint.commit import committed_steps, step_dir_name


def ssd_config(ckpt, ssd_dir, *, eager, resume=False, units="all", weights=False):
    return dataclasses.replace(config(ckpt, eager=eager, resume=resume),
                               ssd=horizon.SSDConfig(dir=ssd_dir, units=units, weights=weights))


@pytest.mark.parametrize("eager", [False, True], ids=["deferred", "eager"])
@pytest.mark.parametrize("units,weights", [("all", False), ((1, 2), False), ("all", True)],
                         ids=["all", "some", "all+weights"])
def test_checkpoints_of_ssd_state_are_version_s_and_resume_bit_for_bit(tmp_path, eager, units, weights):
    losses, states = reference_states(6, eager=eager)  # RAM-resident, uninterrupted
    ckpt_dir, ssd_dir = tmp_path / "ckpt", tmp_path / "ssd"
    ssd_dir.mkdir()
    ckpt = horizon.CheckpointConfig(dir=ckpt_dir, every_steps=1, keep_last=3)
    batches = data(6)
    with horizon.Trainer(model(), ssd_config(ckpt, ssd_dir, eager=eager, units=units, weights=weights),
                         checkpoint_disk=SlowDisk(0.01)) as trainer:  # later steps run while copies are taken
        first = [trainer.step(b).loss for b in batches[:3]]
    assert committed_steps(ckpt_dir) == [1, 2, 3]
    for step in (1, 2, 3):
        assert states_equal(checkpoint_state(os.path.join(ckpt_dir, step_dir_name(step))), states[step]), step
    with horizon.Trainer(model(), ssd_config(ckpt, ssd_dir, eager=eager, units=units, weights=weights,
                                            resume=True)) as trainer:
        assert trainer.global_step == 3
        assert bool(trainer.store.streamed) == weights
        rest = [trainer.step(b).loss for b in batches[3:]]
        optim = trainer.optimizer_state_dict()["state"]  # reads SSD while the copier of step 6 may too
        masters = trainer.state_dict()
        names = trainer.param_names()
    assert first + rest == losses
    assert list(ssd_dir.iterdir()) == [], "the state file is removed at close"
    for unit, unit_names in enumerate(names):
        offset = 0
        for name in unit_names:
            n = masters[name].numel()
            want = states[6][unit]
            assert masters[name].view(-1).equal(want["master"][offset:offset + n]), name
            assert optim[name]["exp_avg"].reshape(-1).equal(want["exp_avg"][offset:offset + n]), name
            assert optim[name]["exp_avg_sq"].reshape(-1).equal(want["exp_avg_sq"][offset:offset + n]), name
            offset += n
