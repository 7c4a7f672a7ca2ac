"""chunk_ranges and PinnedRegion's checks that need no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from horizon.store.pinning import PinnedRegion, chunk_ranges

PAGE_BYTES = 4096


def _assert_exact_cover(ranges: list[tuple[int, int]], nbytes: int) -> None:
    expected_offset = 0
    for offset, length_bytes in ranges:
        assert offset == expected_offset  # contiguous: no gap, no overlap
        assert length_bytes > 0
        expected_offset = offset + length_bytes
    assert expected_offset == nbytes


def test_even_split() -> None:
    chunk_bytes = 100
    expected = [(0, 100), (100, 100), (200, 100), (300, 100)]
    assert chunk_ranges(4 * chunk_bytes, chunk_bytes) == expected


def test_last_chunk_short() -> None:
    nbytes, chunk_bytes = 1000, 333
    ranges = chunk_ranges(nbytes, chunk_bytes)
    _assert_exact_cover(ranges, nbytes)
    assert len(ranges) == -(-nbytes // chunk_bytes)
    assert [length for _, length in ranges] == [333, 333, 333, nbytes - 3 * chunk_bytes]


def test_single_chunk_when_chunk_is_larger() -> None:
    assert chunk_ranges(10, 2**40) == [(0, 10)]


def test_zero_bytes_gives_no_chunks() -> None:
    assert chunk_ranges(0, 4096) == []
    assert chunk_ranges(0, 4096, base_address=123, page_bytes=PAGE_BYTES) == []


@pytest.mark.parametrize("base_address", [0, 64, PAGE_BYTES - 1, 7 * PAGE_BYTES + 16])
@pytest.mark.parametrize("chunk_bytes", [1, PAGE_BYTES, 3 * PAGE_BYTES + 1001])
def test_page_aligned_boundaries(base_address: int, chunk_bytes: int) -> None:
    nbytes = 10 * PAGE_BYTES + 77
    ranges = chunk_ranges(nbytes, chunk_bytes, base_address=base_address, page_bytes=PAGE_BYTES)
    step_bytes = max(PAGE_BYTES, chunk_bytes - chunk_bytes % PAGE_BYTES)
    lead_bytes = base_address % PAGE_BYTES

    _assert_exact_cover(ranges, nbytes)
    assert len(ranges) == -(-(nbytes + lead_bytes) // step_bytes)
    assert all(length <= step_bytes for _, length in ranges)
    for offset, _ in ranges[1:]:
        assert (base_address + offset) % PAGE_BYTES == 0
    if len(ranges) > 1:
        assert ranges[0][1] == step_bytes - lead_bytes


@pytest.mark.parametrize(
    ("nbytes", "chunk_bytes", "page_bytes"), [(-1, 1, 1), (1, 0, 1), (1, -5, 1), (1, 1, 0)]
)
def test_invalid_arguments(nbytes: int, chunk_bytes: int, page_bytes: int) -> None:
    with pytest.raises(ValueError):
        chunk_ranges(nbytes, chunk_bytes, page_bytes=page_bytes)


def test_rejects_non_contiguous_tensor() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        PinnedRegion(torch.zeros(8, 8).t())


def test_rejects_bad_chunk_bytes() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        PinnedRegion(torch.zeros(8), chunk_bytes=0)


def test_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        PinnedRegion(torch.zeros(8))


def test_import_does_not_initialise_cuda() -> None:
    code = (
        "import torch, horizon.store.pinning\n"
        "print(torch.cuda.is_initialized())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("seed", range(20))
def test_grouped_ranges_split_only_at_extent_starts(seed):
    import random

    from horizon.store.pinning import grouped_ranges

    rng = random.Random(seed)
    nbytes = rng.randrange(1, 10_000)
    split_at = rng.sample(range(1, nbytes + 1), min(nbytes, rng.randrange(0, 12)))
    chunk_bytes = rng.randrange(1, 4_000)
    ranges = grouped_ranges(nbytes, split_at, chunk_bytes)
    starts = [o for o, _ in ranges]
    assert starts[0] == 0 and set(starts) <= {0, *split_at}
    assert sum(n for _, n in ranges) == nbytes
    assert all(o + n == nxt for (o, n), nxt in zip(ranges, starts[1:]))
    extents = sorted({0, *(o for o in split_at if o < nbytes)})
    for o, n in ranges:
        inner = [e for e in extents if o <= e < o + n]
        assert n <= chunk_bytes or len(inner) == 1  # longer than a chunk only as one extent
    for (o, n), (o2, n2) in zip(ranges, ranges[1:]):  # greedy: the next extent would not have fit
        first_extent_end = min([e for e in extents if e > o2] + [nbytes])
        assert first_extent_end - o > chunk_bytes
