"""SSDConfig(weights=True): host RAM holds a window of units, not the model; SSD holds exactly what is counted."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from anon_rss import child_env
import horizon
from helpers import batches, tiny_decoder
from horizon.store.ssd_layout import unit_extents
from horizon.store.ssd_placement import ram_bytes_by_role

RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, psutil, torch
    import horizon
    from horizon.models import Decoder, decoder_config
    from horizon.models.decoder import Block
    cfg = decoder_config("tiny", dim=512, num_layers=8, num_heads=8, num_kv_heads=8, ffn_dim=1536)
    block = Block(cfg)  # the compute library's one-time workspace belongs to the baseline
    block(torch.randn(2, 32, cfg.dim, requires_grad=True)).sum().backward()
    del block
    with torch.device("meta"):  # as a model larger than RAM is built: no parameter memory before the store
        model = Decoder(cfg)

    def status():  # resident kB by kind: anonymous (heap), file (libraries' pages), shared (the I/O pools)
        lines = open("/proc/self/status").read().splitlines()
        return {l.split(":")[0]: int(l.split()[1]) for l in lines if l.startswith(("RssAnon", "RssFile", "RssShmem"))}

    # The high-water mark, not the current RSS: library pages the kernel dropped under memory pressure
    # before this point and faulted back in later are not the trainer's growth.
    baseline, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, status()
    params = sum(p.numel() for p in model.parameters())
    budget = 16 * params // 2  # the whole 16 B/param state is twice the budget
    clip = sys.argv[2] == "clip"
    config = horizon.TrainConfig(grad_clip_norm=1.0 if clip else None, on_nonfinite="raise" if clip else "ignore",
                                 host_memory_budget_bytes=budget,
                                 ssd=horizon.SSDConfig(dir=sys.argv[1], units="all", weights=True))
    trainer = horizon.Trainer(model, config)
    x = torch.randint(0, 256, (2, 32))
    losses = [trainer.step({"input_ids": x, "labels": x}).loss for _ in range(3)]
    trainer.updater.wait_all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = trainer.memory()
    print(json.dumps({"params": params, "growth": peak - baseline, "host": mem.host_bytes, "ssd": mem.ssd_bytes,
                      "device": mem.device_peak_bytes, "budget": budget, "by_role": mem.host_bytes_by_role,
                      "streamed": len(trainer.store.streamed), "losses": losses, "rss_kb_before": before,
                      "rss_kb_after": status()}))
    trainer.close()
""")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["clip", "eager"])
def test_peak_rss_is_the_window_and_pools_while_ssd_holds_the_model(tmp_path, schedule):
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), schedule], capture_output=True,
                         text=True, check=True, env=child_env())  # glibc's mmap threshold fixed (anon_rss.py)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    full_state = 16 * r["params"]
    assert full_state >= 2 * r["budget"]
    assert r["streamed"] == 10, "embedding, 8 blocks and head all streamed"
    resident = {k: v for k, v in r["by_role"].items() if v}
    assert set(resident) == {"ssd_io_pool", "ssd_weight_window", "ssd_grad_ring", "activations"}, resident
    assert r["host"] - r["by_role"]["activations"] <= r["budget"]
    assert r["ssd"] >= 12 * r["params"], "master, m and v of every parameter are on SSD"
    assert r["growth"] <= 1.10 * (r["host"] + r["device"]), r
    assert r["growth"] <= 1.10 * (r["budget"] + r["device"]), "trains in a budget half its state (+ CPU slots)"
    assert r["losses"][-1] < r["losses"][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "eager"])
def test_ram_and_ssd_bytes_by_role_are_what_the_trainer_allocates_and_writes(tmp_path, dtype, clip):
    model = tiny_decoder(num_layers=2, tie_embeddings=True)
    schedule = dict(grad_clip_norm=1.0) if clip else dict(grad_clip_norm=None, on_nonfinite="ignore")
    cfg = horizon.TrainConfig(compute_dtype=dtype, **schedule,
                              ssd=horizon.SSDConfig(dir=tmp_path, units=[0, 1, 3], weights=True))
    with horizon.Trainer(model, cfg) as trainer:
        trainer.step(batches(1)[0])
        layouts = [u.layout for u in trainer.store.units]
        want = ram_bytes_by_role(layouts, dtype, accumulate=False, ssd_units=frozenset({0, 1, 3}), io_buffers=2,
                                 weights=True, spill_grads=clip)
        mem = trainer.memory()
        got = {k: v for k, v in mem.host_bytes_by_role.items() if k != "activations"}
        assert got == {k: v for k, v in want.items()}
        assert sorted(trainer.store.streamed) == [1, 3], "the tied embedding (unit 0) keeps its compute copy in RAM"
        # the file on disk is exactly the bytes counted by role, and each role has its formula
        assert os.path.getsize(trainer.ssd.file.path) == mem.ssd_bytes
        page = 4096
        padded = [-(-layouts[u].numel * 4 // page) * page for u in (0, 1, 3)]
        half = [-(-layouts[u].numel * dtype.itemsize // page) * page for u in (1, 3)]
        assert mem.ssd_bytes_by_role["master"] == mem.ssd_bytes_by_role["exp_avg"] == sum(padded)
        assert mem.ssd_bytes_by_role.get("compute", 0) == (sum(half) if dtype != torch.float32 else 0)
        assert mem.ssd_bytes_by_role.get("grad", 0) == (sum(half) if clip else 0)
        assert mem.ssd_bytes == sum(unit_extents(layouts[u], compute_dtype=dtype, weights=u != 0,
                                                 spill_grad=clip).read_bytes for u in (0, 1, 3))
