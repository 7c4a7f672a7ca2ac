"""Checkpoint write path: where a shard's time goes, and Horizon's writer against the disk's limit.

One run, the same staged state (units of master, m and v in page-aligned staging slots), written as
one safetensors shard per unit and fsynced, by:
  * buffered_serial_crc  the previous writer: CRC-32 of a tensor, then os.write through the page cache,
                         tensor after tensor; fsync + POSIX_FADV_DONTNEED per shard
  * horizon              horizon.checkpoint.shard.write_shard: O_DIRECT, 16 MiB positioned writes on
                         QUEUE_DEPTH threads, CRC-32 on the calling thread meanwhile
and the pieces, each alone over the same bytes: zlib.crc32, a memcpy, buffered write without fsync,
the fsync after it, O_DIRECT at queue depth 1 and at QUEUE_DEPTH (no CRC). The limit is the disk's
sequential direct write bandwidth in the same run: fio (direct=1, bs=8M, iodepth=16) when installed,
else the better of one ``dd oflag=direct bs=64M`` (queue depth 1, which understates the device) and
QUEUE_DEPTH of them in parallel; all three are measured and reported when available. Systems alternate A/B, medians of --repeats.

    python bench/checkpoint_write.py [--units 8 --unit-mib 48 --repeats 3 --dir /tmp/horizon-ckpt-write]
Writes bench/results/checkpoint_write.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from horizon.checkpoint import Disk
from horizon.checkpoint.shard import QUEUE_DEPTH, WRITE_CHUNK_BYTES, write_shard
from horizon.checkpoint.staging import aligned_empty
from horizon.store.layout import ALIGN_BYTES

from _common import RESULTS_DIR, CpuMeter, median, result_record, write_json

TENSORS_PER_ROLE = 4


def staged_units(num_units: int, unit_bytes: int) -> list[tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]]:
    """Per unit: its staging slot and the fp32 tensors (3 roles x TENSORS_PER_ROLE) tiling it."""
    units = []
    per_tensor = unit_bytes // (3 * TENSORS_PER_ROLE) // 4
    for u in range(num_units):
        slot = aligned_empty(-(-unit_bytes // ALIGN_BYTES) * ALIGN_BYTES)
        flat = slot[:3 * TENSORS_PER_ROLE * per_tensor * 4].view(torch.float32)
        flat.copy_(torch.randn(flat.numel(), generator=torch.Generator().manual_seed(u)))
        named = [(f"u{u}.t{i}", flat[i * per_tensor:(i + 1) * per_tensor]) for i in range(3 * TENSORS_PER_ROLE)]
        units.append((slot, named))
    return units


def previous_writer(path: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """The writer before O_DIRECT, reproduced: header, then per tensor CRC and a buffered write; fsync."""
    header, offset = {"__metadata__": {}}, 0
    for name, t in tensors:
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * 4]}
        offset += t.numel() * 4
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            data = memoryview(t.view(torch.uint8).numpy())
            zlib.crc32(data)
            while len(data):
                data = data[os.write(fd, data):]
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _fresh(directory: str) -> str:
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    return directory


def run_system(system: str, units, directory: str, writers: ThreadPoolExecutor) -> float:
    """Seconds to write and fsync every unit's shard."""
    _fresh(directory)
    start = time.perf_counter()
    for u, (slot, named) in enumerate(units):
        path = os.path.join(directory, f"shard-{u:05d}.safetensors")
        if system == "buffered_serial_crc":
            previous_writer(path, named)
        else:
            write_shard(path, named, buffer=slot, metadata={}, disk=Disk(), writers=writers,
                        deadline_s=time.monotonic() + 600)
    return time.perf_counter() - start


def _direct_only(units, directory: str, threads: int) -> float:
    _fresh(directory)
    disk, start = Disk(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for u, (slot, _) in enumerate(units):
            fd = disk.open_new(os.path.join(directory, f"d{u}"), direct=True)
            data = memoryview(slot.numpy())
            list(pool.map(lambda o: disk.write(fd, data[o:o + WRITE_CHUNK_BYTES], o),
                          range(0, len(data), WRITE_CHUNK_BYTES)))
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def pieces(units, directory: str) -> dict[str, float]:
    """Seconds for each piece of the write path alone, over all units' bytes."""
    slots = [memoryview(slot.numpy()) for slot, _ in units]
    out = {}
    t0 = time.perf_counter()
    for s in slots:
        zlib.crc32(s)
    out["crc32"] = time.perf_counter() - t0
    scratch = np.empty(len(slots[0]), dtype=np.uint8)
    t0 = time.perf_counter()
    for s in slots:
        np.copyto(scratch, np.frombuffer(s, dtype=np.uint8))
    out["memcpy"] = time.perf_counter() - t0
    _fresh(directory)
    fds, t0 = [], time.perf_counter()
    for u, s in enumerate(slots):
        fd = os.open(os.path.join(directory, f"b{u}"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, s)
        fds.append(fd)
    out["buffered_write"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    out["fsync_after_buffered"] = time.perf_counter() - t0
    out["direct_qd1"] = _direct_only(units, directory, 1)
    out[f"direct_qd{QUEUE_DEPTH}"] = _direct_only(units, directory, QUEUE_DEPTH)
    return out


def _dd(path: str, mib: int) -> subprocess.Popen:
    return subprocess.Popen(["dd", "if=/dev/zero", f"of={path}", "bs=64M", f"count={mib // 64}", "oflag=direct",
                             "conv=fsync"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _fio(path: str, total_mib: int) -> float:
    out = subprocess.run(["fio", "--name=w", f"--filename={path}", "--rw=write", "--bs=8M", "--direct=1",
                          f"--size={total_mib}M", "--iodepth=16", "--ioengine=libaio", "--end_fsync=1",
                          "--output-format=terse"], capture_output=True, text=True, check=True).stdout
    return float(out.split(";")[47]) * 1024  # terse v3 field 48: write bandwidth, KiB/s


def _dd_parallel(paths: list[str], total_mib: int) -> float:
    start = time.perf_counter()
    procs = [_dd(p, total_mib // len(paths)) for p in paths]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"dd failed: {err}")
    return total_mib * 2**20 / (time.perf_counter() - start)


def disk_limit(directory: str, total_mib: int = 2048, jobs: int = QUEUE_DEPTH) -> tuple[float, str, dict]:
    """Sequential direct write bandwidth (bytes/s) of the disk under ``directory``, the tool, and every
    measurement: fio at queue depth 16 when installed (the limit), one dd (queue depth 1) and ``jobs``
    parallel dd's (queue depth ``jobs``; the limit when fio is missing)."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"disk-limit-{j}.bin") for j in range(jobs)]
    try:
        details = {"dd_qd1_bytes_per_s": _dd_parallel(paths[:1], total_mib),
                   f"dd_x{jobs}_bytes_per_s": _dd_parallel(paths, total_mib)}
        if shutil.which("fio"):
            details["fio_qd16_bytes_per_s"] = _fio(paths[0], total_mib)
            return details["fio_qd16_bytes_per_s"], "fio direct=1 bs=8M iodepth=16 libaio end_fsync=1", details
        return max(details.values()), (f"max of 1 and {jobs} parallel dd oflag=direct bs=64M conv=fsync "
                                       "(fio not installed)"), details
    finally:
        for p in paths:
            if os.path.exists(p):
                os.remove(p)


def same_size_limit(directory: str, nbytes: int, runs: int = 5) -> float | None:
    """fio's rate (bytes/s, the median of ``runs``) writing ``nbytes`` (rounded up to its 8 MiB blocks) to a
    new file and fsyncing it: what the disk allows for one checkpoint's bytes, its start-up and final flush
    included, where ``disk_limit``'s 2 GiB measure the sustained rate. None without fio."""
    if not shutil.which("fio"):
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "same-size.bin")
    rates = []
    try:
        for _ in range(runs):
            if os.path.exists(path):
                os.remove(path)
            rates.append(_fio(path, -(-nbytes // (8 << 20)) * 8))
    finally:
        if os.path.exists(path):
            os.remove(path)
    return median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=8, help="shards (units) per checkpoint")
    parser.add_argument("--unit-mib", type=int, default=48, help="MiB of master + m + v per unit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/horizon-ckpt-write", help="scratch directory on the disk to test")
    parser.add_argument("--out", default=str(RESULTS_DIR / "checkpoint_write.json"))
    args = parser.parse_args()
    units = staged_units(args.units, args.unit_mib << 20)
    total = sum(t.numel() * 4 for _, named in units for _, t in named)
    meter = CpuMeter().start()
    systems = ("buffered_serial_crc", "horizon")
    times: dict[str, list[float]] = {s: [] for s in systems}
    limits, piece_runs = [], []
    with ThreadPoolExecutor(QUEUE_DEPTH) as writers:
        for _ in range(args.repeats):  # A/B alternation; the limit measured between them
            for system in systems:
                times[system].append(run_system(system, units, os.path.join(args.dir, system), writers))
            limits.append(disk_limit(os.path.join(args.dir, "limit")))
            piece_runs.append(pieces(units, os.path.join(args.dir, "pieces")))
    shutil.rmtree(args.dir, ignore_errors=True)
    limit = median([bps for bps, _, _ in limits])
    bps = {s: total / median(times[s]) for s in systems}
    piece_s = {k: median([p[k] for p in piece_runs]) for k in piece_runs[0]}
    for s in systems:
        print(f"{s:20s} {bps[s] / 1e9:5.2f} GB/s = {bps[s] / limit:.2f} of the limit  (runs {times[s]})")
    print(f"limit {limit / 1e9:.2f} GB/s ({limits[0][1]}); details {[d for _, _, d in limits]}")
    print("pieces alone, GB/s: " + ", ".join(f"{k} {total / v / 1e9:.2f}" for k, v in piece_s.items()))
    record = result_record(
        "checkpoint_write", unit="bytes/s written and fsynced", higher_is_better=True,
        results={"horizon": bps["horizon"], "buffered_serial_crc": bps["buffered_serial_crc"], "limit": limit},
        ratios={"vs_limit": bps["horizon"] / limit, "vs_buffered_serial_crc": bps["horizon"] / bps["buffered_serial_crc"],
                "buffered_serial_crc_vs_limit": bps["buffered_serial_crc"] / limit},
        limit_tool=limits[0][1], limit_runs=[{"bytes_per_s": b, **d} for b, _, d in limits],
        pieces_bytes_per_s={k: total / v for k, v in piece_s.items()}, runs_s=times, cpu=meter.stop(),
        config={"bytes": total, "queue_depth": QUEUE_DEPTH, "write_chunk_bytes": WRITE_CHUNK_BYTES, **vars(args)})
    print("wrote", write_json(args.out, record))


if __name__ == "__main__":
    main()
