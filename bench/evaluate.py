"""Evaluation throughput: Horizon's streamed ``Trainer.evaluate`` vs plain PyTorch's eval loop, same weights.

What it measures: tokens/s of the held-out loss (median over timed rounds, warm-up excluded) of
  * plain_pytorch  model.eval(); torch.no_grad(); cross_entropy(model(x), y, ignore_index=-100, reduction="sum")
  * horizon        Trainer.evaluate(batches): units streamed through two slots, no autograd, chunked loss head
on one Decoder whose trainer has taken a few steps (so the weights are trained, not initial), the same
batches, in one process, the two taking turns round by round. Both losses are printed: they must agree.
Also: the seconds the trainer's preflight (the estimate against this machine) adds to its construction.

Why: on CPU there is no PCIe to hide, so what evaluation costs beyond plain PyTorch is the engine's
streaming overhead (slot copies on the transfer thread, per-unit calls). The CLI evaluates every
``eval_every_steps``; it should cost about what a plain forward costs. Goal: eval_slowdown <= 1.25.

    python bench/evaluate.py [--rounds 5 --warmup 1 --dim 512 --layers 6 --seq 512 --batch 4 --batches 4]
Writes bench/results/evaluate.json (see --out).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import horizon
from horizon.estimate.preflight import preflight
from horizon.models import Decoder, decoder_config

from _common import RESULTS_DIR, CpuMeter, median, result_record, timed, write_json

GOAL_SLOWDOWN = 1.25


def _batches(args) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (x := torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)),
             "labels": torch.roll(x, -1, dims=1)} for _ in range(args.batches)]


@torch.no_grad()
def plain_eval(model: torch.nn.Module, batches) -> float:
    total, count = 0.0, 0
    for b in batches:
        logits = model(b["input_ids"])
        total += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                                       reduction="sum"))
        count += int((b["labels"] != -100).sum())
    return total / count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (count)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (count)")
    p.add_argument("--dim", type=int, default=512, help="hidden size")
    p.add_argument("--layers", type=int, default=6, help="blocks (count)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (token ids)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--batches", type=int, default=4, help="batches per evaluation")
    p.add_argument("--out", default=str(RESULTS_DIR / "evaluate.json"), help="JSON to write (path)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = decoder_config("small", dim=args.dim, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                         ffn_dim=4 * args.dim, vocab_size=args.vocab)
    model = Decoder(cfg)
    batches = _batches(args)
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    config = horizon.TrainConfig(grad_clip_norm=1.0)
    preflight_s = median([timed(preflight, model, config)[0] for _ in range(3)])
    trainer = horizon.Trainer(copy.deepcopy(model), config)
    for b in batches[:2]:
        trainer.step(b)
    plain_model = copy.deepcopy(model)
    plain_model.load_state_dict(trainer.state_dict())
    plain_model.eval()

    times = {"plain_pytorch": [], "horizon": []}
    losses = {}
    meter = CpuMeter().start()
    for r in range(args.warmup + args.rounds):
        for name, fn in (("plain_pytorch", lambda: plain_eval(plain_model, batches)),
                         ("horizon", lambda: trainer.evaluate(batches).loss)):
            seconds, losses[name] = timed(fn)
            if r >= args.warmup:
                times[name].append(seconds)
    contention = meter.stop()
    trainer.close()

    results = {name: tokens / median(ts) for name, ts in times.items()}
    slowdown = results["plain_pytorch"] / results["horizon"]
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.1f}M parameters, {args.layers} blocks; {args.batches} batches of "
          f"{args.batch} x {args.seq} tokens on {torch.get_num_threads()} threads")
    for name, value in results.items():
        print(f"  {name:<14} {value:>10,.0f} tokens/s  (median of {args.rounds}; loss {losses[name]:.6f})")
    print(f"  eval slowdown (plain / horizon tokens/s): {slowdown:.3f} (goal <= {GOAL_SLOWDOWN})")
    print(f"  preflight at Trainer construction: {preflight_s * 1e3:.1f} ms")
    print(f"  other processes' CPU during the timed rounds: {contention['other_cpu_s']} s of {contention['wall_s']} s")
    record = result_record("evaluate", unit="tokens/s", higher_is_better=True, results=results,
                           ratios={"vs_plain_pytorch": 1 / slowdown, "eval_slowdown": slowdown,
                                   "goal_eval_slowdown": GOAL_SLOWDOWN},
                           losses=losses, preflight_s=preflight_s, contention=contention,
                           config={**vars(args), "num_params": num_params, "tokens_per_eval": tokens,
                                   "timed_at_unix_s": time.time()})
    write_json(args.out, record)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
