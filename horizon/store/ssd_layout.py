"""Where each role of a unit sits in the SSD tier's file and in an I/O slot.

Every unit on SSD keeps its fp32 master, Adam m and v back to back, each padded to 4 KiB so one
O_DIRECT request moves all of them. A unit whose weights are streamed (``SSDConfig(weights=True)``)
adds its compute copy (bf16 and alike; in fp32 the master is the compute copy and nothing is added)
and, when global clipping makes gradients wait for the norm, a spilled gradient at the end: an update
reads the whole extent and writes back everything but the gradient.
"""

from __future__ import annotations

import dataclasses

import torch

from horizon.io import ALIGN_BYTES
from horizon.store.layout import UnitLayout

__all__ = ["STATE_ROLES", "UnitExtents", "unit_extents", "state_bytes", "ssd_bytes_by_role"]

STATE_ROLES = ("master", "exp_avg", "exp_avg_sq")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitExtents:
    numel: int
    roles: tuple[tuple[str, int, torch.dtype], ...]
    """(role, byte offset inside the unit's extent, dtype), in file order."""
    write_bytes: int
    """What an update writes back: every role but a spilled gradient (4 KiB padded)."""
    read_bytes: int
    """What an update reads: every role (4 KiB padded)."""

    def role_bytes(self, role: str) -> int:
        """Padded bytes of ``role``."""
        dtype = dict((r, d) for r, _, d in self.roles)[role]
        return _aligned(self.numel * dtype.itemsize)

    def offset(self, role: str) -> int:
        return next(o for r, o, _ in self.roles if r == role)

    def views(self, region: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed flat views of every role in ``region`` (uint8, at least ``read_bytes``)."""
        return {role: region[offset:offset + self.numel * dtype.itemsize].view(dtype)
                for role, offset, dtype in self.roles}

    @property
    def weight_role(self) -> str:
        """The role the engine reads for a streamed unit: its compute copy, or the fp32 master itself."""
        return "compute" if any(r == "compute" for r, _, _ in self.roles) else "master"


def unit_extents(layout: UnitLayout, *, compute_dtype: torch.dtype = torch.float32, weights: bool = False,
                 spill_grad: bool = False) -> UnitExtents:
    roles = [(role, torch.float32) for role in STATE_ROLES]
    if weights and compute_dtype != torch.float32:
        roles.append(("compute", compute_dtype))
    write_roles = len(roles)
    if weights and spill_grad:
        roles.append(("grad", compute_dtype))
    placed, offset, write_bytes = [], 0, 0
    for i, (role, dtype) in enumerate(roles):
        placed.append((role, offset, dtype))
        offset += _aligned(layout.numel * dtype.itemsize)
        if i + 1 == write_roles:
            write_bytes = offset
    return UnitExtents(numel=layout.numel, roles=tuple(placed), write_bytes=write_bytes, read_bytes=offset)


def state_bytes(layout: UnitLayout, compute_dtype: torch.dtype = torch.float32, *, weights: bool = False,
                spill_grad: bool = False) -> int:
    """Bytes of one unit's extent on SSD and in an I/O slot (each role padded to 4 KiB)."""
    return unit_extents(layout, compute_dtype=compute_dtype, weights=weights, spill_grad=spill_grad).read_bytes


def ssd_bytes_by_role(extents: list[UnitExtents]) -> dict[str, int]:
    """Bytes on SSD per role over these units' extents (4 KiB padding included): the file's exact size in sum."""
    out: dict[str, int] = {}
    for unit in extents:
        for role, _, _ in unit.roles:
            out[role] = out.get(role, 0) + unit.role_bytes(role)
    return out
