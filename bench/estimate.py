"""Is ``horizon estimate`` right? Predicted vs measured host and device bytes over reference-decoder sizes.

For each size, a fresh process builds the decoder on the meta device, takes a baseline RSS (after
one plain block forward and backward, so the compute library's one-time workspace is in it), runs
``--steps`` Horizon steps on the CPU and reports its peak RSS growth and the engine's device
ledger peak. On the CPU the "device" is RAM too, so the RSS growth is compared with the predicted
host bytes plus the predicted device peak. Beside it: what DeepSpeed's ZeRO-3 estimator
(``estimate_zero3_model_states_mem_needs``, parameters and optimizer offloaded to CPU, as
``..._all_cold`` prints it) would tell a user to provision for the same model, where deepspeed
is installed. ``ratios.max_host_error`` is Horizon's worst relative error (goal <= 0.05).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys

import torch

import horizon
from _common import RESULTS_DIR, CpuMeter, result_record, write_json
from horizon.estimate import estimate_memory
from horizon.models import Decoder, decoder_config

SIZES = [(512, 1376), (768, 2048), (1024, 2816), (1280, 3456)]
"""(dim, ffn_dim) of the 8-block decoders measured."""

MEASURE = """
import json, resource, sys, psutil, torch
import horizon
from horizon.models import Decoder, decoder_config
from horizon.models.decoder import Block
dim, ffn, batch, seq, steps = map(int, sys.argv[1:6])
cfg = decoder_config("tiny", dim=dim, num_layers=8, num_heads=8, num_kv_heads=8, ffn_dim=ffn)
block = Block(cfg)
block(torch.randn(batch, seq, dim, requires_grad=True)).sum().backward()
del block
with torch.device("meta"):
    model = Decoder(cfg)
baseline = psutil.Process().memory_info().rss
trainer = horizon.Trainer(model, horizon.TrainConfig(plan="recompute", grad_clip_norm=1.0))
x = torch.randint(0, 256, (batch, seq))
for _ in range(steps):
    trainer.step({"input_ids": x, "labels": x})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_growth_bytes": peak - baseline, "device_peak_bytes": trainer.memory().device_peak_bytes}))
"""


def _deepspeed(num_params: int, largest_layer_params: int) -> dict | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return None
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(num_params, largest_layer_params, num_gpus_per_node=1,
                                                        num_nodes=1, cpu_offload=True, cpu_offload_params=True,
                                                        zero_init=True)
    return {"host_bytes": cpu, "device_bytes": gpu}


def _one(dim: int, ffn: int, args) -> dict:
    cfg = decoder_config("tiny", dim=dim, num_layers=8, num_heads=8, num_kv_heads=8, ffn_dim=ffn)
    with torch.device("meta"):
        model = Decoder(cfg)
    estimate = estimate_memory(model, horizon.TrainConfig(plan="recompute", grad_clip_norm=1.0),
                               batch_size=args.batch_size, seq_len=args.seq_len)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(dim), str(ffn), str(args.batch_size),
                          str(args.seq_len), str(args.steps)], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    units = [model.embed_tokens, model.layers[0], model.lm_head]
    largest = max(sum(p.numel() for p in u.parameters()) for u in units)
    predicted = estimate.ram_bytes_on_cpu
    row = {"dim": dim, "ffn_dim": ffn, "num_params": estimate.num_params,
           "predicted_host_bytes": predicted, "measured_rss_growth_bytes": measured["rss_growth_bytes"],
           "host_error": abs(predicted - measured["rss_growth_bytes"]) / measured["rss_growth_bytes"],
           "predicted_device_peak_bytes": estimate.device_peak_bytes,
           "ledger_device_peak_bytes": measured["device_peak_bytes"],
           "deepspeed_zero3_offload": _deepspeed(estimate.num_params, largest)}
    ds = row["deepspeed_zero3_offload"]
    growth = measured["rss_growth_bytes"]
    row["deepspeed_host_error"] = None if ds is None else abs(ds["host_bytes"] - growth) / growth
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (count)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=2, help="steps per measured run (count)")
    args = parser.parse_args()
    meter = CpuMeter().start()
    rows = [_one(dim, ffn, args) for dim, ffn in SIZES]
    print(f"{'params':>12} {'predicted':>12} {'measured':>12} {'error':>7} {'device pred':>12} {'ledger':>12} "
          f"{'deepspeed':>12}")
    for r in rows:
        ds = r["deepspeed_zero3_offload"]
        print(f"{r['num_params']:>12,} {r['predicted_host_bytes'] / 2**20:>10.1f}Mi "
              f"{r['measured_rss_growth_bytes'] / 2**20:>10.1f}Mi {100 * r['host_error']:>6.2f}% "
              f"{r['predicted_device_peak_bytes'] / 2**20:>10.2f}Mi {r['ledger_device_peak_bytes'] / 2**20:>10.2f}Mi "
              f"{'-' if ds is None else format(ds['host_bytes'] / 2**20, '10.1f') + 'Mi':>12}")
    max_host_error = max(r["host_error"] for r in rows)
    device_exact = all(r["predicted_device_peak_bytes"] == r["ledger_device_peak_bytes"] for r in rows)
    ds_errors = [r["deepspeed_host_error"] for r in rows if r["deepspeed_host_error"] is not None]
    print(f"max host error: horizon {100 * max_host_error:.2f}% (goal <= 5%); device peak equal to the ledger: "
          f"{device_exact}; deepspeed's ZeRO-3 offload estimate vs the measured growth: "
          f"{'n/a' if not ds_errors else format(100 * max(ds_errors), '.0f') + '% off at worst'}")
    results = {"horizon": max_host_error, "deepspeed_zero3_offload": max(ds_errors) if ds_errors else None}
    record = result_record("estimate", unit="relative error of predicted host bytes", higher_is_better=False,
                           results=results, ratios={"max_host_error": max_host_error,
                                                    "device_peak_exact": device_exact},
                           skipped={} if ds_errors else {"deepspeed_zero3_offload": "deepspeed is not installed"},
                           sizes=rows, contention=meter.stop(),
                           config={"num_layers": 8, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                   "steps": args.steps, "device": "cpu", "plan": "recompute"})
    print(f"wrote {write_json(RESULTS_DIR / 'estimate.json', record)}")


if __name__ == "__main__":
    main()
