"""Invariant 3: host memory is the theoretical footprint (peak anonymous RSS, measured in a fresh process)."""

import json
import subprocess
import sys
import textwrap

from anon_rss import child_env

SCRIPT = textwrap.dedent("""
    import json, torch
    import horizon
    from horizon.models import Decoder, decoder_config
    from horizon.models.decoder import Block
    cfg = decoder_config("tiny", dim=768, num_layers=8, num_heads=8, num_kv_heads=8, ffn_dim=2048)
    # The baseline includes the compute library's one-time workspace: one block's forward and
    # backward in plain PyTorch, at the same shapes, before anything of Horizon exists.
    block = Block(cfg)
    block(torch.randn(2, 32, cfg.dim, requires_grad=True)).sum().backward()
    del block
    # Anonymous memory only (anon_rss.py says why): library pages faulted back in are no footprint.
    from anon_rss import AnonPeak
    with AnonPeak() as sampled:
        baseline = sampled.peak
        torch.manual_seed(0)
        model = Decoder(cfg)
        params = sum(p.numel() for p in model.parameters())
        trainer = horizon.Trainer(model, horizon.TrainConfig(plan="recompute", grad_clip_norm=1.0))
        x = torch.randint(0, 256, (2, 32))
        for _ in range(3):
            trainer.step({"input_ids": x, "labels": x})
    mem = trainer.memory()
    print(json.dumps({"params": params, "growth": sampled.peak - baseline, "host": mem.host_bytes,
                      "device": mem.device_peak_bytes, "by_role": mem.host_bytes_by_role}))
""")


def test_peak_rss_growth_is_within_ten_percent_of_the_footprint():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=child_env())
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # 16 B/param on CPU: master (= compute copy), m, v, grad; the CPU "device" slots live in RAM too
    assert r["by_role"]["master"] >= 4 * r["params"] and r["by_role"]["compute"] == 0
    assert 16 * r["params"] <= r["host"] <= 16 * r["params"] * 1.01
    assert r["host"] > 600 * 2**20, "a model of several hundred MB, so the compute library's fixed workspace (~40 MB) stays small"
    footprint = r["host"] + r["device"]
    assert r["growth"] <= 1.10 * footprint, r
