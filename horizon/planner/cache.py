"""Measured profiles kept on disk, one per model shape, batch shape, link and machine.

Why: ``plan="auto"`` times every distinct block structure, each row fraction of it and the link
before its first step: seconds on a small model, minutes on a large model's blocks at a long
sequence, and again at every start although nothing it depends on has changed. The cache keys a
profile on everything the measurement depends on (the units' modules and sizes, the batch shape,
the compute dtype, the link and whether the host side is pinned, the device and host hardware,
torch's version, this module's ``MEASURE_VERSION``) and keeps it as JSON under that key. The
compute scale is not cached: ``plan="auto"`` fits it to a real step of each run
(``calibrate.py``), which also absorbs how busy the machine is that day.

What the key cannot see: a block whose forward changes while its modules print the same and hold
the same parameters (a function called in ``forward`` swapped, a config value read only there).
Its cached profile is stale; delete the file (its path is logged at INFO on ``horizon.planner``) or
set ``TrainConfig(profile_cache_dir=None)``. A stale profile can only make the plan slower, never
change the numerics. A cache that cannot be read or written is a warning, never a failed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import warnings

import torch

from horizon.engine.transfer import Transfer
from horizon.models.units import UnitSpec
from horizon.planner.profile import Profile
from horizon.store.host_store import HostStore
from horizon.store.layout import UnitLayout

__all__ = ["FORMAT", "MEASURE_VERSION", "cpu_model", "default_cache_dir", "profile_identity", "cache_path",
           "load_cached", "save_cached"]

FORMAT = "horizon-profile-cache/1"
MEASURE_VERSION = 2
"""Bump when ``measure.py`` changes what it measures or how: older cached profiles then miss."""

log = logging.getLogger("horizon.planner")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/horizon/profiles``, or ``~/.cache/horizon/profiles``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "horizon", "profiles")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: torch.device) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine["gpu"] = {"name": props.name, "capability": [props.major, props.minor],
                          "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return machine


def _unit(spec: UnitSpec, layout: UnitLayout) -> dict:
    text = f"{type(spec.module).__module__}.{type(spec.module).__qualname__}\n{spec.module!r}\n{spec.call.__qualname__}"
    return {"name": spec.name, "kind": spec.kind.value, "numel": layout.numel, "device_numel": layout.device_numel,
            "module_sha256": hashlib.sha256(text.encode()).hexdigest()}


def profile_identity(specs: list[UnitSpec], store: HostStore, *, device: torch.device, transfer: Transfer,
                     batch_size: int, seq_len: int, fractions: tuple[float, ...]) -> dict:
    """Everything ``measure_profile`` depends on, as JSON-able values (the cache key is its hash)."""
    return {"measure_version": MEASURE_VERSION, "torch": torch.__version__, "device": device.type,
            "machine": _machine(device), "link": transfer.describe(), "pinned": store.pinned,
            "compute_dtype": str(store.compute_dtype), "batch_size": batch_size, "seq_len": seq_len,
            "fractions": list(fractions),
            "units": [_unit(s, u.layout) for s, u in zip(specs, store.units, strict=True)]}


def cache_path(cache_dir: str | os.PathLike, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir, f"{digest[:32]}.json")


def load_cached(cache_dir: str | os.PathLike, identity: dict) -> Profile | None:
    """The profile cached for ``identity``; None when there is none (or it cannot be read: a warning)."""
    path = cache_path(cache_dir, identity)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("format") != FORMAT or record.get("identity") != identity:
            raise ValueError(f"not a {FORMAT} record of this identity")
        profile = Profile.from_dict(record["profile"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        warnings.warn(f"ignoring the cached profile {path} ({e}); measuring again", stacklevel=3)
        return None
    log.info("plan='auto': the profile cached at %s (delete it to measure again)", path)
    return profile


def save_cached(cache_dir: str | os.PathLike, identity: dict, profile: Profile) -> None:
    """Write the profile under ``identity``'s key, whole or not at all (a temporary file renamed)."""
    path = cache_path(cache_dir, identity)
    record = {"format": FORMAT, "identity": identity, "profile": profile.to_dict()}
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"could not cache the measured profile in {cache_dir} ({e}); the next run measures again",
                      stacklevel=3)
        return
    log.info("plan='auto': measured the profile, cached at %s", path)
