"""horizon.io: native (io_uring, threads) and Python direct I/O against each other and against plain reads."""

import errno
import os
import random
import subprocess
import threading

import pytest
import torch

from horizon.io import ALIGN_BYTES, DirectFile, DirectIO, IORequest, aligned_empty, native_io_available

NATIVE = ["io_uring", "threads"] if native_io_available() else []
BACKENDS = NATIVE + ["python"]


def random_bytes(n: int, seed: int) -> torch.Tensor:
    buffer = aligned_empty(n)
    buffer.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return buffer


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trips_of_random_sizes_and_offsets_match_plain_file_reads(tmp_path, backend):
    size_bytes = 256 * ALIGN_BYTES
    file = DirectFile(tmp_path / "state.bin", size_bytes=size_bytes)
    io = DirectIO(backend=backend, chunk_bytes=4 * ALIGN_BYTES)  # small chunks: requests are split
    expected = bytearray(size_bytes)
    rng = random.Random(0)
    for trial in range(20):
        pages = rng.randint(1, 40)
        offset = rng.randint(0, 256 - pages) * ALIGN_BYTES
        data = random_bytes(pages * ALIGN_BYTES, trial)
        io.write(file, data, offset).result()
        expected[offset:offset + data.numel()] = data.numpy().tobytes()
        back = aligned_empty(data.numel())
        io.read(file, back, offset).result()
        assert torch.equal(back, data)
    io.close()
    file.close()
    with open(tmp_path / "state.bin", "rb") as f:
        assert f.read() == bytes(expected)


@pytest.mark.skipif(not NATIVE, reason="horizon._native_io is not built")
def test_native_writes_read_back_by_the_python_fallback_and_the_reverse(tmp_path):
    file = DirectFile(tmp_path / "x.bin", size_bytes=64 * ALIGN_BYTES)
    native, python = DirectIO(backend="auto"), DirectIO(backend="python")
    for writer, reader in ((native, python), (python, native)):
        data = random_bytes(48 * ALIGN_BYTES, id(writer) % 1000)
        writer.write(file, data, 8 * ALIGN_BYTES).result()
        back = aligned_empty(data.numel())
        reader.read(file, back, 8 * ALIGN_BYTES).result()
        assert torch.equal(back, data)
    native.close()
    python.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_batches_from_several_threads_are_correct(tmp_path, backend):
    file = DirectFile(tmp_path / "c.bin", size_bytes=64 * 16 * ALIGN_BYTES)
    io = DirectIO(backend=backend, chunk_bytes=2 * ALIGN_BYTES, queue_depth=4)
    region_bytes = 16 * ALIGN_BYTES
    data = [random_bytes(region_bytes, i) for i in range(64)]

    def writer(first: int) -> None:
        batch = [IORequest("write", file, data[i], i * region_bytes) for i in range(first, 64, 4)]
        io.submit(batch).result()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    back = [aligned_empty(region_bytes) for _ in range(64)]
    io.submit([IORequest("read", file, back[i], i * region_bytes) for i in range(64)]).result()
    assert all(torch.equal(a, b) for a, b in zip(back, data))
    io.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_requests_are_rejected_before_anything_is_submitted(tmp_path, backend):
    file = DirectFile(tmp_path / "m.bin", size_bytes=4 * ALIGN_BYTES)
    io = DirectIO(backend=backend)
    base = aligned_empty(3 * ALIGN_BYTES)
    for buffer, offset, what in ((base[1:1 + ALIGN_BYTES], 0, "buffer address"),
                                 (base[:ALIGN_BYTES + 512], 0, "length"),
                                 (base[:ALIGN_BYTES], 512, "file offset")):
        with pytest.raises(ValueError, match=f"{what} .* not a multiple of {ALIGN_BYTES}"):
            io.write(file, buffer, offset)
    io.close()


@pytest.mark.skipif(not NATIVE, reason="horizon._native_io is not built")
def test_the_native_module_checks_alignment_itself(tmp_path):
    from horizon import _native_io

    file = DirectFile(tmp_path / "n.bin", size_bytes=ALIGN_BYTES)
    engine = _native_io.engine(1, False, 1, 1 << 20)
    buffer = aligned_empty(2 * ALIGN_BYTES)
    with pytest.raises(ValueError, match="file offset is not a multiple of 4096"):
        _native_io.submit(engine, [(0, file.fd, buffer.data_ptr(), ALIGN_BYTES, 100)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_past_the_end_reports_errno_and_path(tmp_path, backend):
    file = DirectFile(tmp_path / "short.bin", size_bytes=ALIGN_BYTES)
    io = DirectIO(backend=backend)
    with pytest.raises(OSError) as info:
        io.read(file, aligned_empty(2 * ALIGN_BYTES), 0).result()
    assert info.value.errno == errno.ENODATA and info.value.filename == file.path
    io.close()


def test_a_missing_directory_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match="SSDConfig.dir") as info:
        DirectFile(missing / "state.bin", size_bytes=ALIGN_BYTES)
    assert info.value.filename == str(missing)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs (tmpfs takes O_DIRECT on Linux >= 6.6); needs root to mount."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_is_reported_with_the_path(tiny_filesystem, backend):
    with pytest.raises(OSError, match="cannot reserve 4,194,304 bytes") as info:
        DirectFile(tiny_filesystem / "big.bin", size_bytes=4 << 20)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tiny_filesystem / "big.bin")
    file = DirectFile(tiny_filesystem / "grow.bin", size_bytes=0)
    if not os.path.exists(file.path):
        pytest.fail("the file was not created")
    io = DirectIO(backend=backend)
    try:
        with pytest.raises(OSError) as info:
            io.write(file, random_bytes(2 << 20, 1), 0).result()
        assert info.value.errno == errno.ENOSPC and info.value.filename == file.path
    finally:
        io.close()
        file.close()


def test_bad_engine_arguments_name_the_fix():
    with pytest.raises(ValueError, match="backend must be one of"):
        DirectIO(backend="libaio")
    with pytest.raises(ValueError, match="chunk_bytes"):
        DirectIO(chunk_bytes=1000)
    with pytest.raises(ValueError, match="multiple of 4096"):
        aligned_empty(100)


def test_without_the_native_module_import_works_and_python_io_is_selected(tmp_path):
    script = (
        "import sys; sys.modules['horizon._native_io'] = None\n"  # as if the build had been skipped
        "import torch, horizon, horizon.io as hio\n"
        "io = hio.DirectIO()\n"
        f"f = hio.DirectFile({str(tmp_path / 'f.bin')!r}, size_bytes=4096)\n"
        "b = hio.aligned_empty(4096); b.fill_(7); io.write(f, b, 0).result()\n"
        "c = hio.aligned_empty(4096); io.read(f, c, 0).result()\n"
        "print(io.backend, hio.native_io_available(), bool(torch.equal(b, c)))\n")
    out = subprocess.run([os.sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["python", "False", "True"]
