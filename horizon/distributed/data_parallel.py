"""Data parallelism over the host store: gradients summed across ranks, replicas kept identical.

Why this shape: each rank runs the engine on its own micro-batch exactly as a single process
would, except that the loss is divided by the *global* count of labels that are not ignored
(all-reduced before the step), so the sum over ranks of the per-rank gradients is the gradient of
one process on the concatenated batch. That sum is an all-reduce of each unit's flat gradient in
the host store, run on the optimizer thread as soon as the unit's gradient lands and before its
norm or update, so it overlaps the backward of the units below. Every rank then holds the same
gradient, takes the same global norm, makes the same clip and skip decisions and applies the same
AdamW update: the replicas never drift apart. Bytes moved per step: see docs/distributed.md.

``ShardedDataParallel`` is the same contract with the whole store split across ranks
(``ShardedHostStore``, ZeRO-3): the engine all-gathers each unit's weights into its device slot
before the unit computes and reduce-scatters its gradient on the device after its backward
(``gather_into`` and ``reduce_scatter_into``, issued by the engine's transfer), so the host
gradient is already this rank's shard of the sum; the norm is the square root of the all-reduced
sum of the shards' squared norms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from horizon.distributed.sharded_store import ShardedHostStore, ShardedUnitBuffers
from horizon.distributed.world import World
from horizon.store.host_store import HostStore, UnitBuffers
from horizon.store.layout import UnitLayout

__all__ = ["DataParallel", "ShardedDataParallel", "PeerFailure"]

# torch 2.13 renamed the tensor forms (the old names warn); torch 2.11 has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, or stopped answering for longer than the timeout."""


class DataParallel:
    """The collectives of one data-parallel trainer, with the payload bytes each kind moved."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.bytes_reduced = 0
        """Gradient bytes this rank handed to all-reduce or reduce-scatter (its payload; an all-reduce's wire
        carries 2(W-1)/W of it, a reduce-scatter's (W-1)/W)."""
        self.bytes_broadcast = 0
        """Weight bytes rank 0 sent when the trainer started (a broadcast; sharded, a scatter of the masters)."""
        self.bytes_gathered = 0
        """Weight bytes all-gathered into device slots (sharded only: each gather's output, this rank's piece included)."""

    def make_store(self, layouts: list[UnitLayout], *, compute_dtype: torch.dtype, pin: bool,
                   accumulate: bool) -> HostStore:
        return HostStore(layouts, compute_dtype=compute_dtype, pin=pin, accumulate=accumulate)

    def local_decay_runs(self, store: HostStore, runs: list[list[tuple[int, int, float]]]):
        """Per unit, the ``(start, end, weight_decay)`` element ranges this rank updates."""
        return runs

    def _run(self, what: str, collective: Callable[[], object]) -> None:
        try:
            collective()
        except (RuntimeError, dist.DistBackendError) as e:
            w = self.world
            raise PeerFailure(
                f"rank {w.rank} of {w.world_size}: the {what} collective failed ({type(e).__name__}: {e}). "
                f"Another rank died or did not answer within DistributedConfig.timeout_s={w.timeout_s:g} s; read "
                "the other ranks' logs, and raise timeout_s if a rank is only slow (a long CPU optimizer phase)"
            ) from e

    def broadcast_store(self, store: HostStore) -> None:
        """Give every rank rank 0's initial weights (the compute copies follow from the masters)."""
        for unit in store.units:
            self._run("initial weight broadcast", lambda: dist.broadcast(unit.master, src=0, group=self.world.scalars))
            unit.refresh_compute()
            self.bytes_broadcast += unit.master.numel() * unit.master.element_size()

    def from_rank_zero(self, compute: Callable[[], object]) -> object:
        """``compute()`` run on rank 0 alone (say, validating checkpoints), its result on every rank; an
        exception it raises is raised on every rank."""
        outcome: list = [None]
        if self.world.rank == 0:
            try:
                outcome = [(True, compute())]
            except Exception as e:  # handed to every rank, then raised here too
                outcome = [(False, e)]
        self._run("rank 0's result broadcast",
                  lambda: dist.broadcast_object_list(outcome, src=0, group=self.world.scalars))
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def global_count(self, count: int) -> int:
        """The sum over ranks of ``count`` (the labels each rank's micro-batch lets count)."""
        total = torch.tensor([count], dtype=torch.int64)
        self._run("label count all-reduce", lambda: dist.all_reduce(total, group=self.world.scalars))
        return int(total)

    def global_max(self, values: tuple[int, ...]) -> tuple[int, ...]:
        """The element-wise maximum over ranks of ``values`` (the batch shapes plan="auto" plans for)."""
        most = torch.tensor(values, dtype=torch.int64)
        self._run("shape all-reduce", lambda: dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.world.scalars))
        return tuple(int(v) for v in most)

    def global_sum(self, value: float) -> float:
        """The sum over ranks of ``value`` in float64 (the loss sums, for the reported loss)."""
        total = torch.tensor([value], dtype=torch.float64)
        self._run("loss all-reduce", lambda: dist.all_reduce(total, group=self.world.scalars))
        return float(total)

    def reduce(self, unit: UnitBuffers, flat: torch.Tensor) -> torch.Tensor:
        """Replace ``flat`` (a unit's whole host gradient) by its sum over ranks and return it; on the
        optimizer thread. A 16-bit gradient is summed in fp32 and rounded once at the end."""
        work = flat if flat.dtype == torch.float32 else flat.float()
        self._run("gradient all-reduce", lambda: dist.all_reduce(work, group=self.world.grads))
        if work is not flat:
            flat.copy_(work)
        self.bytes_reduced += work.numel() * work.element_size()
        return flat

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The norm of the whole summed gradient: every rank holds all of it already."""
        return local_norm

    def whole(self, unit: UnitBuffers, flat: torch.Tensor) -> torch.Tensor:
        """``unit``'s optimizer-state buffer ``flat`` as the whole unit: here every rank holds it all."""
        return flat


class ShardedDataParallel(DataParallel):
    """Data parallelism with master, m and v split across ranks (``ShardedHostStore``)."""

    def make_store(self, layouts: list[UnitLayout], *, compute_dtype: torch.dtype, pin: bool,
                   accumulate: bool) -> ShardedHostStore:
        return ShardedHostStore(layouts, rank=self.world.rank, world_size=self.world.world_size,
                                compute_dtype=compute_dtype, pin=pin, accumulate=accumulate, scatter=self.scatter)

    def local_decay_runs(self, store: ShardedHostStore, runs: list[list[tuple[int, int, float]]]):
        out = []
        for unit, unit_runs in zip(store.units, runs):
            lo, hi = unit.shard_start, unit.shard_start + unit.valid_numel
            out.append([(max(a, lo) - lo, min(b, hi) - lo, decay) for a, b, decay in unit_runs if a < hi and b > lo])
        return out

    def broadcast_store(self, store: ShardedHostStore) -> None:
        """Nothing to do: ``ShardedHostStore.adopt`` scattered rank 0's weights (or each rank read its slices)."""

    def scatter(self, unit: ShardedUnitBuffers, source: torch.Tensor | None) -> None:
        """Hand each rank its piece of rank 0's padded fp32 ``source`` of ``unit`` (None on the other ranks)."""
        pieces = list(source.split(unit.shard_numel)) if source is not None else None
        self._run("initial weight scatter", lambda: dist.scatter(unit.master, pieces, src=0, group=self.world.scalars))
        self.bytes_broadcast += unit.master.numel() * unit.master.element_size() * self.world.world_size

    def reduce(self, unit: ShardedUnitBuffers, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` itself: the engine's reduce-scatter already made it this rank's shard of the sum."""
        return flat

    def gather_into(self, out: torch.Tensor, piece: torch.Tensor) -> None:
        """All-gather every rank's ``piece`` into ``out`` (W pieces long; ``piece`` may be this rank's part
        of it); on the engine's transfer thread (CPU) or a collective stream (CUDA)."""
        self._run("weight all-gather", lambda: _all_gather(out, piece, group=self.world.device))
        self.bytes_gathered += out.numel() * out.element_size()

    def reduce_scatter_into(self, out: torch.Tensor, whole: torch.Tensor) -> None:
        """Sum ``whole`` (a unit's padded fp32 gradient) over ranks, leaving this rank's piece in ``out``."""
        self._run("gradient reduce-scatter", lambda: _reduce_scatter(out, whole, group=self.world.device))
        self.bytes_reduced += whole.numel() * whole.element_size()

    def whole(self, unit: ShardedUnitBuffers, flat: torch.Tensor) -> torch.Tensor:
        """A new tensor of ``unit``'s whole optimizer-state buffer, gathered from every rank's shard ``flat``."""
        out = flat.new_empty(unit.shard_numel * self.world.world_size)
        self._run("optimizer state all-gather", lambda: _all_gather(out, flat, group=self.world.scalars))
        return out[:unit.layout.numel]

    def put_masters(self, state: dict[str, torch.Tensor], store: ShardedHostStore, model: torch.nn.Module) -> None:
        """In ``model.state_dict()``, replace the (meta) parameters by fp32 masters gathered from every
        rank's shard (new tensors; a collective: call it on every rank)."""
        keys_of: dict[int, list[str]] = {}
        for key, p in model.named_parameters(remove_duplicate=False):
            keys_of.setdefault(id(p), []).append(key)
        for unit in store.units:
            masters = unit.views(self.whole(unit, unit.master))
            for slot, param in zip(unit.layout.own, unit.params, strict=True):
                for key in keys_of.get(id(param), ()):
                    state[key] = masters[slot.local_name]

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """sqrt of the sum over ranks of the squared norms of their gradient shards."""
        squared = local_norm.double().square().reshape(1)
        self._run("gradient norm all-reduce", lambda: dist.all_reduce(squared, group=self.world.scalars))
        return squared.sqrt().reshape(()).to(local_norm.dtype)
