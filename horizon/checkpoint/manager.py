"""The checkpointer: takes requests at step boundaries and runs each one on two threads.

Why two threads: the copier moves each unit's state into the staging ring inside the unit's
immutability window (``snapshot.py``); the writer streams staged units into shards, then runs
the commit protocol and retention (``commit.py``). The training thread only captures the small
train state and starts them; the optimizer thread only passes the per-unit barrier. At most
one checkpoint is in flight: a request that finds one still running waits for it
(``on_busy="wait"``) or is skipped (``"skip"``). A failure (disk full, I/O error, timeout)
aborts that checkpoint only: every barrier is released, the in-flight directory deleted, and
the error is handed to the next step's metrics and the log.

In a sharded run (``ranks``) every rank's checkpointer writes the units' shards it holds into one
shared in-flight directory; the writers then exchange their files or errors and rank 0 alone
writes the manifest, commits and applies retention (``ranks.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from horizon.checkpoint.commit import abandon, clean_leftovers, new_inflight_dir, publish, retain, write_manifest
from horizon.checkpoint.config import CheckpointConfig
from horizon.checkpoint.disk import Disk
from horizon.checkpoint.contents import Contents
from horizon.checkpoint.manifest import layout_hash, layout_of
from horizon.checkpoint.ranks import RankGroup
from horizon.checkpoint.recycle import FilePool
from horizon.checkpoint.shard import QUEUE_DEPTH, PendingShard, start_shard
from horizon.checkpoint.snapshot import ROLES, Snapshot
from horizon.checkpoint.staging import StagingRing
from horizon.store.host_store import HostStore
from horizon.store.layout import ALIGN_BYTES, UnitLayout

__all__ = ["Checkpointer", "staging_plan", "CheckpointError"]

log = logging.getLogger("horizon.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that had to be written (the final one, or ``save(wait=True)``) failed."""


def staging_plan(config: CheckpointConfig, layouts: list[UnitLayout], *, world_size: int = 1) -> tuple[int, int]:
    """(bytes per staging slot, number of slots); ValueError if the budget holds no unit.

    ``world_size`` > 1: a sharded run, whose ranks stage their 1/W shard of each unit."""
    largest = max(-(-layout.numel // world_size) for layout in layouts)
    slot_bytes = -(-len(ROLES) * 4 * largest // ALIGN_BYTES) * ALIGN_BYTES
    if config.staging_bytes is None:
        return slot_bytes, len(layouts)
    if config.staging_bytes < slot_bytes:
        raise ValueError(f"CheckpointConfig.staging_bytes={config.staging_bytes} cannot hold the largest unit's "
                         f"master, m and v ({slot_bytes} bytes): raise it to at least {slot_bytes}, or None")
    return slot_bytes, min(len(layouts), config.staging_bytes // slot_bytes)


@dataclasses.dataclass
class _Flight:
    """One checkpoint in flight."""

    snapshot: Snapshot
    train_state: dict
    requested_unix_s: float
    deadline_s: float                       # time.monotonic() by which it must be durable
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    path: str | None = None                 # the committed directory
    error: str | None = None
    durable_s: float | None = None          # request to durable: the root fsynced after the rename (time-to-durable)
    done_s: float | None = None             # request to the writer done: durable_s + retention's deletes
    write_s: float | None = None            # the writer's busy time to durable: waits for copies excluded
    first_write_s: float | None = None      # request to the first shard's writes queued (version S began to exist)
    commit_s: float | None = None           # after the last shard's fsync: directory fsyncs, rename, root fsync
                                            # (and a sharded run's manifest; one process writes it earlier)
    retain_s: float | None = None           # retention's deletes of older checkpoints, after the commit
    shards: list[PendingShard] = dataclasses.field(default_factory=list)  # their crc_s, io_wait_s, fsync_s
    tasks: list[Future] = dataclasses.field(default_factory=list)  # its copier's and writer's


class Checkpointer:
    def __init__(self, config: CheckpointConfig, store: HostStore, *, param_names: list[list[str]],
                 model_config: dict | None, disk: Disk | None = None, ssd=None, ranks: RankGroup | None = None) -> None:
        self.config, self.store, self.disk = config, store, disk or Disk()
        self.ssd = ssd
        self.ranks = ranks
        """A sharded run's ranks (each writes the shards it holds, rank 0 commits); None: this process writes all."""
        self.root = os.fspath(config.dir)
        self.commits = ranks is None or ranks.rank == 0
        """This process writes manifests, commits, applies retention and cleans leftovers."""
        os.makedirs(self.root, exist_ok=True)
        removed = clean_leftovers(self.root, self.disk) if self.commits else []
        if removed:
            log.info("removed leftovers of an earlier run in %s: %s", self.root, removed)
        self.pool = FilePool(self.root, self.disk) if config.recycle_files else None
        """Shard files of retired checkpoints, written over by the next ones (``recycle.py``)."""
        layout = layout_of(store, param_names)
        self.layout_hash = layout_hash(layout)
        self.contents = Contents(store, layout, ranks=ranks, model_config=model_config)
        """What the files hold: shard names, each unit's tensors, the manifest (``contents.py``)."""
        slot_bytes, num_slots = staging_plan(config, [u.layout for u in store.units],
                                             world_size=ranks.world_size if ranks else 1)
        self.ring = StagingRing(slot_bytes=slot_bytes, num_slots=num_slots)
        self._writers = ThreadPoolExecutor(QUEUE_DEPTH, thread_name_prefix="horizon-ckpt-io")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="horizon-ckpt-finish")
        """Finishes started shards in order (waits for their writes, fsyncs, frees their slots)."""
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="horizon-ckpt-copier")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="horizon-ckpt-writer")
        """The copier and writer threads live as long as the checkpointer: a request hands them work without
        waiting for new threads to start (two ``Thread.start`` cost the training thread 0.9 ms median,
        up to 4 ms, of a 2.6 ms request beside training)."""
        self._flight: _Flight | None = None
        self._errors: list[str] = []
        self.last_requested_step: int | None = None
        self.last_committed_step: int | None = None
        self.committed_steps: list[int] = []
        """Every step this checkpointer committed, in commit order (the on_checkpoint callbacks read it)."""
        self.num_taken = self.num_skipped = self.num_failed = 0
        self.request_wait_s = 0.0
        """Seconds requests spent waiting for the previous checkpoint (on_busy="wait")."""
        self.request_s = 0.0
        """Seconds the training thread spent in ``request`` (that wait included)."""
        self.history: list[_Flight] = []
        """Every checkpoint finished so far (for reports and the benchmark)."""
        self.barrier_enabled = True
        """Tests only: False skips the per-unit barrier (the negative control, which must corrupt snapshots)."""
        self.optimizer_busy: Callable[[], bool] | None = None
        """Set by the trainer: True while an optimizer task runs; the copier waits for it to go idle
        (None: the copier never waits; the benchmark's control)."""

    # -- the training thread ---------------------------------------------------------------------

    def request(self, *, step: int, train_state: dict, order: list[int], after: dict[int, Future | None],
                adam_steps: list[torch.Tensor]) -> bool:
        """Start a checkpoint of ``step``; False if skipped because one is still in flight."""
        entered = time.perf_counter()
        try:
            return self._request(step=step, train_state=train_state, order=order, after=after,
                                 adam_steps=adam_steps)
        finally:
            self.request_s += time.perf_counter() - entered

    def _request(self, *, step: int, train_state: dict, order: list[int], after: dict[int, Future | None],
                 adam_steps: list[torch.Tensor]) -> bool:
        if self._flight is not None and not self._flight.done.is_set():
            if self.config.on_busy == "skip":
                self.num_skipped += 1
                log.warning("checkpoint of step %d skipped: the previous one is still being written", step)
                return False
            start = time.perf_counter()
            self._flight.done.wait()
            self.request_wait_s += time.perf_counter() - start
        self._finish_previous()
        snapshot = Snapshot(step=step, store=self.store, ring=self.ring, order=order, after=after,
                            adam_steps=adam_steps, optimizer_busy=self.optimizer_busy, ssd=self.ssd)
        snapshot.barrier_enabled = self.barrier_enabled
        flight = _Flight(snapshot=snapshot, train_state=train_state, requested_unix_s=time.time(),
                         deadline_s=time.monotonic() + self.config.timeout_s)
        self._flight, self.last_requested_step = flight, step
        flight.tasks = [self._copier.submit(snapshot.run_copier), self._writer.submit(self._write, flight)]
        return True

    def _finish_previous(self) -> None:
        flight, self._flight = self._flight, None
        if flight is None:
            return
        wait_futures(flight.tasks)  # neither raises: failures are the flight's error
        self.history.append(flight)

    def wait(self) -> _Flight | None:
        """Block until the checkpoint in flight is committed or failed; that flight (None if none)."""
        flight = self._flight
        if flight is None:
            return self.history[-1] if self.history else None
        flight.done.wait()
        self._finish_previous()
        return flight

    def take_errors(self) -> list[str]:
        """Errors of checkpoints that failed since the last call (each reported once)."""
        errors, self._errors = self._errors, []
        return errors

    @property
    def in_flight(self) -> bool:
        return self._flight is not None and not self._flight.done.is_set()

    # -- the optimizer thread ---------------------------------------------------------------------

    def before_update(self, unit: int) -> None:
        flight = self._flight
        if flight is not None:
            flight.snapshot.before_update(unit)

    # -- the writer thread ------------------------------------------------------------------------

    def _write(self, flight: _Flight) -> None:
        started_unix_s = time.time()
        try:
            written, error = self._write_and_commit(flight)
            if error is None:
                flight.done_s = time.time() - flight.requested_unix_s
                if flight.durable_s is None:  # a rank that does not commit: durable when rank 0 announced it
                    flight.durable_s = flight.done_s
                flight.write_s = flight.durable_s - (started_unix_s - flight.requested_unix_s) - written["waited_s"]
                self.last_committed_step = flight.snapshot.step
                self.committed_steps.append(flight.snapshot.step)
                self.num_taken += 1
            else:
                flight.path = None
                flight.error = f"checkpoint of step {flight.snapshot.step} failed: {error}"
                self.num_failed += 1
                self._errors.append(flight.error)
                log.error("%s", flight.error)
        finally:
            flight.snapshot.abort()  # a no-op after success; frees the barrier in every case
            flight.done.set()

    def _write_and_commit(self, flight: _Flight) -> tuple[dict | None, str | None]:
        """Write this process's files; with ranks, exchange outcomes; commit where this process commits.
        (what this process wrote, the error of the checkpoint or None). Any failure aborts this checkpoint only."""
        snapshot, inflight, error, written = flight.snapshot, None, None, None
        try:
            inflight = self.ranks.inflight_dir(self.root, self.disk) if self.ranks else \
                new_inflight_dir(self.root, snapshot.step, self.disk)
            written = self._write_shards(flight, inflight)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            snapshot.abort()  # now, not after the exchange: the optimizer must not wait for a dead writer
        try:
            everyone = [written]
            if self.ranks is not None:  # every rank, failed or not: one exchange
                everyone, error = self.ranks.agree(written, error)
            if error is None and self.commits:
                flight.path = self._commit(flight, inflight, everyone)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None and inflight is not None and flight.path is None and self.commits:
            abandon(inflight, self.disk)  # before the others hear of the failure: they find nothing left
        if self.ranks is not None:
            try:
                flight.path, error = self.ranks.announce(flight.path, error)
            except Exception as e:
                flight.path, error = None, error or f"{type(e).__name__}: {e}"
        return written, error

    def _write_shards(self, flight: _Flight, inflight: str) -> dict:
        """This process's shard files, fsynced, in update order: {"files", "tensors", "waited_s"} (file sizes,
        tensor records, seconds waiting for copies).

        The writer thread only starts shards (opens the file, queues its writes and computes its CRCs as
        the unit's copy advances); the finisher thread finishes them in order (waits for the writes, frees
        the staging slot, fsyncs). So every staged byte is queued at once and the disk's queue never drains
        while a shard is fsynced; with a one-slot ring the slot the next copy needs is freed by the
        finisher, not by the writer that waits for that copy. Once every shard is started its sizes and
        CRCs are known: where this process commits alone, the writer writes and fsyncs the manifest while
        the last shards are still being written (``publish`` follows once all are fsynced). A failed
        finish aborts the snapshot (which wakes the writer) and is the error reported."""
        snapshot, deadline_s = flight.snapshot, flight.deadline_s
        written = {"files": {}, "tensors": {}, "waited_s": 0.0}
        finishing = []  # the finish futures of flight.shards
        try:
            for index, unit in enumerate(snapshot.order):
                snapshot.wait_started(unit, deadline_s)
                path = os.path.join(inflight, self.contents.file_name(index, len(snapshot.order)))
                pending, where = self._start_unit(snapshot, unit, path, deadline_s)
                flight.shards.append(pending)
                if flight.first_write_s is None:
                    flight.first_write_s = time.time() - flight.requested_unix_s
                finishing.append(self._finisher.submit(self._finish_unit, snapshot, unit, pending))
                written["files"][os.path.basename(path)] = pending.nbytes
                written["tensors"].update({r.name: dict(r.to_json(), **where[r.name]) for r in pending.records})
            if any(pending.recycled for pending in flight.shards):
                self.pool.sync()
            if self.ranks is None:
                write_manifest(inflight, self._manifest(flight, [written]), self.disk)
            for future in finishing:
                future.result()
        except BaseException as e:
            for future in finishing:  # every finish has returned before any file is closed here
                future.exception()
            for pending in flight.shards:  # no write may outlive the checkpoint's files
                pending.close()
            failed = next((f.exception() for f in finishing if f.exception() is not None), None)
            if failed is not None and failed is not e:
                raise failed from e  # the finisher's error (a write, an fsync), not the abort it caused
            raise
        written["waited_s"] = snapshot.writer_waited_s
        return written

    def _manifest(self, flight: _Flight, everyone: list[dict]) -> dict:
        return self.contents.manifest(flight.snapshot, train_state=flight.train_state,
                                      requested_unix_s=flight.requested_unix_s, everyone=everyone)

    def _commit(self, flight: _Flight, inflight: str, everyone: list[dict]) -> str:
        """The manifest (a sharded run's: over every rank's files; a single process wrote it already), the
        atomic commit and retention; the committed path."""
        snapshot = flight.snapshot
        commit_start = time.perf_counter()
        if self.ranks is not None:
            write_manifest(inflight, self._manifest(flight, everyone), self.disk)
        if time.monotonic() > flight.deadline_s:
            raise TimeoutError(f"checkpoint of step {snapshot.step} was not durable within {self.config.timeout_s} s")
        path = publish(inflight, self.root, snapshot.step, self.disk)
        flight.durable_s = time.time() - flight.requested_unix_s
        retain_start = time.perf_counter()
        flight.commit_s = retain_start - commit_start
        retain(self.root, keep_last=self.config.keep_last, keep_every=self.config.keep_every, disk=self.disk,
               pool=self.pool)
        flight.retain_s = time.perf_counter() - retain_start
        return path

    def _start_unit(self, snapshot: Snapshot, unit: int, path: str, deadline_s: float) -> tuple[PendingShard, dict]:
        """Queue ``unit``'s shard and compute its CRCs; (the pending shard, where each tensor comes from)."""
        named, where = self.contents.tensors(snapshot, unit)
        metadata = self.contents.metadata(snapshot, unit)
        pending = start_shard(path, named, buffer=snapshot.staged_slot(unit), metadata=metadata,
                              disk=self.disk, writers=self._writers, deadline_s=deadline_s, pool=self.pool,
                              staged=lambda nbytes: snapshot.wait_copied(unit, nbytes, deadline_s))
        return pending, where

    @staticmethod
    def _finish_unit(snapshot: Snapshot, unit: int, pending: PendingShard) -> None:
        """(finisher thread) Wait for a started shard's writes, free its staging slot (the copier, which yields
        to the optimizer only while the disk has staged bytes left to write, sees it at once), fsync it; any
        failure aborts the snapshot, so the writer and the optimizer stop waiting."""
        try:
            pending.finish(written=lambda: snapshot.mark_written(unit))
        except BaseException:
            snapshot.abort()
            raise

    def close(self) -> None:
        self.wait()
        for pool in (self._copier, self._writer, self._finisher, self._writers):
            pool.shutdown()
