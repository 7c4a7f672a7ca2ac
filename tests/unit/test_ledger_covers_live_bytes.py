"""The engine's ledger against the memory that is actually alive, on CPU, where there is no
``torch.cuda.max_memory_allocated``: a dispatch mode sees every storage the engine's thread allocates
during a step, and after each op compares the bytes still alive with what the ledger holds. What the
ledger leaves out must be a fixed workspace (one unit's temporaries), so it must not grow with the
model's depth: for each plan pattern, the worst excess at 8 blocks equals the one at 4. A buffer held
per block outside the ledger (a KEEP graph's output, as before session 9) grows it by a hidden state
per block."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import horizon
from helpers import batches, tiny_decoder

P = horizon.ActivationPolicy


class LiveVersusLedger(TorchDispatchMode):
    """After each op: bytes of the storages allocated under this mode that are still alive, less what
    the ledger holds beyond what it held when the mode started; ``worst_excess_bytes`` is the largest."""

    def __init__(self, ledger) -> None:
        super().__init__()
        self.ledger, self.base_bytes = ledger, ledger.current_bytes
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.worst_excess_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        seen |= {a.data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.UntypedStorage)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                old = self._live.get(key)
                if key not in seen and storage.nbytes() and (old is None or old[0].expired()):
                    self._live[key] = (StorageWeakRef(storage), storage.nbytes())
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        live_bytes = sum(n for _, n in self._live.values())
        held_bytes = self.ledger.current_bytes - self.base_bytes
        self.worst_excess_bytes = max(self.worst_excess_bytes, live_bytes - held_bytes)
        return out


def _worst_excess_bytes(num_layers: int, pattern: list) -> int:
    """The worst excess over the ledger during the second step (the first allocates the host buffers)."""
    per_unit = {f"layers.{i}": p for i, p in enumerate(pattern * (num_layers // len(pattern))) if isinstance(p, P)}
    splits = {f"layers.{i}": p for i, p in enumerate(pattern * (num_layers // len(pattern)))
              if isinstance(p, horizon.RowSplit)}
    plan = horizon.Plan(per_unit=per_unit, splits=splits)
    data = batches(2, batch=4)
    with horizon.Trainer(tiny_decoder(num_layers=num_layers), horizon.TrainConfig(plan=plan)) as trainer:
        trainer.step(data[0])
        trainer.updater.wait_all()
        with LiveVersusLedger(trainer.engine.ledger) as mode:
            trainer.step(data[1])
        return mode.worst_excess_bytes


@pytest.mark.parametrize("pattern", [
    [P.RECOMPUTE], [P.KEEP], [P.SWAP], [P.KEEP, P.RECOMPUTE], [P.KEEP, P.SWAP],
    [horizon.RowSplit(keep=0.5), horizon.RowSplit(keep=0.25, swap=0.5)],
    [horizon.RowSplit(input_on_device=True), P.KEEP],
], ids=["recompute", "keep", "swap", "keep-recompute", "keep-swap", "splits", "device-input-keep"])
def test_what_the_ledger_leaves_out_does_not_grow_with_depth(pattern):
    shallow, deep = _worst_excess_bytes(4, pattern), _worst_excess_bytes(8, pattern)
    hidden_bytes = 4 * 16 * 64 * 4  # batch 4 x 16 tokens x dim 64, fp32
    assert deep <= shallow, (shallow, deep, hidden_bytes)
