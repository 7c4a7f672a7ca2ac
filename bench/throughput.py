"""Training throughput on one GPU: plain PyTorch, DeepSpeed ZeRO-3 offload and Horizon, same model, same tokens.

What it measures, per model and system: tokens/s over the timed steps (warm-up excluded; the clock
stops only after the last update has finished), model TFLOP/s and MFU, peak device bytes (the CUDA
allocator's peak) and peak host RSS. Each (model, system) pair runs in its own child process, so
peaks are its own and one system's failure (out of memory, a missing package) is reported, not fatal.

  * plain_pytorch  the model on the GPU, bf16 autocast, torch.optim.AdamW(fused=True); only where it fits
  * deepspeed      ZeRO-3 with offload_optimizer and offload_param to pinned CPU memory, bf16,
                   DeepSpeedCPUAdam (the single-GPU offload configuration DeepSpeed documents)
  * horizon        horizon.Trainer, bf16 compute, fp32 master and AdamW on the CPU

FLOPs per token (the model's, whatever a system recomputes): 6 × the parameters of every matmul
(blocks and head; the embedding lookup is not a matmul) + 6 × layers × seq × dim for causal
attention (QK^T and AV, forward and backward, half the square). MFU = model FLOP/s over the
device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).

    python bench/throughput.py --models 1b,3b --seq 4096 --batch 4      # on a GPU machine
    python bench/throughput.py --models 1b --family hf-llama            # the same shapes as a HF Llama
    python bench/throughput.py --smoke                                   # whole harness on CPU, tiny model
Writes bench/results/throughput.json (see --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, median, result_record, write_json  # noqa: E402

SYSTEMS = ("plain_pytorch", "deepspeed", "horizon")
LR, BETAS, WD, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0

# Shapes beyond the presets of horizon.models.decoder (Llama-3.2-3B's, with the 32000-token vocabulary).
EXTRA_SHAPES = {
    "3b": dict(vocab_size=32000, dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim=8192),
}


def decoder_cfg(name: str):
    from horizon.models import decoder_config
    from horizon.models.decoder import DecoderConfig

    return DecoderConfig(**EXTRA_SHAPES[name]) if name in EXTRA_SHAPES else decoder_config(name)


def build_model(cfg, family: str):
    """The model under test, on the current default device: the reference decoder, or Hugging Face's
    LlamaForCausalLM with the same shapes (no biases, untied unless the preset ties)."""
    if family == "decoder":
        from horizon.models import Decoder

        return Decoder(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                     intermediate_size=cfg.hidden_ffn_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    return LlamaForCausalLM(hf)


def _logits(model, input_ids):
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def flops_per_token(cfg, seq: int) -> float:
    """horizon.flops.flops_per_token of the decoder with these shapes (built on meta)."""
    from horizon.flops import flops_per_token as model_flops_per_token
    from horizon.models import Decoder

    with torch.device("meta"):
        return model_flops_per_token(Decoder(cfg), seq)


def peak_flops(device_name: str | None) -> float | None:
    from horizon.flops import PEAK_BF16_FLOPS

    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if device_name and key in device_name), None)


# -- the systems, each run in a child process --------------------------------------------------------


def _batches(cfg, args, device):
    """One list of ``grad_accum`` micro-batches per optimizer step."""
    g = torch.Generator().manual_seed(0)
    for _ in range(args.warmup + args.steps):
        ids = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(args.grad_accum)]
        yield [{"input_ids": x[:, :-1].contiguous().to(device), "labels": x[:, 1:].contiguous().to(device)}
               for x in ids]


def _run_plain(cfg, args, device):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model(cfg, args.family).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                            fused=device.type == "cuda")

    micro = 0

    def step(batch):
        nonlocal micro
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = _logits(model, batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        (loss / args.grad_accum).backward()  # equal micro-batches: the mean of means is the global mean
        micro += 1
        if micro % args.grad_accum == 0:
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step, lambda: None, {}


def _run_deepspeed(cfg, args, device):
    if device.type != "cuda":
        raise RuntimeError("skipped: DeepSpeed ZeRO-3 offload needs a CUDA device")
    import deepspeed
    import torch.nn.functional as F

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": CLIP if args.clip else 0.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WD}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg, args.family)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    def step(batch):
        logits = _logits(engine, batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        engine.backward(loss)
        engine.step()
        return loss

    return step, lambda: None, {"zero_stage": 3}


def horizon_plan(spec: str, num_layers: int):
    """'recompute', 'keep', or 'keep:K' (the first K blocks keep their activations, the rest recompute)."""
    import horizon

    if not spec.startswith("keep:"):
        return spec
    keep = min(int(spec.split(":", 1)[1]), num_layers)
    return horizon.Plan(default=horizon.ActivationPolicy.RECOMPUTE,
                        per_unit={f"layers.{i}": horizon.ActivationPolicy.KEEP for i in range(keep)})


def _run_horizon(cfg, args, device):
    import horizon

    torch.manual_seed(0)
    # The reference decoder is built on the meta device and initialised in the store; HF models carry
    # non-parameter buffers (rotary frequencies) that must be real, so they are built on the CPU.
    with torch.device("meta" if args.family == "decoder" else "cpu"):
        model = build_model(cfg, args.family)
    config = horizon.TrainConfig(device=str(device), plan=horizon_plan(args.plan, cfg.num_layers),
                                 grad_clip_norm=CLIP if args.clip else None, grad_accum_steps=args.grad_accum,
                                 optimizer=horizon.AdamW(lr=LR, betas=BETAS, weight_decay=WD))
    trainer = horizon.Trainer(model, config)

    def step(batch):
        return trainer.step(batch).loss

    def extra():
        memory = trainer.memory()
        return {"plan": args.plan, "num_slots": memory.num_slots, "host_store_bytes": memory.host_bytes,
                "ledger_peak_bytes": trainer.engine.ledger.peak_bytes}

    return step, trainer.updater.wait_all, extra


RUNNERS = {"plain_pytorch": _run_plain, "deepspeed": _run_deepspeed, "horizon": _run_horizon}


def child(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = decoder_cfg(args.model)
    step, finish, extra = RUNNERS[args.child](cfg, args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times_s, losses = [], []
    batches = _batches(cfg, args, device)
    for i, micro_batches in enumerate(batches):
        if i == args.warmup:
            finish()
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            window_start = time.perf_counter()
        start = time.perf_counter()
        step_losses = [step(batch) for batch in micro_batches]
        losses.append(sum(float(loss) for loss in step_losses) / len(step_losses))
        times_s.append(time.perf_counter() - start)
    finish()
    sync()
    window_s = time.perf_counter() - window_start
    tokens = args.batch * args.seq * args.grad_accum  # per optimizer step
    out = {"tokens_per_s": tokens * args.steps / window_s, "median_step_s": median(times_s[args.warmup:]),
           "losses": losses, "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    out.update(extra() if callable(extra) else extra)
    return out


# -- the parent: one child per (model, system), then the table and the ratios ---------------------------


def run_child(args, model: str, system: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system, "--model", model, "--seq", str(args.seq),
           "--batch", str(args.batch), "--grad-accum", str(args.grad_accum), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--plan", args.plan,
           "--family", args.family]
    if args.smoke:
        cmd.append("--smoke")
    if not args.clip:
        cmd.append("--no-clip")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout_s} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            record = json.loads(line)
            record["wall_s"] = round(time.perf_counter() - start, 1)
            return record
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def summarise(args, runs: dict) -> dict:
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else None
    peak = peak_flops(device_name)
    ratios_ds, ratios_plain = [], []
    for model, by_system in runs.items():
        fpt = flops_per_token(decoder_cfg(model), args.seq)
        for record in by_system.values():
            if "tokens_per_s" in record:
                record["model_tflops"] = record["tokens_per_s"] * fpt / 1e12
                record["mfu"] = record["model_tflops"] * 1e12 / peak if peak else None
        h = by_system.get("horizon", {}).get("tokens_per_s")
        for name, sink in (("deepspeed", ratios_ds), ("plain_pytorch", ratios_plain)):
            other = by_system.get(name, {}).get("tokens_per_s")
            if h and other:
                by_system[f"horizon_vs_{name}"] = h / other
                sink.append(h / other)
    largest = list(runs)[-1] if runs else None
    return {"ratios": {"vs_deepspeed": min(ratios_ds) if ratios_ds else None,
                       "vs_plain_pytorch": min(ratios_plain) if ratios_plain else None},
            "mfu_largest": runs.get(largest, {}).get("horizon", {}).get("mfu") if largest else None,
            "largest_model": largest, "peak_bf16_flops": peak}


def print_table(runs: dict) -> None:
    print(f"{'model':>6} {'system':>14} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'dev GiB':>8} {'host GiB':>9}")
    for model, by_system in runs.items():
        for system in SYSTEMS:
            r = by_system.get(system)
            if r is None:
                continue
            if "error" in r:
                print(f"{model:>6} {system:>14}  {r['error'][:90]}")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            dev = r.get("device_peak_bytes", 0) / 2**30
            print(f"{model:>6} {system:>14} {r['tokens_per_s']:>10.0f} {r['model_tflops']:>8.1f} {mfu:>6} "
                  f"{dev:>8.1f} {r['host_peak_rss_bytes'] / 2**30:>9.1f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="1b", help="comma-separated: presets of horizon.models or 3b")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (sequences)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (count); a timed step is all of them")
    p.add_argument("--no-clip", dest="clip", action="store_false",
                   help=f"no global-norm clipping (default: clip to {CLIP} in every system)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--family", choices=("decoder", "hf-llama"), default="decoder",
                   help="horizon's reference decoder, or transformers' LlamaForCausalLM of the same shapes")
    p.add_argument("--plan", default="recompute",
                   help="horizon's plan: recompute, keep, or keep:K (the first K blocks keep, the rest recompute)")
    p.add_argument("--timeout-s", type=int, default=1800)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1 timed step: checks the harness")
    p.add_argument("--out", default=str(RESULTS_DIR / "throughput.json"))
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke and not a.child:
        a.models, a.seq, a.batch, a.steps, a.warmup = "tiny", 32, 2, 2, 1
    unknown = [s for s in a.systems.split(",") if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.seq < 1 or a.grad_accum < 1:
        p.error("--steps, --batch, --grad-accum and --seq must be >= 1 and --warmup >= 0")
    return a


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        try:
            print(json.dumps(child(args)))
        except Exception as e:  # reported by the parent as this system's result
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return None
    runs = {}
    for model in args.models.split(","):
        decoder_cfg(model)  # an unknown name fails here, before any child starts
        runs[model] = {}
        for system in args.systems.split(","):
            runs[model][system] = run_child(args, model, system)
            print(f"{model} {system}: {json.dumps(runs[model][system])[:300]}", flush=True)
    summary = summarise(args, runs)
    print_table(runs)
    print(json.dumps(summary["ratios"]), f"mfu_largest={summary['mfu_largest']}")
    config = {k: v for k, v in vars(args).items() if k not in ("child", "model", "out")}
    record = result_record("throughput", unit="tokens/s", higher_is_better=True, results=runs,
                           ratios=summary["ratios"], summary=summary, config=config)
    record["results"]["mfu_largest"] = summary["mfu_largest"]
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
