"""bench/throughput.py --smoke: the whole GPU harness on CPU with a tiny model, and its FLOP count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import throughput  # noqa: E402


def test_flops_per_token_counts_every_matmul_and_causal_attention():
    cfg = throughput.decoder_cfg("tiny")  # dim 64, 2 layers, 4 heads / 2 kv heads, ffn 128, vocab 256, untied
    head_dim = cfg.dim // cfg.num_heads
    per_block = cfg.dim * cfg.dim * 2 + cfg.dim * cfg.kv_heads * head_dim * 2 + 3 * cfg.dim * cfg.ffn_dim
    matmul = cfg.num_layers * per_block + cfg.vocab_size * cfg.dim
    seq = 32
    assert throughput.flops_per_token(cfg, seq) == 6 * matmul + 6 * cfg.num_layers * seq * cfg.dim


@pytest.mark.parametrize("family,extra", [("decoder", []), ("hf-llama", []),
                                          ("decoder", ["--grad-accum", "2", "--no-clip"])])
def test_smoke_runs_every_system_and_reports_ratios(tmp_path, family, extra):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--smoke", "--family", family,
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    runs = record["results"]["tiny"]
    for system in ("plain_pytorch", "horizon"):
        assert runs[system]["tokens_per_s"] > 0 and len(runs[system]["losses"]) == 3
        assert all(torch.isfinite(torch.tensor(runs[system]["losses"])))
    assert runs["horizon"]["ledger_peak_bytes"] > 0 and runs["horizon"]["host_store_bytes"] > 0
    if not torch.cuda.is_available():
        assert "skipped" in runs["deepspeed"]["error"]
        assert runs["plain_pytorch"]["mfu"] is None  # no peak for a CPU
    ratio = runs["horizon"]["tokens_per_s"] / runs["plain_pytorch"]["tokens_per_s"]
    assert abs(record["ratios"]["vs_plain_pytorch"] - ratio) < 1e-12
    assert record["machine"]["cores"] >= 1
    accum = int(extra[1]) if extra else 1
    assert record["config"]["grad_accum"] == accum and record["config"]["clip"] == (not extra)
    # tokens/s counts every micro-batch: with 2 timed steps their sum is 2 x the median, and the window is
    # that sum plus the wait for the last update
    tokens = record["config"]["batch"] * record["config"]["seq"] * accum * record["config"]["steps"]
    for system in ("plain_pytorch", "horizon"):
        window_s = tokens / runs[system]["tokens_per_s"]
        steps_s = runs[system]["median_step_s"] * record["config"]["steps"]
        assert steps_s * 0.99 <= window_s <= steps_s * 1.5, (system, window_s, steps_s)
