"""Shared helpers for Horizon's benchmarks: machine description, CPU contention meter, timing, JSON output.

Every benchmark writes one JSON file under bench/results/ with the same top-level keys (bench, unit,
higher_is_better, results, config, machine, date); ``result_record`` builds that envelope so the files
stay comparable across benchmarks and machines.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import resource
import statistics
import time

import torch

from horizon.models import Decoder, decoder_config
from horizon.planner.cache import cpu_model

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
_TICKS_S = os.sysconf("SC_CLK_TCK")


def machine_info() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _machine_busy_s() -> float:
    """CPU seconds all processes spent busy since boot (all but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:9]))
    return (sum(v) - v[3] - v[4]) / _TICKS_S


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """How much CPU *other* processes used between ``start()`` and ``stop()`` (None where unreadable).

    A benchmark whose ``other_cpu_s`` is more than a few percent of its wall time ran on a busy
    machine and should be run again.
    """

    def start(self) -> "CpuMeter":
        self._own0, self._wall0 = _own_cpu_s(), time.perf_counter()
        try:
            self._busy0 = _machine_busy_s()
        except OSError:
            self._busy0 = None
        return self

    def stop(self) -> dict:
        own = _own_cpu_s() - self._own0
        wall = time.perf_counter() - self._wall0
        other = None if self._busy0 is None else max(0.0, _machine_busy_s() - self._busy0 - own)
        return {"wall_s": round(wall, 3), "own_cpu_s": round(own, 3),
                "other_cpu_s": None if other is None else round(other, 3)}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def median(xs) -> float:
    return statistics.median(xs)


def git_state() -> dict | None:
    """The commit the benchmark ran on and whether the tree had uncommitted changes (None outside git)."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def result_record(bench: str, *, unit: str, higher_is_better: bool, results: dict, config: dict,
                  **extra) -> dict:
    return {"bench": bench, "unit": unit, "higher_is_better": higher_is_better, "results": results,
            **extra, "config": config, "machine": machine_info(), "git": git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str | os.PathLike, record: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def add_decoder_args(p, *, batch: int = 4, seq: int = 256, link_help: str = "throttled CPU link (GB/s)") -> None:
    """The planner benches' model and link (bench/planner.py, residency.py, profile_cache.py): ``--layers``
    blocks of ``--dim``, a ``--vocab`` head, ``--batch`` x ``--seq`` tokens a step, a ``--link-gbps`` link."""
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--link-gbps", type=float, default=0.5, help=link_help)


def planner_decoder(a) -> Decoder:
    """The decoder of ``add_decoder_args``' options (8 heads, 4 of them for keys and values)."""
    torch.manual_seed(0)
    return Decoder(decoder_config("small", dim=a.dim, num_layers=a.layers, vocab_size=a.vocab, num_heads=8,
                                  num_kv_heads=4, ffn_dim=None))
