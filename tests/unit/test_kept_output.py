"""A block's output lives on the device only while something needs it: the next block's saved tensors,
the copy of the next block's input to the host, or the head. A KEEP graph entered and left through
data-less roots (``KeptGraph``, as ``SwappedGraph``) does not hold it; before, every KEEP block held
its output until its own backward, outside the engine's ledger (one hidden state per KEEP block whose
successor did not save its input). Checked with a weak reference to each block output's storage,
read when the head starts, against the rule worked out per block below."""

import pytest
from torch.multiprocessing.reductions import StorageWeakRef

import horizon
from horizon.engine.engine import Engine
from helpers import batches, tiny_decoder

P = horizon.ActivationPolicy


def _outputs_alive_at_the_head(monkeypatch, plan: horizon.Plan) -> dict[str, list[bool]]:
    """Per block, whether each output its forward computed (one per part of a split, and the
    concatenation) is still in memory when the head starts."""
    refs: dict[str, list] = {}
    alive: dict[str, list[bool]] = {}
    call, forward_block, loss_head = Engine._call, Engine._forward_block, Engine._loss_head

    def recording_call(self, sweep, unit, module, x, rows=None):
        y = call(self, sweep, unit, module, x, rows)
        if not alive and self.specs[unit].name in refs:  # a block's forward, before the head
            refs[self.specs[unit].name].append(StorageWeakRef(y.untyped_storage()))
        return y

    def recording_forward_block(self, sweep, unit, slot):
        refs[self.specs[unit].name] = []
        forward_block(self, sweep, unit, slot)
        refs[self.specs[unit].name].append(StorageWeakRef(sweep.hidden.untyped_storage()))

    def checking_loss_head(self, sweep, unit, slot):
        alive.update({name: [not r.expired() for r in rs] for name, rs in refs.items()})
        loss_head(self, sweep, unit, slot)

    monkeypatch.setattr(Engine, "_call", recording_call)
    monkeypatch.setattr(Engine, "_forward_block", recording_forward_block)
    monkeypatch.setattr(Engine, "_loss_head", checking_loss_head)
    with horizon.Trainer(tiny_decoder(num_layers=6), horizon.TrainConfig(plan=plan)) as trainer:
        trainer.step(batches(1)[0])
    return alive


def test_a_kept_blocks_output_is_freed_once_the_next_block_is_done_with_it(monkeypatch):
    plan = horizon.Plan(per_unit={"layers.0": P.KEEP, "layers.1": P.RECOMPUTE, "layers.2": P.KEEP, "layers.3": P.SWAP,
                                  "layers.4": P.KEEP, "layers.5": P.KEEP})
    alive = _outputs_alive_at_the_head(monkeypatch, plan)
    assert {name: set(a) for name, a in alive.items()} == {  # a whole block's call output is its output
        "layers.0": {False},  # the next block (RECOMPUTE) sent it to the host and dropped it
        "layers.1": {True},   # saved by the next block (KEEP)
        "layers.2": {False},  # saved by the next block (SWAP), whose saved bytes went to the host
        "layers.3": {True},   # saved by the next block (KEEP)
        "layers.4": {True},   # saved by the next block (KEEP)
        "layers.5": {True},   # the head's input
    }


@pytest.mark.parametrize("split", [horizon.RowSplit(keep=0.5), horizon.RowSplit(keep=0.5, swap=0.5)])
def test_a_split_blocks_kept_part_holds_no_output(monkeypatch, split):
    """A split's parts' outputs are concatenated into the block's output, and the next block (RECOMPUTE)
    sends that to the host: then nothing of the block's outputs is needed on the device."""
    plan = horizon.Plan(per_unit={"layers.1": P.RECOMPUTE}, splits={"layers.0": split}, default=P.KEEP)
    alive = _outputs_alive_at_the_head(monkeypatch, plan)["layers.0"]
    assert len(alive) == 3 and not any(alive), alive  # two parts and their concatenation
