"""A step that raises in the middle of its forward (a caught out-of-memory, say) leaks no activations
and leaves the trainer able to go on, with exactly the numbers of a run that never failed."""

import copy
import gc

import pytest
import torch

import horizon
from helpers import batches, horizon_run, tiny_decoder
from horizon.engine.activations import KeptGraph

PLANS = {
    "keep": "keep",
    "swap": "swap",
    "split": horizon.Plan(splits={f"layers.{i}": horizon.RowSplit(keep=0.5) for i in range(4)}),
}


def _fail_on_call(forward, n: int):
    """A block ``forward`` that raises on its n-th call, then behaves."""
    calls = {"count": 0}

    def call(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise RuntimeError("out of memory (injected)")
        return forward(self, *args, **kwargs)

    return call


def _live_graphs() -> int:
    gc.collect()
    return sum(issubclass(type(o), KeptGraph) for o in gc.get_objects())  # SwappedGraph too


@pytest.mark.parametrize("plan", PLANS)
def test_a_step_that_raises_midway_leaks_no_graph_and_the_next_steps_are_exact(monkeypatch, plan):
    model = tiny_decoder(num_layers=4)
    data = batches(3)
    config = horizon.TrainConfig(plan=PLANS[plan], grad_clip_norm=1.0)
    reference = horizon_run(model, data, config=config)
    before = _live_graphs()
    with horizon.Trainer(copy.deepcopy(model), config) as trainer:
        with monkeypatch.context() as patch:
            block = type(model.layers[0])
            patch.setattr(block, "forward", _fail_on_call(block.forward, 3))  # the third block's forward
            with pytest.raises(RuntimeError, match="injected"):
                trainer.step(data[0])
        assert _live_graphs() == before  # the two blocks' graphs did not outlive the step
        assert trainer.memory().device_peak_bytes > 0
        losses = [trainer.step(b).loss for b in data]
        state = trainer.state_dict()
    assert losses == reference[0]
    assert all(torch.equal(state[k], reference[1][k]) for k in reference[1])
