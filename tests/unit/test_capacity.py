"""Host capacity probing against fake cgroup trees, and the budget check's error and warning."""

from __future__ import annotations

import resource
import warnings
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from horizon.store.capacity import (
    HostCapacity,
    HostMemoryError,
    check_host_budget,
    format_bytes,
    probe_host_capacity,
)

GIB = 2**30
MIB = 2**20
FakeVirtualMemory = namedtuple("FakeVirtualMemory", ["available"])


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch):
    """Pin the non-cgroup inputs: 64 GiB available, memlock 8 MiB, not root."""
    available_bytes = 64 * GIB
    memlock_bytes = 8 * MIB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeVirtualMemory(available_bytes))
    real_getrlimit = resource.getrlimit
    monkeypatch.setattr(
        resource,
        "getrlimit",
        lambda which: (
            (memlock_bytes, memlock_bytes)
            if which == resource.RLIMIT_MEMLOCK
            else real_getrlimit(which)
        ),
    )
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    return available_bytes, memlock_bytes


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _capacity(**overrides: object) -> HostCapacity:
    fields: dict[str, object] = dict(
        available_bytes=32 * GIB,
        cgroup_limit_bytes=None,
        cgroup_usage_bytes=None,
        memlock_limit_bytes=1 * GIB,
        can_lock_unlimited=False,
    )
    fields.update(overrides)
    return HostCapacity(**fields)  # type: ignore[arg-type]


# -- probing ---------------------------------------------------------------------------------


def test_cgroup_v2_limit_and_usage(tmp_path: Path, fake_host) -> None:
    available_bytes, memlock_bytes = fake_host
    limit_bytes, usage_bytes = 16 * GIB, 3 * GIB + 12345
    _write(tmp_path / "memory.max", f"{limit_bytes}\n")
    _write(tmp_path / "memory.current", f"{usage_bytes}\n")

    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.available_bytes == available_bytes
    assert capacity.cgroup_limit_bytes == limit_bytes
    assert capacity.cgroup_usage_bytes == usage_bytes
    assert capacity.memlock_limit_bytes == memlock_bytes
    assert capacity.can_lock_unlimited is False
    assert capacity.allocatable_bytes == limit_bytes - usage_bytes


def test_cgroup_v2_usage_excludes_inactive_page_cache(tmp_path: Path, fake_host) -> None:
    limit_bytes, usage_bytes, inactive_file_bytes = 16 * GIB, 10 * GIB, 4 * GIB
    _write(tmp_path / "memory.max", f"{limit_bytes}\n")
    _write(tmp_path / "memory.current", f"{usage_bytes}\n")
    _write(tmp_path / "memory.stat", f"anon 123\ninactive_file {inactive_file_bytes}\nfile 9\n")

    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.cgroup_usage_bytes == usage_bytes - inactive_file_bytes
    assert capacity.allocatable_bytes == limit_bytes - (usage_bytes - inactive_file_bytes)


def test_cgroup_v2_max_means_unlimited(tmp_path: Path, fake_host) -> None:
    available_bytes, _ = fake_host
    usage_bytes = 5 * GIB
    _write(tmp_path / "memory.max", "max\n")
    _write(tmp_path / "memory.current", f"{usage_bytes}\n")

    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.cgroup_limit_bytes is None
    assert capacity.cgroup_usage_bytes == usage_bytes
    assert capacity.allocatable_bytes == available_bytes


def test_cgroup_v1_limit_and_usage(tmp_path: Path, fake_host) -> None:
    limit_bytes, usage_bytes, inactive_file_bytes = 20 * GIB, 6 * GIB, 1 * GIB
    _write(tmp_path / "memory" / "memory.limit_in_bytes", f"{limit_bytes}\n")
    _write(tmp_path / "memory" / "memory.usage_in_bytes", f"{usage_bytes}\n")
    _write(tmp_path / "memory" / "memory.stat", f"total_inactive_file {inactive_file_bytes}\n")

    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.cgroup_limit_bytes == limit_bytes
    assert capacity.cgroup_usage_bytes == usage_bytes - inactive_file_bytes
    assert capacity.allocatable_bytes == limit_bytes - (usage_bytes - inactive_file_bytes)


def test_cgroup_v1_unlimited_sentinel_is_none(tmp_path: Path, fake_host) -> None:
    available_bytes, _ = fake_host
    v1_unlimited_bytes = 0x7FFFFFFFFFFFF000
    _write(tmp_path / "memory" / "memory.limit_in_bytes", f"{v1_unlimited_bytes}\n")
    _write(tmp_path / "memory" / "memory.usage_in_bytes", "4096\n")

    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.cgroup_limit_bytes is None
    assert capacity.allocatable_bytes == available_bytes


def test_no_cgroup_files(tmp_path: Path, fake_host) -> None:
    available_bytes, _ = fake_host
    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.cgroup_limit_bytes is None
    assert capacity.cgroup_usage_bytes is None
    assert capacity.allocatable_bytes == available_bytes


def test_available_ram_caps_cgroup_headroom(tmp_path: Path, fake_host) -> None:
    available_bytes, _ = fake_host
    _write(tmp_path / "memory.max", f"{available_bytes * 2}\n")
    _write(tmp_path / "memory.current", "0\n")

    assert probe_host_capacity(cgroup_root=str(tmp_path)).allocatable_bytes == available_bytes


def test_memlock_infinity_is_none_and_root_can_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    infinity = resource.RLIM_INFINITY
    real_getrlimit = resource.getrlimit
    monkeypatch.setattr(
        resource,
        "getrlimit",
        lambda which: (
            (infinity, infinity) if which == resource.RLIMIT_MEMLOCK else real_getrlimit(which)
        ),
    )
    monkeypatch.setattr("os.geteuid", lambda: 0)

    capacity = probe_host_capacity(cgroup_root=str(tmp_path))

    assert capacity.memlock_limit_bytes is None
    assert capacity.can_lock_unlimited is True


def test_cgroup_over_limit_gives_zero_not_negative() -> None:
    capacity = _capacity(cgroup_limit_bytes=4 * GIB, cgroup_usage_bytes=5 * GIB)
    assert capacity.allocatable_bytes == 0


# -- budget check ----------------------------------------------------------------------------


def test_shortfall_raises_with_exact_bytes() -> None:
    limit_bytes, usage_bytes = 10 * GIB, 2 * GIB
    capacity = _capacity(
        available_bytes=32 * GIB, cgroup_limit_bytes=limit_bytes, cgroup_usage_bytes=usage_bytes
    )
    allocatable_bytes = limit_bytes - usage_bytes
    required_bytes = allocatable_bytes + 4 * GIB + 3 * MIB + 7
    short_bytes = required_bytes - allocatable_bytes

    with pytest.raises(HostMemoryError) as excinfo:
        check_host_budget(
            required_bytes=required_bytes, pinned_bytes=0, capacity=capacity, what="llama-7b"
        )

    message = str(excinfo.value)
    assert message.startswith("horizon: the host store for llama-7b needs ")
    assert f"{format_bytes(required_bytes)} ({required_bytes} bytes)" in message
    assert f"{format_bytes(allocatable_bytes)} ({allocatable_bytes} bytes)" in message
    assert f"{format_bytes(short_bytes)} ({short_bytes} bytes) short" in message
    assert f"cgroup limit {format_bytes(limit_bytes)} ({limit_bytes} bytes)" in message
    assert isinstance(excinfo.value, ValueError)


def test_exact_fit_passes() -> None:
    capacity = _capacity(available_bytes=8 * GIB)
    assert check_host_budget(
        required_bytes=8 * GIB, pinned_bytes=0, capacity=capacity, what="m"
    ) is True


def test_pinning_within_memlock_returns_true_without_warning() -> None:
    memlock_bytes = 2 * GIB
    capacity = _capacity(memlock_limit_bytes=memlock_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_host_budget(
            required_bytes=4 * GIB, pinned_bytes=memlock_bytes, capacity=capacity, what="m"
        ) is True


@pytest.mark.parametrize(
    "overrides",
    [
        dict(memlock_limit_bytes=None),
        dict(memlock_limit_bytes=64 * 1024, can_lock_unlimited=True),
    ],
)
def test_unlimited_pinning_returns_true_without_warning(overrides: dict) -> None:
    capacity = _capacity(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_host_budget(
            required_bytes=16 * GIB, pinned_bytes=16 * GIB, capacity=capacity, what="m"
        ) is True


def test_pinning_over_memlock_warns_and_returns_false() -> None:
    memlock_bytes = 64 * 1024
    pinned_bytes = 3 * GIB + 5
    short_bytes = pinned_bytes - memlock_bytes
    capacity = _capacity(memlock_limit_bytes=memlock_bytes)

    with pytest.warns(ResourceWarning) as record:
        pinnable = check_host_budget(
            required_bytes=4 * GIB, pinned_bytes=pinned_bytes, capacity=capacity, what="m"
        )

    assert pinnable is False
    assert len(record) == 1
    message = str(record[0].message)
    assert f"{format_bytes(short_bytes)} ({short_bytes} bytes) short" in message
    assert f"({memlock_bytes} bytes)" in message
    assert "ulimit -l unlimited" in message
    assert "CAP_IPC_LOCK" in message
    assert "pageable" in message


def test_ram_shortfall_raises_before_pinning_warning() -> None:
    capacity = _capacity(available_bytes=1 * GIB, memlock_limit_bytes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(HostMemoryError):
            check_host_budget(
                required_bytes=2 * GIB, pinned_bytes=2 * GIB, capacity=capacity, what="m"
            )


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        check_host_budget(required_bytes=-1, pinned_bytes=0, capacity=_capacity(), what="m")


# -- format_bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (12, "12 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (512 * MIB, "512.0 MiB"),
        (3 * GIB // 2, "1.50 GiB"),
        (4096 * GIB, "4096.00 GiB"),
        (-2 * GIB, "-2.00 GiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected
