"""Where a block's activations wait between its forward and its backward.

KEEP holds the block's autograd graph, but a graph saves the weights it used, and those weights
are views into a slot that will hold other units by the time backward runs. ``KeptGraph``
therefore saves every tensor that aliases the slot as its place in the slot (offset, size,
stride) and, in backward, reads it from whichever slot holds the unit then: the weights are the
same because the optimizer has not run yet. Everything else it saves is a real activation and is
counted. RECOMPUTE keeps only the block input, offloaded to ``HostActivations`` (or left on the
device, ``RowSplit(input_on_device=True)``); SWAP
(``swap.py``) keeps the saved tensors there too.

The graph must not keep device memory alive through its roots: the block input enters through
``_Entry`` (whose backward hands out the input gradient) and the output leaves through ``_Exit`` (a
0-element root whose backward feeds in the output gradient), so the block's input and output are
held only where the graph saved them, and counted there. (A graph rooted at the output tensor held
it until the block's backward, outside the engine's ledger: one hidden state per KEEP block whose
successor did not save its input.)
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["KeptGraph", "HostActivations"]


@dataclasses.dataclass(frozen=True)
class _SlotRef:
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Entry(torch.autograd.Function):
    """Identity on the block input; its backward stores the input gradient in ``holder``."""

    @staticmethod
    def forward(ctx, x, anchor, holder):
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        ctx.holder["grad_x"] = grad_x
        return None, torch.zeros(0, device=grad_x.device), None


class _Exit(torch.autograd.Function):
    """A 0-element root after the block output; its backward returns the output gradient from ``holder``."""

    @staticmethod
    def forward(ctx, y, holder):
        ctx.holder = holder
        return y.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return ctx.holder.pop("grad_y"), None


class KeptGraph:
    """One KEEP block: its graph (roots without data), the forward template's parameters, the saved bytes."""

    def __init__(self, forward_slot: torch.Tensor) -> None:
        self._forward_storage = forward_slot.untyped_storage().data_ptr()
        self._seen_storages: set[int] = set()
        self.saved_bytes = 0
        self.backward_slot: torch.Tensor | None = None
        self.params: list[torch.Tensor] = []
        self._holder: dict[str, torch.Tensor] = {}
        self._anchor: torch.Tensor | None = None
        self._root: torch.Tensor | None = None

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() == self._forward_storage:
            return _SlotRef(t.storage_offset(), tuple(t.size()), tuple(t.stride()))
        if storage.data_ptr() not in self._seen_storages:
            self._seen_storages.add(storage.data_ptr())
            self.saved_bytes += storage.nbytes()
        # Not ``t`` itself: a saved output returned as is would hold its own grad_fn, a cycle through
        # autograd's C++ nodes that only a backward breaks (a discarded graph would leak).
        return t.detach()

    def _unpack(self, packed):
        if isinstance(packed, _SlotRef):
            assert self.backward_slot is not None, "backward_slot is set before the kept graph is replayed"
            return torch.as_strided(self.backward_slot, packed.size, packed.stride, packed.offset)
        return packed

    def forward(self, fn, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """Run ``fn(x)`` with autograd under this graph's hooks; returns the output, detached."""
        self.params = params
        self._anchor = torch.empty(0, device=x.device, requires_grad=True)
        with torch.enable_grad(), self.hooks():
            y = fn(_Entry.apply(x.detach(), self._anchor, self._holder))
            self._root = _Exit.apply(y, self._holder)
        return y.detach()

    def backward(self, grad_y: torch.Tensor, backward_slot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input gradient, *parameter gradients); the graph is let go."""
        self.backward_slot = backward_slot
        self._holder["grad_y"] = grad_y
        grads = torch.autograd.grad(self._root, [self._anchor, *self.params], grad_y.new_empty(0))
        grad_x = self._holder.pop("grad_x")
        self.discard()
        return (grad_x, *grads[1:])

    def discard(self) -> None:
        """Let the graph go. Its saved tensors' unpack hooks are this object's methods, so the graph and
        this object hold each other through autograd's C++ nodes, a cycle Python's collector cannot
        see: a graph that no backward consumes must be discarded, or its activations leak."""
        self._root = self._anchor = self.backward_slot = None
        self.params = []
        self._holder.clear()


class HostActivations:
    """Host buffers for the inputs of RECOMPUTE blocks and the saved bytes of SWAP blocks, one per
    block, allocated on the first step and reused while the batch shape stays the same."""

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self._flat: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None
        self._count = 0
        self._region = None
        self._swap: dict[int, tuple[torch.Tensor, object]] = {}

    def swap_buffer(self, unit: int, nbytes: int) -> torch.Tensor:
        """The host bytes of SWAP block ``unit`` (reused while ``nbytes`` stays the same)."""
        held = self._swap.get(unit)
        if held is None or held[0].numel() != nbytes:
            self._close_swap(unit)
            flat = torch.empty(nbytes, dtype=torch.uint8)
            region = None
            if self.pin and nbytes:
                from horizon.store.pinning import PinnedRegion

                region = PinnedRegion(flat)
            self._swap[unit] = held = (flat, region)
        return held[0]

    def _close_swap(self, unit: int) -> None:
        _, region = self._swap.pop(unit, (None, None))
        if region is not None:
            region.close()

    def buffers(self, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        numel = int(torch.Size(shape).numel())
        if self._flat is None or self._shape != shape or self._count != count or self._flat.dtype != dtype:
            self._close_inputs()
            self._flat = torch.empty(count * numel, dtype=dtype)
            self._shape, self._count = shape, count
            if self.pin:
                from horizon.store.pinning import PinnedRegion

                self._region = PinnedRegion(self._flat)
        return [self._flat[i * numel:(i + 1) * numel].view(shape) for i in range(count)]

    @property
    def nbytes(self) -> int:
        inputs = 0 if self._flat is None else self._flat.numel() * self._flat.element_size()
        return inputs + sum(flat.numel() for flat, _ in self._swap.values())

    def close(self) -> None:
        for unit in list(self._swap):
            self._close_swap(unit)
        self._close_inputs()

    def _close_inputs(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None
        self._flat = None
