"""The copier yields to the optimizer: with slow updates it waits while they run (and the optimizer
copies the units it reaches first itself), and the snapshot is still exactly version S."""

from __future__ import annotations

import os

import pytest

import horizon
from horizon.checkpoint.commit import step_dir_name
from ckpt_helpers import checkpoint_state, config, data, model, reference_states, states_equal


@pytest.mark.parametrize("yields", [True, False], ids=["yield", "control"])
def test_copier_waits_while_the_optimizer_runs(tmp_path, yields):
    _, states = reference_states(4)
    ckpt = horizon.CheckpointConfig(dir=tmp_path, final_save=False)
    with horizon.Trainer(model(), config(ckpt), optimizer_delay_s=lambda: 0.03) as trainer:
        if not yields:
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
