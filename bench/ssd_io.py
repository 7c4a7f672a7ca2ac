"""SSD tier I/O: sequential O_DIRECT read and write GB/s of horizon.io's backends beside the device limit.

In one run, on one preallocated file in --dir, alternating systems pass by pass:
  * horizon_io_uring   horizon._native_io, io_uring (queue depth --queue-depth)
  * horizon_threads    horizon._native_io, pread/pwrite thread pool (--workers threads)
  * horizon_python     the pure-Python fallback (os.preadv/os.pwritev on --workers threads)
  * dd                 dd iflag/oflag=direct, queue depth 1 (understates the device 2-3x here)
  * limit              fio direct=1, bs=--chunk-mib, iodepth=--queue-depth (missing fio: limit is null, said so)
  * deepspeed_aio      not run (listed as skipped): its async_io op JIT-builds for ~6 minutes and needs libaio-dev
Each system writes then reads the whole file, --repeats times; medians, the first pass excluded as warm-up.
The backing store of a VM may cache writes: a write figure above the disk's sustained rate is the cache's.

    python bench/ssd_io.py [--dir /tmp --size-mib 1024 --chunk-mib 8 --repeats 5]
Writes bench/results/ssd_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

from _common import RESULTS_DIR, CpuMeter, median, result_record, write_json

from horizon.io import DirectFile, DirectIO, IORequest, aligned_empty, native_io_available

MIB = 1 << 20


def horizon_pass(io: DirectIO, file: DirectFile, buffer, op: str) -> float:
    """Seconds to move the whole file in buffer-sized requests, all submitted at once."""
    n = buffer.numel()
    requests = [IORequest(op, file, buffer, offset) for offset in range(0, file.size_bytes, n)]
    start = time.perf_counter()
    io.submit(requests).result()
    return time.perf_counter() - start


def dd_pass(path: str, size_bytes: int, chunk_bytes: int, op: str) -> float:
    count = size_bytes // chunk_bytes
    args = (["dd", "if=/dev/zero", f"of={path}", "oflag=direct", "conv=notrunc"] if op == "write"
            else ["dd", f"if={path}", "of=/dev/null", "iflag=direct"])
    start = time.perf_counter()
    subprocess.run(args + [f"bs={chunk_bytes}", f"count={count}"], check=True, capture_output=True)
    return time.perf_counter() - start


def fio_pass(path: str, size_bytes: int, chunk_bytes: int, depth: int, op: str) -> float:
    """Seconds fio reports for the same transfer (from its bandwidth)."""
    out = subprocess.run(["fio", "--name=limit", f"--filename={path}", f"--rw={op}", f"--bs={chunk_bytes}",
                          f"--size={size_bytes}", "--direct=1", "--ioengine=io_uring", f"--iodepth={depth}",
                          "--output-format=json"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0][op]
    return size_bytes / job["bw_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--buffer-mib", type=int, default=256, help="bytes per request before chunking")
    ap.add_argument("--queue-depth", type=int, default=16)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    size, chunk = args.size_mib * MIB, args.chunk_mib * MIB
    path = os.path.join(args.dir, "horizon-ssd-io-bench.bin")
    file = DirectFile(path, size_bytes=size)
    buffer = aligned_empty(args.buffer_mib * MIB)
    buffer.random_(0, 256)
    skipped, systems = {}, {}
    if native_io_available():
        systems["horizon_io_uring"] = DirectIO(backend="io_uring", queue_depth=args.queue_depth, chunk_bytes=chunk)
        systems["horizon_threads"] = DirectIO(backend="threads", num_workers=args.workers, chunk_bytes=chunk)
        if systems["horizon_io_uring"].backend != "io_uring":
            skipped["horizon_io_uring"] = "the kernel refused io_uring; the engine fell back to threads"
    else:
        skipped["horizon_io_uring"] = skipped["horizon_threads"] = "horizon._native_io is not built"
    systems["horizon_python"] = DirectIO(backend="python", num_workers=args.workers, chunk_bytes=chunk)
    has_fio = shutil.which("fio") is not None
    if not has_fio:
        skipped["limit"] = "fio is not installed (apt-get install fio); no device limit in this run"
    skipped["deepspeed_aio"] = ("not run by this script: DeepSpeed's async_io op JIT-builds for ~6 minutes and "
                                "needs libaio-dev (reference/machine-facts.md: 2.0-2.6 GB/s write, 1.1-1.3 read)")

    seconds = {name: {"read": [], "write": []} for name in [*systems, "dd", *(["limit"] if has_fio else [])]}
    meter = CpuMeter().start()
    for _ in range(args.repeats):
        for op in ("write", "read"):
            for name, io in systems.items():
                seconds[name][op].append(horizon_pass(io, file, buffer, op))
            seconds["dd"][op].append(dd_pass(path, size, chunk, op))
            if has_fio:
                seconds["limit"][op].append(fio_pass(path, size, chunk, args.queue_depth, op))
    cpu = meter.stop()
    for io in systems.values():
        io.close()
    file.close()
    os.remove(path)

    results = {name: {op: round(size / median(s[1:] or s) / 1e9, 3) for op, s in ops.items()}
               for name, ops in seconds.items()}
    results.update({name: None for name in skipped if name not in results})
    native = [n for n in ("horizon_io_uring", "horizon_threads") if results.get(n)]
    best = max(native, key=lambda n: min(results[n].values())) if native else "horizon_python"
    ratios = {"native_vs_python": {op: round(results[best][op] / results["horizon_python"][op], 3)
                                   for op in ("read", "write")},
              "vs_dd": {op: round(results[best][op] / results["dd"][op], 3) for op in ("read", "write")}}
    if results.get("limit"):
        ratios["vs_limit"] = round(min(results[best][op] / results["limit"][op] for op in ("read", "write")), 3)
    for name, r in results.items():
        print(f"{name:18s} " + ("skipped: " + skipped[name] if r is None else
                                f"read {r['read']:6.2f} GB/s   write {r['write']:6.2f} GB/s"))
    print(f"best horizon backend: {best}; ratios {ratios}; cpu {cpu}")
    record = result_record("ssd_io", unit="GB/s", higher_is_better=True, results=results, ratios=ratios,
                           skipped=skipped, best_horizon=best, cpu=cpu,
                           config={"size_mib": args.size_mib, "chunk_mib": args.chunk_mib,
                                   "buffer_mib": args.buffer_mib, "queue_depth": args.queue_depth,
                                   "workers": args.workers, "repeats": args.repeats, "dir": args.dir,
                                   "statistic": "median, first pass excluded"})
    print("wrote", write_json(RESULTS_DIR / "ssd_io.json", record))


if __name__ == "__main__":
    main()
