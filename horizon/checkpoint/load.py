"""Finding, validating and loading the newest good checkpoint.

Why validate everything first: a checkpoint is trusted only after its manifest parses, its
format version is one we read, every file has the size the manifest says, and every tensor's
bytes match their CRC-32. A checkpoint that fails is quarantined (renamed aside, never deleted)
and the next older one is tried. Validation reads every byte once, and loading reads it again,
so a bad checkpoint never leaves the host store half overwritten.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open

from horizon.checkpoint.commit import committed_steps, quarantine, step_dir_name
from horizon.checkpoint.manifest import CorruptCheckpoint, read_manifest
from horizon.checkpoint.shard import crc32_of

__all__ = ["verify", "find_valid", "load_into", "each_tensor", "unit_range", "NoValidCheckpoint"]


class NoValidCheckpoint(ValueError):
    """Checkpoints exist but none validates, and starting from scratch was not allowed."""


def _tensors_by_file(manifest: dict) -> dict[str, list[tuple[str, dict]]]:
    by_file: dict[str, list[tuple[str, dict]]] = {}
    for name, record in manifest["tensors"].items():
        by_file.setdefault(record["file"], []).append((name, record))
    return by_file


def _read_checked(f, directory: str, name: str, record: dict) -> torch.Tensor:
    try:
        t = f.get_tensor(name)
    except (SafetensorError, KeyError) as e:
        raise CorruptCheckpoint(f"{directory}: tensor {name} cannot be read ({e})") from e
    if list(t.shape) != record["shape"] or t.numel() * t.element_size() != record["bytes"]:
        raise CorruptCheckpoint(f"{directory}: tensor {name} has shape {list(t.shape)}, the manifest says "
                                f"{record['shape']}")
    if crc32_of(t) != record["crc32"]:
        raise CorruptCheckpoint(f"{directory}: tensor {name} fails its CRC-32 check (bytes changed on disk)")
    return t


def each_tensor(directory: str, manifest: dict, wanted=None):
    """(name, manifest record, tensor) for every tensor (or those whose record ``wanted`` accepts),
    sizes of every file and CRCs of every tensor read checked."""
    for file, entry in manifest["files"].items():
        path = os.path.join(directory, file)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CorruptCheckpoint(f"{directory}: shard {file} is missing ({e})") from e
        if size != entry["bytes"]:
            raise CorruptCheckpoint(f"{directory}: shard {file} has {size} bytes, the manifest says {entry['bytes']}")
    for file, records in _tensors_by_file(manifest).items():
        if file not in manifest["files"]:
            raise CorruptCheckpoint(f"{directory}: tensors point at {file}, which the manifest does not list")
        records = [(name, record) for name, record in records if wanted is None or wanted(record)]
        if not records:
            continue
        try:
            with safe_open(os.path.join(directory, file), framework="pt") as f:
                for name, record in records:
                    yield name, record, _read_checked(f, directory, name, record)
        except SafetensorError as e:
            raise CorruptCheckpoint(f"{directory}: shard {file} is not a valid safetensors file ({e})") from e


def verify(directory: str, manifest: dict | None = None) -> dict:
    """Check one checkpoint directory end to end; its manifest, or CorruptCheckpoint."""
    manifest = manifest if manifest is not None else read_manifest(directory)
    for _ in each_tensor(directory, manifest):
        pass
    adam_steps = manifest["train_state"].get("adam_steps", [])
    if any(s != manifest["step"] for s in adam_steps):
        raise CorruptCheckpoint(f"{directory}: Adam step counts {sorted(set(adam_steps))} differ from the "
                                f"checkpoint's step {manifest['step']}")
    return manifest


def find_valid(root: str, *, layout_hash: str, allow_fresh_start: bool) -> tuple[str, dict] | None:
    """The newest checkpoint under ``root`` that validates, as (directory, manifest); None if there are none.

    Corrupt ones are quarantined on the way. A checkpoint of a different model raises ValueError;
    all of them corrupt raises NoValidCheckpoint unless ``allow_fresh_start``."""
    steps = committed_steps(root)
    failures = []
    for step in reversed(steps):
        directory = os.path.join(root, step_dir_name(step))
        try:
            manifest = read_manifest(directory)
            if manifest["layout_hash"] != layout_hash:
                raise ValueError(f"{directory} holds a different model (its parameter names or shapes differ "
                                 "from this one's): point CheckpointConfig.dir at this model's checkpoints")
            return directory, verify(directory, manifest)
        except CorruptCheckpoint as e:
            failures.append(quarantine(root, step, str(e)))
    if failures and not allow_fresh_start:
        raise NoValidCheckpoint(f"{root} holds checkpoints but none validates (moved aside: {failures}); pass "
                                "CheckpointConfig(allow_fresh_start=True) to train from scratch anyway")
    return None


def unit_range(record: dict, unit_numel: int, numel: int) -> tuple[int, int]:
    """The elements [start, end) of its unit that a record's tensor of ``numel`` elements holds: a
    parameter (format 1) or a flat slice (format 2) starts at ``offset``; padding past the unit's end drops."""
    return record["offset"], min(record["offset"] + numel, unit_numel)


def _held(store, index: int) -> tuple[int, int]:
    """The elements [lo, hi) of unit ``index`` whose master, m and v this process holds (its shard, or all)."""
    unit = store.units[index]
    lo = getattr(unit, "shard_start", 0)
    return lo, min(lo + unit.held_numel, unit.layout.numel)


def load_into(store, directory: str, manifest: dict, ssd=None) -> None:
    """Copy every unit's master, m and v from ``directory`` into ``store`` (CRCs checked again); units in
    ``store.ssd_units`` go to ``ssd`` (their horizon.store.ssd.SSDTier).

    Records and store are matched by unit element ranges, so a checkpoint of any number of ranks
    loads into a store of any number: each process reads only the tensors overlapping what it holds."""
    def overlaps(record: dict) -> bool:
        lo, hi = _held(store, record["unit"])
        start = record["offset"]
        end = start + int(torch.Size(record["shape"]).numel())
        return start < hi and end > lo

    for _, record, t in each_tensor(directory, manifest, wanted=overlaps):
        index = record["unit"]
        start, end = unit_range(record, store.units[index].layout.numel, t.numel())
        flat = t.reshape(-1)[:end - start]
        if index in store.ssd_units:
            ssd.load(index, record["role"], start, flat)
            continue
        lo, hi = _held(store, index)
        a, b = max(start, lo), min(end, hi)
        getattr(store.units[index], record["role"])[a - lo:b - lo].copy_(flat[a - start:b - start])
    for index, unit in enumerate(store.units):
        if index in store.streamed:
            ssd.refresh_compute(index)  # the compute copy on SSD, from the loaded master
        elif index in store.ssd_units:
            ssd.copy_state(index, {"master": unit.compute})
        else:
            unit.refresh_compute()
