"""SWAP: a block's saved activations wait in host memory between its forward and its backward.

Why: KEEP holds a block's autograd activations on the device for the whole step, RECOMPUTE
pays a second forward. SWAP runs the forward with autograd like KEEP, but every tensor autograd
saves (other than the weights, which are slot views, see ``KeptGraph``) is packed as a
reference into one flat byte buffer: after the forward the buffer is copied to a host buffer on
the copy engine, the device memory is let go once that copy is done, and before the block's
backward the bytes come back (prefetched, like weights) into a fresh device buffer that the
references unpack from. The bytes are those autograd computed, so SWAP is bitwise KEEP.

Storages are copied whole, deduplicated, with each saved tensor's (dtype, size, stride, offset)
into its storage: views and non-contiguous tensors come back exactly as they were saved.

Its graph is entered and left through ``KeptGraph``'s data-less roots, so the block's input and
output are not referenced by anything the graph keeps either.
"""

from __future__ import annotations

import dataclasses

import torch

from horizon.engine.activations import KeptGraph
from horizon.engine.transfer import Handle, Transfer

__all__ = ["SwappedGraph", "ALIGN_BYTES"]

ALIGN_BYTES = 64
"""Each storage starts on this boundary inside the swap buffer, so any dtype can view it."""


def _align(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


@dataclasses.dataclass(frozen=True)
class _Swapped:
    """A saved tensor, as its place in the swap buffer."""

    byte_offset: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


class SwappedGraph(KeptGraph):
    """One SWAP block: its graph (roots without data), the storages it saved, their layout in bytes."""

    def __init__(self, forward_slot: torch.Tensor) -> None:
        super().__init__(forward_slot)
        self._device = forward_slot.device
        self._offset_of: dict[int, int] = {}
        self._storages: list[torch.UntypedStorage] = []
        self.nbytes = 0
        self._device_flat: torch.Tensor | None = None

    def _pack(self, t: torch.Tensor):
        packed = super()._pack(t)
        if not isinstance(packed, torch.Tensor) or t.device != self._device:
            return packed  # a slot view, or a host scalar autograd keeps as it is
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._offset_of:
            self._offset_of[key] = self.nbytes
            self._storages.append(storage)
            self.nbytes += _align(storage.nbytes())
        return _Swapped(self._offset_of[key], t.dtype, tuple(t.size()), tuple(t.stride()), t.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, _Swapped):
            return super()._unpack(packed)
        assert self._device_flat is not None, "restore() runs before the swapped graph is replayed"
        typed = self._device_flat.view(packed.dtype)
        return torch.as_strided(typed, packed.size, packed.stride,
                                packed.byte_offset // packed.dtype.itemsize + packed.storage_offset)

    def forward(self, fn, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        y = super().forward(fn, x, params)
        self.saved_bytes = self.nbytes
        return y

    def offload(self, transfer: Transfer, host_flat: torch.Tensor) -> Handle:
        """Copy the saved storages into ``host_flat`` (uint8, ``nbytes`` long); the handle holds them until done."""
        assert host_flat.numel() == self.nbytes and host_flat.dtype == torch.uint8
        srcs = [torch.empty(0, dtype=torch.uint8, device=self._device).set_(s, 0, (s.nbytes(),), (1,))
                for s in self._storages]
        dsts = [host_flat[self._offset_of[s.data_ptr()]:][:s.nbytes()] for s in self._storages]
        self._storages = []
        return transfer.d2h(dsts, srcs)

    def restore(self, transfer: Transfer, host_flat: torch.Tensor) -> Handle:
        """Bring the saved bytes back into a fresh device buffer (wait on the handle before ``backward``)."""
        self._device_flat = torch.empty(self.nbytes, dtype=torch.uint8, device=self._device)
        return transfer.h2d([self._device_flat], [host_flat])

    def discard(self) -> None:
        super().discard()
        self._device_flat = None
        self._storages = []
