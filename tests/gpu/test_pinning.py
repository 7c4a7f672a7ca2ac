"""PinnedRegion on a real GPU: chunked cudaHostRegister, DMA round trip, unregister."""

from __future__ import annotations

import mmap

import pytest
import torch

from horizon.store.pinning import PinnedRegion, chunk_ranges

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIB = 2**20


def test_register_in_three_chunks_and_round_trip() -> None:
    nbytes = 64 * MIB
    chunk_bytes = 22 * MIB + 12345  # odd-sized: rounded down to whole pages, 3 chunks
    host = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    expected_ranges = chunk_ranges(
        nbytes, chunk_bytes, base_address=host.data_ptr(), page_bytes=mmap.PAGESIZE
    )
    assert len(expected_ranges) == 3

    with PinnedRegion(host, chunk_bytes=chunk_bytes) as region:
        assert list(region.ranges) == expected_ranges
        assert region.nbytes == nbytes
        for offset, length_bytes in expected_ranges:  # every chunk is page-locked
            assert host[offset : offset + length_bytes].is_pinned()

        # One copy per registration: a copy spanning two is rejected by the driver.
        back = torch.empty_like(host)
        for offset, length_bytes in expected_ranges:
            part = host[offset:offset + length_bytes].to("cuda", non_blocking=True)
            back[offset:offset + length_bytes].copy_(part, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(back, host)

    assert region.closed
    assert not host.is_pinned()
    region.close()  # idempotent


def test_reregister_after_close() -> None:
    host = torch.ones(4 * MIB, dtype=torch.uint8)
    PinnedRegion(host).close()
    with PinnedRegion(host, chunk_bytes=MIB) as region:
        assert len(region.ranges) == len(
            chunk_ranges(host.nbytes, MIB, base_address=host.data_ptr(), page_bytes=mmap.PAGESIZE)
        )
        assert host.is_pinned()


def test_store_pins_whole_units_so_no_copy_crosses_a_registration():
    from horizon.store.host_store import HostStore
    from horizon.store.layout import plan_layouts
    from helpers import tiny_decoder

    from horizon.models.units import find_units

    specs = find_units(tiny_decoder(num_layers=3), None)
    layouts = plan_layouts([s.name for s in specs], [s.module for s in specs])
    store = HostStore(layouts, compute_dtype=torch.bfloat16, pin=True)
    try:
        region = store._pinned_region
        base = store._pcie.raw.data_ptr()
        for unit in store.units:  # each unit's compute and grad lie inside one registered range
            lo, hi = unit.compute.data_ptr() - base, unit.grad.data_ptr() + unit.grad.nbytes - base
            assert any(o <= lo and hi <= o + n for o, n in region.ranges)
            unit.compute.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
    finally:
        store.close()
