"""What a checkpoint's files hold: the shard file names, the tensors of a staged unit, the manifest.

Why apart from the checkpointer: the checkpointer schedules (copier, writer, finisher, commit, retention)
and the contents depend on none of it, only on the model's layout, the ranks and the staged snapshot.
One process writes every unit whole, one tensor per parameter and role (format 1); in a sharded run each
rank writes its flat 1/W slice of each unit, one tensor per role (format 2's slice records).
"""

from __future__ import annotations

import time

import torch

from horizon.checkpoint.manifest import build_manifest, tensor_name
from horizon.checkpoint.ranks import RankGroup, sharded_file_name
from horizon.checkpoint.snapshot import ROLES, Snapshot
from horizon.store.host_store import HostStore

__all__ = ["Contents"]


class Contents:
    def __init__(self, store: HostStore, layout: list[dict], *, ranks: RankGroup | None,
                 model_config: dict | None) -> None:
        self.store, self.layout, self.ranks, self.model_config = store, layout, ranks, model_config

    def file_name(self, index: int, n: int) -> str:
        if self.ranks is None:
            return f"shard-{index:05d}-of-{n:05d}.safetensors"
        return sharded_file_name(index, n, self.ranks.rank, self.ranks.world_size)

    def tensors(self, snapshot: Snapshot, unit: int) -> tuple[list, dict]:
        """(name and tensor of each of the unit's records, where each comes from) over its staged slot."""
        return self._shard_tensors(snapshot, unit) if self.ranks is not None else self._param_tensors(snapshot, unit)

    def metadata(self, snapshot: Snapshot, unit: int) -> dict:
        return {"format": "horizon-ckpt", "step": str(snapshot.step), "unit": self.layout[unit]["name"]}

    def manifest(self, snapshot: Snapshot, *, train_state: dict, requested_unix_s: float, everyone: list[dict]) -> dict:
        """The manifest over every rank's files (``everyone``: what each wrote)."""
        files = {name: n for written in everyone for name, n in written["files"].items()}
        tensors = {name: r for written in everyone for name, r in written["tensors"].items()}
        train_state = dict(train_state, adam_steps=[snapshot.adam_step[u] for u in range(len(self.store.units))])
        return build_manifest(step=snapshot.step, layout=self.layout, files=files, tensors=tensors,
                              train_state=train_state, model_config=self.model_config,
                              timing={"requested_unix_s": requested_unix_s, "written_unix_s": time.time()},
                              world_size=self.ranks.world_size if self.ranks else 1)

    def _param_tensors(self, snapshot: Snapshot, unit: int) -> tuple[list, dict]:
        """The whole unit, one tensor per parameter and role (format 1's records)."""
        named, where = [], {}
        for role in ROLES:
            flat = snapshot.staged_view(unit, role)
            for p in self.layout[unit]["params"]:
                name = tensor_name(p["name"], role)
                numel = int(torch.Size(p["shape"]).numel())
                named.append((name, flat[p["offset"]:p["offset"] + numel].view(p["shape"])))
                where[name] = {"unit": unit, "role": role, "offset": p["offset"], "param": p["name"]}
        return named, where

    def _shard_tensors(self, snapshot: Snapshot, unit: int) -> tuple[list, dict]:
        """This rank's flat shard of the unit, one tensor per role: elements [start, start + shard numel),
        zero-padded past the unit's end (format 2's slice records)."""
        start = self.store.units[unit].shard_start
        named, where = [], {}
        for role in ROLES:
            name = f"{self.layout[unit]['name']}.{role}@{start}"
            named.append((name, snapshot.staged_view(unit, role)))
            where[name] = {"unit": unit, "role": role, "offset": start, "param": None}
        return named, where
