"""The state of one step's sweeps: what the engine and its traffic share while a step runs.

Why its own module: the engine (compute), its traffic (the copies in and out) and evaluation
(a forward sweep alone) all read and write it; one dataclass, made fresh per step, holds it, so
nothing of a step outlives it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future

import torch

from horizon.engine.activations import KeptGraph
from horizon.engine.slots import SlotUse
from horizon.engine.swap import SwappedGraph
from horizon.engine.transfer import Handle

__all__ = ["Sweep", "nbytes_of"]


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclasses.dataclass
class Sweep:
    """The state of one step's sweeps."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_divisor: int
    order: list[int]
    uses: list[SlotUse]
    checkpoints: dict[int, torch.Tensor] | None = None    # host inputs of RECOMPUTE blocks, by unit
    ready: dict[int, list[Handle]] = dataclasses.field(default_factory=dict)
    restored: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # device inputs, by unit
    kept: dict[int, KeptGraph] = dataclasses.field(default_factory=dict)
    swapped: dict[int, SwappedGraph] = dataclasses.field(default_factory=dict)
    rng: dict[int, tuple] = dataclasses.field(default_factory=dict)
    rows: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # by block: (KEEP, SWAP) rows
    pending: dict[int, list[tuple[int, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    offloads: dict[int, list[Handle]] = dataclasses.field(default_factory=dict)  # by unit, in issue order
    next_restore: int = 0                                               # next backward position to restore
    grads: collections.deque = dataclasses.field(default_factory=collections.deque)
    hidden: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    norm_sq: torch.Tensor | None = None    # running sum of squared gradient norms (fp32, on the device)
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # attention_mask, position_ids
    load_after: Callable[[int], Future | None] = lambda unit: None
    grads_sent: Callable[[int, Callable[[], None]], None] = lambda unit, landed: None

    def discard_graphs(self) -> None:
        """After a step that failed midway: let go of the graphs no backward will consume
        (``KeptGraph.discard``), so a caught error (an out-of-memory, say) leaks no activations."""
        for graph in (*self.kept.values(), *self.swapped.values()):
            graph.discard()
        self.kept.clear()
        self.swapped.clear()
