"""The checkpointer: takes requests at step boundaries and runs each one on two threads.

Why two threads: the copier moves each unit's state into the staging ring inside the unit's
immutability window (``snapshot.py``); the writer streams staged units into shards, then runs
the commit protocol and retention (``commit.py``). The training thread only captures the small
train state and starts them; the optimizer thread only passes the per-unit barrier. At most
one checkpoint is in flight: a request that finds one still running waits for it
(``on_busy="wait"``) or is skipped (``"skip"``). A failure (disk full, I/O error, timeout)
aborts that checkpoint only: every barrier is released, the in-flight directory deleted, and
the error is handed to the next step's metrics and the log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from horizon.checkpoint.commit import abandon, clean_leftovers, commit, new_inflight_dir, retain
from horizon.checkpoint.config import CheckpointConfig
from horizon.checkpoint.disk import Disk
from horizon.checkpoint.manifest import build_manifest, layout_hash, layout_of, tensor_name
from horizon.checkpoint.shard import QUEUE_DEPTH, PendingShard, start_shard
from horizon.checkpoint.snapshot import ROLES, Snapshot
from horizon.checkpoint.staging import StagingRing
from horizon.store.host_store import HostStore
from horizon.store.layout import ALIGN_BYTES, UnitLayout

__all__ = ["Checkpointer", "staging_plan", "CheckpointError"]

log = logging.getLogger("horizon.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that had to be written (the final one, or ``save(wait=True)``) failed."""


def staging_plan(config: CheckpointConfig, layouts: list[UnitLayout]) -> tuple[int, int]:
    """(bytes per staging slot, number of slots); ValueError if the budget holds no unit."""
    slot_bytes = -(-max(len(ROLES) * 4 * layout.numel for layout in layouts) // ALIGN_BYTES) * ALIGN_BYTES
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
    durable_s: float | None = None          # request to commit (time-to-durable)
    write_s: float | None = None            # the writer's busy time: shards and commit, waits for copies excluded
    first_write_s: float | None = None      # request to the first shard's writes queued (version S began to exist)
    commit_s: float | None = None           # manifest, directory fsyncs, rename and root fsync
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)


class Checkpointer:
    def __init__(self, config: CheckpointConfig, store: HostStore, *, param_names: list[list[str]],
                 model_config: dict | None, disk: Disk | None = None, ssd=None) -> None:
        self.config, self.store, self.disk = config, store, disk or Disk()
        self.ssd = ssd
        self.root = os.fspath(config.dir)
        os.makedirs(self.root, exist_ok=True)
        removed = clean_leftovers(self.root, self.disk)
        if removed:
            log.info("removed leftovers of an earlier run in %s: %s", self.root, removed)
        self.layout = layout_of(store, param_names)
        self.layout_hash = layout_hash(self.layout)
        self.model_config = model_config
        slot_bytes, num_slots = staging_plan(config, [u.layout for u in store.units])
        self.ring = StagingRing(slot_bytes=slot_bytes, num_slots=num_slots)
        self._writers = ThreadPoolExecutor(QUEUE_DEPTH, thread_name_prefix="horizon-ckpt-io")
        self._flight: _Flight | None = None
        self._errors: list[str] = []
        self.last_requested_step: int | None = None
        self.last_committed_step: int | None = None
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
        flight.threads = [threading.Thread(target=snapshot.run_copier, name="horizon-ckpt-copier", daemon=True),
                          threading.Thread(target=self._write, args=(flight,), name="horizon-ckpt-writer",
                                           daemon=True)]
        self._flight, self.last_requested_step = flight, step
        for thread in flight.threads:
            thread.start()
        return True

    def _finish_previous(self) -> None:
        flight, self._flight = self._flight, None
        if flight is None:
            return
        for thread in flight.threads:
            thread.join()
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
        snapshot, inflight = flight.snapshot, None
        started = time.perf_counter()
        try:
            inflight = new_inflight_dir(self.root, snapshot.step, self.disk)
            files, tensors, waited_s = self._write_shards(flight, inflight)
            train_state = dict(flight.train_state, adam_steps=[snapshot.adam_step[u]
                                                               for u in range(len(self.store.units))])
            manifest = build_manifest(step=snapshot.step, layout=self.layout, files=files, tensors=tensors,
                                      train_state=train_state, model_config=self.model_config,
                                      timing={"requested_unix_s": flight.requested_unix_s,
                                              "written_unix_s": time.time()})
            if time.monotonic() > flight.deadline_s:
                raise TimeoutError(f"checkpoint of step {snapshot.step} was not durable within "
                                   f"{self.config.timeout_s} s")
            commit_start = time.perf_counter()
            flight.path = commit(inflight, self.root, snapshot.step, manifest, self.disk)
            flight.commit_s = time.perf_counter() - commit_start
            flight.durable_s = time.time() - flight.requested_unix_s
            flight.write_s = time.perf_counter() - started - waited_s
            self.last_committed_step = snapshot.step
            self.num_taken += 1
            retain(self.root, keep_last=self.config.keep_last, keep_every=self.config.keep_every, disk=self.disk)
        except Exception as e:  # any failure aborts this checkpoint only
            snapshot.abort()
            if inflight is not None and flight.path is None:
                abandon(inflight, self.disk)
            flight.error = f"checkpoint of step {snapshot.step} failed: {type(e).__name__}: {e}"
            self.num_failed += 1
            self._errors.append(flight.error)
            log.error("%s", flight.error)
        finally:
            snapshot.abort()  # a no-op after success; frees the barrier in every case
            flight.done.set()

    def _write_shards(self, flight: _Flight, inflight: str) -> tuple[dict, dict, float]:
        """Every unit's shard, fsynced, in update order; (file sizes, tensor records, seconds waiting for copies).

        Shard k+1 is started (its writes queued, its CRCs computed) before shard k is finished, so the
        disk's queue never drains between shards."""
        snapshot, deadline_s = flight.snapshot, flight.deadline_s
        files, tensors, waited_s = {}, {}, 0.0
        previous = current = None  # started, not yet finished: (unit, PendingShard, sources)
        try:
            for index, unit in enumerate(snapshot.order):
                if previous is not None and not snapshot.is_staged(unit):
                    # Finish (and free the slot of) the previous shard before waiting: with a one-slot
                    # ring, the copy this writer waits for needs that slot.
                    self._finish_unit(snapshot, previous, files, tensors)
                    previous = None
                wait_start = time.perf_counter()
                snapshot.wait_staged(unit, deadline_s)
                waited_s += time.perf_counter() - wait_start
                file = f"shard-{index:05d}-of-{len(snapshot.order):05d}.safetensors"
                current = self._start_unit(snapshot, unit, os.path.join(inflight, file), deadline_s)
                if flight.first_write_s is None:
                    flight.first_write_s = time.time() - flight.requested_unix_s
                if previous is not None:  # its writes ran while this shard's were queued and CRC'd
                    self._finish_unit(snapshot, previous, files, tensors)
                previous = current
            if previous is not None:
                self._finish_unit(snapshot, previous, files, tensors)
        except BaseException:
            for started in (previous, current):  # no write may outlive the checkpoint's files
                if started is not None:
                    started[1].close()
            raise
        return files, tensors, waited_s

    def _start_unit(self, snapshot: Snapshot, unit: int, path: str, deadline_s: float) -> tuple[int, PendingShard, dict]:
        """Queue ``unit``'s shard and compute its CRCs; (unit, the pending shard, where each tensor comes from)."""
        params = self.layout[unit]["params"]
        named, where = [], {}
        for role in ROLES:
            flat = snapshot.staged_view(unit, role)
            for p in params:
                name = tensor_name(p["name"], role)
                numel = int(torch.Size(p["shape"]).numel())
                named.append((name, flat[p["offset"]:p["offset"] + numel].view(p["shape"])))
                where[name] = {"unit": unit, "role": role, "offset": p["offset"], "param": p["name"]}
        metadata = {"format": "horizon-ckpt", "step": str(snapshot.step), "unit": self.layout[unit]["name"]}
        pending = start_shard(path, named, buffer=snapshot.staged_slot(unit), metadata=metadata, disk=self.disk,
                              writers=self._writers, deadline_s=deadline_s)
        return unit, pending, where

    @staticmethod
    def _finish_unit(snapshot: Snapshot, started: tuple[int, PendingShard, dict], files: dict, tensors: dict) -> None:
        """Wait for a started shard's writes, fsync it, free its staging slot, record it for the manifest."""
        unit, pending, where = started
        nbytes, records = pending.finish()
        snapshot.mark_written(unit)
        files[os.path.basename(pending.path)] = nbytes
        tensors.update({r.name: dict(r.to_json(), **where[r.name]) for r in records})

    def close(self) -> None:
        self.wait()
        self._writers.shutdown()
