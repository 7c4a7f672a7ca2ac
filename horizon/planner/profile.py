"""The measured costs the planner decides from: per unit, per policy, and the link.

Why a plain record: the solver, the greedy fallback and the simulator read only this, so they
are pure functions that tests feed synthetic profiles (hundreds of random ones) and the
trainer feeds a measured one (``measure.py``). Seconds and bytes throughout; the MIP rescales.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["UnitRole", "UnitCost", "Profile", "UPDATE_SCHEDULES"]

UPDATE_SCHEDULES = ("none", "eager", "deferred")

_AT_FIELDS = ("fwd_s_at", "fwd_grad_s_at", "bwd_s_at", "keep_bytes_at", "swap_bytes_at")
"""UnitCost's costs of a part of the rows, one entry per ``Profile.fractions``."""


class UnitRole(enum.Enum):
    EMBEDDING = "embedding"
    BLOCK = "block"
    HEAD = "head"


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitCost:
    name: str
    """The unit's name (``layers.3``); plans name blocks by it."""
    role: UnitRole
    weight_bytes: int
    """Bytes copied into a slot to run the unit (own and borrowed parameters, compute dtype)."""
    grad_bytes: int
    """Bytes of the unit's own parameter gradients sent to the host after its backward."""
    borrowed_grad_bytes: tuple[tuple[int, int], ...] = ()
    """(owner unit, bytes) of gradients for tied parameters, held until the owner's backward."""
    fwd_s: float
    """Forward without autograd (embedding, RECOMPUTE blocks); the head: forward and backward of the loss."""
    fwd_grad_s: float = 0.0
    """Forward with autograd (KEEP and SWAP blocks, the recompute inside a RECOMPUTE backward)."""
    bwd_s: float = 0.0
    """Backward from a kept graph (the embedding: its forward with autograd and backward)."""
    keep_bytes: int = 0
    """Device bytes a KEEP block's saved activations hold until its backward."""
    swap_bytes: int = 0
    """Bytes a SWAP block copies to the host and back (its saved storages, aligned)."""
    fwd_s_at: tuple[float, ...] = ()
    """``fwd_s`` of the first ``Profile.fractions[i]`` of the rows alone (a part of a row split)."""
    fwd_grad_s_at: tuple[float, ...] = ()
    """``fwd_grad_s`` of such a part."""
    bwd_s_at: tuple[float, ...] = ()
    """``bwd_s`` of such a part."""
    keep_bytes_at: tuple[int, ...] = ()
    """``keep_bytes`` when the block holds only ``Profile.fractions[i]`` of the rows."""
    swap_bytes_at: tuple[int, ...] = ()
    """``swap_bytes`` when the block swaps only ``Profile.fractions[i]`` of the rows."""
    split_fwd_s: float = 0.0
    """What a row split adds to the block's forward beyond its parts' own, per part after the first:
    the engine copies a part's rows out and concatenates the parts' outputs."""
    split_bwd_s: float = 0.0
    """The same in backward: the parts' input gradients concatenated, their parameter gradients summed."""
    update_s: float = 0.0
    """The unit's AdamW update on the host with every core the optimizer may use (the deferred
    schedule's updates, and the eager one's of the embedding and first block)."""
    update_overlap_s: float = 0.0
    """The same with one core left to the engine: the eager schedule's other updates (``optim/updater.py``)."""

    def __post_init__(self) -> None:
        for field in ("weight_bytes", "grad_bytes", "keep_bytes", "swap_bytes"):
            if getattr(self, field) < 0:
                raise ValueError(f"UnitCost.{field} must be >= 0, got {getattr(self, field)}")
        if any(not b >= 0 for b in self.keep_bytes_at + self.swap_bytes_at + self.fwd_s_at + self.fwd_grad_s_at
               + self.bwd_s_at):
            raise ValueError("UnitCost's per-fraction bytes and seconds (the *_at fields) must be >= 0")
        for field in ("fwd_s", "fwd_grad_s", "bwd_s", "split_fwd_s", "split_bwd_s", "update_s", "update_overlap_s"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"UnitCost.{field} must be >= 0 seconds, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    units: tuple[UnitCost, ...]
    """embedding, blocks in order, head."""
    hidden_bytes: int
    """One hidden state (and one hidden gradient): batch × tokens × dim × element size."""
    slot_bytes: int
    """One device slot: the largest unit's weights."""
    link_bytes_per_s: float
    """Host↔device bandwidth of the copy engine, from the store's buffers (pinned where the store is)."""
    pageable_link_bytes_per_s: float = 0.0
    """The same from pageable host memory (0: not measured): what unpinned buffers would get. Informational:
    every buffer the engine copies is pinned or not as the store is, which ``link_bytes_per_s`` measured."""
    duplex: bool = False
    """True: host-to-device and device-to-host copies run at once (two CUDA copy engines, or the CPU
    transfer's two threads with ``cpu_link_duplex``); False: one queue for both."""
    tokens: int = 0
    """Tokens per step the profile was measured at (batch × sequence)."""
    compute_scale: float = 1.0
    """Seconds of compute in a real step per second measured alone (``calibrate.py``): cache misses,
    the optimizer and transfer threads sharing the cores, per-unit overhead. 1.0 = not calibrated."""
    fractions: tuple[float, ...] = ()
    """Row fractions in (0, 1) a KEEP or SWAP block may hold, the rest recomputed (multiples of
    1/batch rows, increasing); their bytes are each block's ``keep_bytes_at`` / ``swap_bytes_at``."""
    copy_compute_s_per_byte: float = 0.0
    """Seconds a copy adds to the compute running beside it, per byte copied: ~0 where a DMA engine
    copies; on the CPU device the copy takes one of the cores the compute runs on (measured:
    ``measure.py``). Not scaled by ``compute_scale``."""
    update_schedule: str = "none"
    """How the optimizer's updates meet the step (``optim/updater.py``): "eager" (each unit's update as
    its gradient lands, on one worker), "deferred" (every update after the update's last gradient, in
    forward order: global-norm clipping, accumulation), or "none" (not simulated). The next step's
    load of a unit waits for its update. Not scaled by ``compute_scale``."""
    accumulation: int = 1
    """Micro-batches per update (``TrainConfig.grad_accum_steps``): a deferred update follows every
    ``accumulation``-th step, and resident units are loaded by the first of them only."""

    def __post_init__(self) -> None:
        roles = [u.role for u in self.units]
        if len(roles) < 3 or roles[0] is not UnitRole.EMBEDDING or roles[-1] is not UnitRole.HEAD \
                or any(r is not UnitRole.BLOCK for r in roles[1:-1]):
            raise ValueError("Profile.units must be: one embedding, at least one block, one head, in that order")
        if not self.link_bytes_per_s > 0:
            raise ValueError(f"Profile.link_bytes_per_s must be positive, got {self.link_bytes_per_s}")
        if self.hidden_bytes <= 0 or self.slot_bytes <= 0:
            raise ValueError("Profile.hidden_bytes and slot_bytes must be positive")
        if any(not 0 < f < 1 for f in self.fractions) or list(self.fractions) != sorted(set(self.fractions)):
            raise ValueError(f"Profile.fractions must be increasing, each in (0, 1), got {self.fractions}")
        for u in self.units[1:-1]:
            lengths = {len(getattr(u, f)) for f in _AT_FIELDS}
            if lengths != {len(self.fractions)}:
                raise ValueError(f"{u.name}: each of {', '.join(_AT_FIELDS)} needs one entry per Profile.fractions "
                                 f"({len(self.fractions)}), got lengths {sorted(lengths)}")
        if not self.compute_scale > 0:
            raise ValueError(f"Profile.compute_scale must be positive, got {self.compute_scale}")
        if not self.pageable_link_bytes_per_s >= 0:
            raise ValueError(f"Profile.pageable_link_bytes_per_s must be >= 0, got "
                             f"{self.pageable_link_bytes_per_s}")
        if not self.copy_compute_s_per_byte >= 0:
            raise ValueError(f"Profile.copy_compute_s_per_byte must be >= 0, got {self.copy_compute_s_per_byte}")
        if isinstance(self.accumulation, bool) or not isinstance(self.accumulation, int) or self.accumulation < 1:
            raise ValueError(f"Profile.accumulation must be an int >= 1, got {self.accumulation!r}")
        if self.update_schedule == "eager" and self.accumulation > 1:
            raise ValueError("Profile.update_schedule='eager' updates every step: it needs accumulation=1")
        if self.update_schedule not in UPDATE_SCHEDULES:
            raise ValueError(f"Profile.update_schedule must be one of {UPDATE_SCHEDULES}, got {self.update_schedule!r}")

    @property
    def blocks(self) -> range:
        """Unit indices of the blocks."""
        return range(1, len(self.units) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for u in d["units"]:
            u["role"] = u["role"].value
            u["borrowed_grad_bytes"] = [list(x) for x in u["borrowed_grad_bytes"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        units = tuple(UnitCost(**{**u, "role": UnitRole(u["role"]),
                                  "borrowed_grad_bytes": tuple(tuple(x) for x in u["borrowed_grad_bytes"]),
                                  **{f: tuple(u.get(f, ())) for f in _AT_FIELDS}})
                      for u in d["units"])
        return cls(**{**d, "units": units, "fractions": tuple(d.get("fractions", ()))})
