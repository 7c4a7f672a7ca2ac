"""The copier yields to the optimizer only while the writer has enough staged to write
(``YIELD_BACKLOG_BYTES``): with slow updates and a slow disk it waits while they run (and the optimizer
copies the units it reaches first itself); with too little staged it copies even while the optimizer
runs, so the disk never idles for the yield. Either way the snapshot is exactly version S."""

from __future__ import annotations

import os

import pytest

import horizon
from horizon.checkpoint import snapshot
from horizon.checkpoint.commit import step_dir_name
from ckpt_helpers import SlowDisk, checkpoint_state, config, data, model, reference_states, states_equal


@pytest.fixture(scope="module")
def states():
    return reference_states(4)[1]


@pytest.mark.parametrize("case", ["yield", "control", "small_backlog"])
def test_copier_waits_while_the_optimizer_runs_and_the_writer_is_busy(tmp_path, states, case, monkeypatch):
    """``small_backlog``: the default YIELD_BACKLOG_BYTES (16 MiB) against this model's units of a few KB:
    what is staged would keep the disk busy for far less than an update, so the copier never waits."""
    yields = case == "yield"
    if case != "small_backlog":
        monkeypatch.setattr(snapshot, "YIELD_BACKLOG_BYTES", 1)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, final_save=False)
    with horizon.Trainer(model(), config(ckpt), optimizer_delay_s=lambda: 0.03,
                         checkpoint_disk=SlowDisk(0.05)) as trainer:
        if case == "control":
            trainer.checkpointer.optimizer_busy = None
        batches = data(4)
        for b in batches[:2]:
            trainer.step(b)
        trainer.save()  # step 2's updates are still running (30 ms each): the copier must wait for them
        for b in batches[2:]:
            trainer.step(b)
        flight = trainer.checkpointer.wait()
    assert flight.error is None
    if yields:
        assert flight.snapshot.yielded_s >= 0.03
    else:
        assert flight.snapshot.yielded_s == 0.0
    assert states_equal(checkpoint_state(os.path.join(tmp_path, step_dir_name(2))), states[2])


def test_an_idle_writer_is_never_kept_waiting_by_the_yield(tmp_path, states):
    """An optimizer that never goes idle: a copier that yielded regardless would leave every unit to the
    optimizer's copy-on-write, and with no further step the checkpoint would time out."""
    ckpt = horizon.CheckpointConfig(dir=tmp_path, final_save=False, timeout_s=20)
    with horizon.Trainer(model(), config(ckpt)) as trainer:
        trainer.checkpointer.optimizer_busy = lambda: True
        for b in data(2):
            trainer.step(b)
        trainer.save()
        flight = trainer.checkpointer.wait()
    assert flight.error is None, flight.error
    assert states_equal(checkpoint_state(os.path.join(tmp_path, step_dir_name(2))), states[2])
