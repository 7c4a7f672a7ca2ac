"""The SSD tier: its file, its bounded pool, placement under a host budget, and the errors that say the fix."""

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from anon_rss import child_env
import horizon
from helpers import batches, tiny_decoder
from horizon.store.host_store import store_bytes_by_role
from horizon.store.layout import ParamSlot, UnitLayout
from horizon.store.ssd import SSDTier, state_bytes
from horizon.store.ssd_placement import choose_ssd_units, ram_bytes


def layouts(*numels):
    return [UnitLayout(name=f"u{i}", own=(ParamSlot(local_name="w", offset=0, shape=torch.Size([n])),), borrowed=())
            for i, n in enumerate(numels)]


def test_tier_round_trips_state_through_a_two_slot_pool(tmp_path):
    ls = layouts(1000, 5000, 3000, 7000)
    tier = SSDTier(horizon.SSDConfig(dir=tmp_path), ls, frozenset({0, 1, 2, 3}))
    assert tier.file_bytes == sum(state_bytes(layout) for layout in ls) == 3 * 4096 * (1 + 5 + 3 + 7)
    assert tier.pool_bytes == 2 * state_bytes(ls[3])
    masters = {u: torch.randn(layout.numel) for u, layout in enumerate(ls)}
    for unit, master in masters.items():
        tier.initialize(unit, master)
    expected = {u: m.clone() for u, m in masters.items()}
    for step in range(1, 4):  # every unit evicted and read back from the file each step
        for unit in range(4):
            views = tier.acquire(unit)
            assert torch.equal(views["master"], expected[unit])
            assert torch.equal(views["exp_avg"], torch.full_like(masters[unit], step - 1.0))
            views["master"].add_(1)
            views["exp_avg"].add_(1)
            expected[unit].add_(1)
            tier.prefetch(tier.next_unit(unit, descending=False))
            tier.release(unit)
    with open(tier.file.path, "rb") as f:  # the file itself, read without O_DIRECT after a flush
        tier.flush()
        f.seek(tier.offset_bytes[2])
        raw = torch.frombuffer(bytearray(f.read(3000 * 4)), dtype=torch.float32)
    assert torch.equal(raw, expected[2])
    assert tier.read_state(1)["exp_avg_sq"].abs().sum() == 0
    path = tier.file.path
    tier.close()
    assert not (tmp_path / path).exists()


def test_next_unit_follows_the_update_order_cyclically(tmp_path):
    tier = SSDTier(horizon.SSDConfig(dir=tmp_path), layouts(10, 10, 10, 10), frozenset({0, 2, 3}))
    assert [tier.next_unit(u, descending=False) for u in (0, 2, 3)] == [2, 3, 0]
    assert [tier.next_unit(u, descending=True) for u in (3, 2, 0)] == [2, 0, 3]
    tier.close()


def test_auto_placement_puts_as_few_units_on_ssd_as_the_budget_allows(tmp_path):
    ls = layouts(50_000, *[100_000] * 10, 50_000)
    cfg = horizon.SSDConfig(dir=tmp_path, units="auto")
    everything_in_ram = sum(store_bytes_by_role(ls, torch.float32).values())
    assert choose_ssd_units(cfg, ls, torch.float32, accumulate=False,
                            host_budget_bytes=everything_in_ram) == frozenset()
    budget = ram_bytes(ls, torch.float32, accumulate=False, ssd_units=frozenset({1, 2, 3, 4}), io_buffers=2)
    assert budget < everything_in_ram
    chosen = choose_ssd_units(cfg, ls, torch.float32, accumulate=False, host_budget_bytes=budget)
    assert chosen == frozenset({1, 2, 3, 4})
    for k in range(len(chosen)):  # brute force: no placement of fewer units fits
        assert all(ram_bytes(ls, torch.float32, accumulate=False, ssd_units=frozenset(units), io_buffers=2) > budget
                   for units in itertools.combinations(range(len(ls)), k))
    with pytest.raises(ValueError, match="cannot hold the store"):
        choose_ssd_units(cfg, ls, torch.float32, accumulate=False, host_budget_bytes=everything_in_ram // 4)


def test_ram_bytes_are_what_the_trainer_allocates(tmp_path):
    model = tiny_decoder(num_layers=2)
    cfg = horizon.TrainConfig(ssd=horizon.SSDConfig(dir=tmp_path, units=[1, 2]))
    with horizon.Trainer(model, cfg) as trainer:
        trainer.step(batches(1)[0])
        mem = trainer.memory()
        ls = [u.layout for u in trainer.store.units]
        expected = ram_bytes(ls, torch.float32, accumulate=False, ssd_units=frozenset({1, 2}), io_buffers=2)
        assert mem.host_bytes - mem.host_bytes_by_role["activations"] == expected
        assert mem.ssd_bytes == sum(state_bytes(ls[u]) for u in (1, 2))
        assert mem.host_bytes_by_role["exp_avg"] == sum(state_bytes(ls[u]) for u in (0, 3)) // 3


def test_bad_ssd_configs_say_the_fix(tmp_path):
    with pytest.raises(ValueError, match="not an existing directory"):
        horizon.SSDConfig(dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="'all', 'auto'"):
        horizon.SSDConfig(dir=tmp_path, units="some")
    with pytest.raises(ValueError, match="io_buffers must be an int >= 2"):
        horizon.SSDConfig(dir=tmp_path, io_buffers=1)
    with pytest.raises(ValueError, match="needs TrainConfig\\(host_memory_budget_bytes"):
        horizon.TrainConfig(ssd=horizon.SSDConfig(dir=tmp_path, units="auto"))
    with pytest.raises(ValueError, match="must be a horizon.SSDConfig"):
        horizon.TrainConfig(ssd=str(tmp_path))
    with pytest.raises(ValueError, match="model has units 0..3"):
        horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(ssd=horizon.SSDConfig(dir=tmp_path, units=[4])))
    assert list(tmp_path.iterdir()) == []


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, psutil, torch
    import horizon
    from horizon.models import Decoder, decoder_config
    from horizon.models.decoder import Block
    from horizon.store.host_store import store_bytes_by_role
    cfg = decoder_config("tiny", dim=768, num_layers=8, num_heads=8, num_kv_heads=8, ffn_dim=2048)
    block = Block(cfg)  # the compute library's one-time workspace belongs to the baseline
    block(torch.randn(2, 32, cfg.dim, requires_grad=True)).sum().backward()
    del block
    torch.manual_seed(0)
    with torch.device("meta"):  # as a model larger than RAM is built: no parameter memory before the store
        model = Decoder(cfg)
    baseline = psutil.Process().memory_info().rss
    params = sum(p.numel() for p in model.parameters())
    ram_only = 16 * params
    config = horizon.TrainConfig(grad_clip_norm=1.0, host_memory_budget_bytes=int(0.7 * ram_only),
                                 ssd=horizon.SSDConfig(dir=sys.argv[1], units="auto"))
    trainer = horizon.Trainer(model, config)
    x = torch.randint(0, 256, (2, 32))
    for _ in range(2):
        trainer.step({"input_ids": x, "labels": x})
    trainer.state_dict()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = trainer.memory()
    print(json.dumps({"params": params, "growth": peak - baseline, "host": mem.host_bytes, "ssd": mem.ssd_bytes,
                      "device": mem.device_peak_bytes, "budget": config.host_memory_budget_bytes,
                      "activations": mem.host_bytes_by_role["activations"], "units": sorted(trainer.store.ssd_units),
                      "ram_only": sum(store_bytes_by_role([u.layout for u in trainer.store.units],
                                                          torch.float32).values())}))
    trainer.close()
""")


@pytest.mark.slow
def test_peak_rss_with_state_on_ssd_is_the_ram_resident_footprint(tmp_path):
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True,
                         env=child_env())  # glibc's mmap threshold fixed (anon_rss.py)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["host"] - r["activations"] <= r["budget"] == int(0.7 * 16 * r["params"])
    assert r["ram_only"] >= 16 * r["params"]
    assert r["ssd"] >= 12 * r["params"] * 0.9, "the blocks' state went to SSD"
    assert r["growth"] <= 1.10 * (r["host"] + r["device"]), r
    assert r["growth"] < 0.8 * (r["ram_only"] + r["device"]), "less than RAM-only training needs"
