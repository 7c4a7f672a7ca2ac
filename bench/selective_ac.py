"""Selective activation checkpointing on the planner bench's block: does it pay here? (issue 5)

What it measures, on one Decoder block of bench/planner.py's shape (dim 256, seq 256, batch 4, fp32,
CPU), its weights bound to a device slot as the engine binds them:
  * keep        the engine's KEEP: forward with autograd under ``KeptGraph``'s hooks, then backward
  * recompute   the engine's RECOMPUTE: forward without autograd, then forward with autograd and backward
  * sac         torch's selective op AC as torchtitan and Megatron ship it:
                ``checkpoint(block, x, use_reentrant=False, context_fn=partial(
                create_selective_checkpoint_contexts, policy))`` keeping the outputs of the matmuls and of
                SDPA (its output and logsumexp), recomputing norms, rotary, SiLU, the SwiGLU product,
                residual adds in backward
  * sac_all     the same machinery with every op saved (nothing recomputed): its own overhead
Per system: device bytes held from forward to backward (unique storages, the weights excluded, as the
engine's ledger counts them; SAC's are the cached op outputs and the block input), forward and backward
milliseconds (medians over rounds, systems interleaved, warm-up excluded), and whether the gradients
are bitwise KEEP's. Also how SAC meets the engine: the bytes the engine's saved-tensor hooks see of a
SAC block, and whether its recompute reads the weights from the slot at backward time.

From these and bench/results/planner.json (its measured all-RECOMPUTE and all-KEEP steps and budget)
it predicts what the planner could reach with a SELECTIVE choice: an LP bound over any mix of KEEP,
SELECTIVE and RECOMPUTE blocks (row splits included, costs linear in the rows) at the bench's budget
(half the blocks' KEEP bytes), each block's seconds scaled to the real step. Also for an ideal SAC
without the machinery's overhead: KEEP plus the recompute of the cheap ops alone (sac's backward less
sac_all's, which runs the same machinery and recomputes nothing).

    python bench/selective_ac.py [--rounds 20 --warmup 3]
Writes bench/results/selective_ac.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import horizon
from horizon.engine.activations import KeptGraph
from horizon.models import Decoder, decoder_config

from _common import RESULTS_DIR, CpuMeter, median, result_record, write_json

A = torch.ops.aten
SAVED_OPS = {A.mm.default, A.addmm.default, A.bmm.default,
             A._scaled_dot_product_flash_attention_for_cpu.default, A._scaled_dot_product_flash_attention.default,
             A._scaled_dot_product_efficient_attention.default, A._scaled_dot_product_cudnn_attention.default}
"""torchtitan's save list, for this CPU: matmuls and SDPA (its output and logsumexp) are kept."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--planner-json", default=str(RESULTS_DIR / "planner.json"))
    p.add_argument("--out", default=str(RESULTS_DIR / "selective_ac.json"))
    return p.parse_args(argv)


def _policy(save_all: bool):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if save_all or op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _tensors(obj, out: list) -> list:
    """Every tensor in SAC's cache (a nest of dicts and lists, entries wrapped in ``_VersionWrapper``)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif hasattr(obj, "val"):
        _tensors(obj.val, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _unique_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class _Block:
    """The bench's block in an engine slot: its template, parameters, an input and an output gradient."""

    def __init__(self, a: argparse.Namespace) -> None:
        torch.manual_seed(0)
        model = Decoder(decoder_config("small", dim=a.dim, num_layers=1, vocab_size=1024, num_heads=8,
                                       num_kv_heads=4, ffn_dim=None))
        self.trainer = horizon.Trainer(copy.deepcopy(model), horizon.TrainConfig(plan="keep"))
        pool, store = self.trainer.engine.pool, self.trainer.store
        self.slot = pool.slots[0]
        self.slot[:store.units[1].compute.numel()].copy_(store.units[1].compute)
        self.module, self.params = pool.template(0, 1), pool.params(0, 1)
        self.x = torch.randn(a.batch, a.seq, a.dim)
        self.grad_y = torch.randn(a.batch, a.seq, a.dim)

    def systems(self) -> dict:
        """name -> (forward() -> state, backward(state) -> gradients, bytes(state) -> device bytes held)."""
        return {"keep": (self._keep_forward, lambda g: g.backward(self.grad_y, self.slot), lambda g: g.saved_bytes),
                "recompute": (self._recompute_forward, self._recompute_backward, lambda _: 0),
                "sac": (functools.partial(self._sac_forward, False), self._sac_backward, lambda s: s[2]),
                "sac_all": (functools.partial(self._sac_forward, True), self._sac_backward, lambda s: s[2])}

    def _keep_forward(self) -> KeptGraph:
        g = KeptGraph(self.slot)
        g.forward(self.module, self.x.clone(), self.params)
        return g

    def _recompute_forward(self) -> None:
        with torch.no_grad():
            self.module(self.x)

    def _recompute_backward(self, _) -> tuple:
        x = self.x.clone().requires_grad_()
        with torch.enable_grad():
            y = self.module(x)
        return torch.autograd.grad(y, [x, *self.params], self.grad_y)

    def _sac_forward(self, save_all: bool) -> tuple:
        x, modes = self.x.clone().requires_grad_(), []

        def context():
            modes.extend(create_selective_checkpoint_contexts(_policy(save_all)))
            return modes[0], modes[1]

        with torch.enable_grad():
            y = checkpoint(self.module, x, use_reentrant=False, context_fn=context, preserve_rng_state=False)
        return x, y, _unique_bytes(_tensors(modes[0].storage, [x]))

    def _sac_backward(self, state) -> tuple:
        x, y, _ = state
        return torch.autograd.grad(y, [x, *self.params], self.grad_y)

    def findings(self) -> dict:
        """How SAC meets the engine: what the engine's saved-tensor hooks see of it, and where its recompute
        reads the weights (the forward slot holds another unit by the time the engine runs a backward)."""
        hooks = KeptGraph(self.slot)
        with hooks.hooks():
            state = self._sac_forward(False)
        reference = self._sac_backward(self._sac_forward(False))
        state = self._sac_forward(False)
        weights = self.slot.clone()
        self.slot.mul_(2)
        moved = self._sac_backward(state)
        self.slot.copy_(weights)
        return {"engine_hooks_see_bytes": hooks.saved_bytes, "input_bytes": self.x.numel() * self.x.element_size(),
                "recompute_reads_weights_at_backward": not all(torch.equal(r, m) for r, m in zip(reference, moved))}


def measure(a: argparse.Namespace) -> dict:
    block = _Block(a)
    systems = block.systems()
    keep_fwd, keep_bwd, _ = systems["keep"]
    reference = keep_bwd(keep_fwd())
    out = {}
    for name, (fwd, bwd, nbytes) in systems.items():
        state = fwd()
        held = nbytes(state)
        out[name] = {"device_bytes": held, "bitwise_keep": all(torch.equal(r, g) for r, g in
                                                                 zip(reference, bwd(state)))}
    times = {name: ([], []) for name in systems}
    for i in range(a.warmup + a.rounds):
        for name, (fwd, bwd, _) in systems.items():
            t0 = time.perf_counter()
            state = fwd()
            t1 = time.perf_counter()
            bwd(state)
            t2 = time.perf_counter()
            if i >= a.warmup:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    for name, (fwd_s, bwd_s) in times.items():
        out[name].update(fwd_ms=1e3 * median(fwd_s), bwd_ms=1e3 * median(bwd_s),
                         total_ms=1e3 * (median(fwd_s) + median(bwd_s)))
    out["findings"] = block.findings()
    block.trainer.close()
    return out


def lp_bound(*, saving_keep_s: float, saving_sac_s: float, sac_bytes_per_keep: float, blocks: int,
             budget_keep_blocks: float) -> tuple[float, float, float]:
    """Largest step saving over all-RECOMPUTE of n_keep KEEP and n_sac SELECTIVE blocks (real numbers:
    row splits, costs linear in the rows), with n_keep + r n_sac <= budget and n_keep + n_sac <= blocks.
    Returns (saving_s, n_keep, n_sac); the optimum is at a vertex of that polygon."""
    r = sac_bytes_per_keep
    vertices = [(0.0, 0.0), (min(blocks, budget_keep_blocks), 0.0), (0.0, min(blocks, budget_keep_blocks / r))]
    if r < 1 and budget_keep_blocks < blocks < budget_keep_blocks / r:
        n_sac = (blocks - budget_keep_blocks) / (1 - r)
        vertices.append((blocks - n_sac, n_sac))
    return max((k * saving_keep_s + s * saving_sac_s, k, s) for k, s in vertices)


def predict(blocks_ms: dict, planner: dict) -> dict:
    """The planner bench's MIP ratio with a SELECTIVE choice, as measured and without SAC's own overhead."""
    res, layers = planner["results"], planner["config"]["layers"]
    keep_ms, rec_ms = blocks_ms["keep"]["total_ms"], blocks_ms["recompute"]["total_ms"]
    per_block_s = (res["recompute"] - res["keep_floor"]) / layers   # a block's KEEP saving in the real step
    r = blocks_ms["sac"]["device_bytes"] / blocks_ms["keep"]["device_bytes"]
    recomputed_ms = blocks_ms["sac"]["bwd_ms"] - blocks_ms["sac_all"]["bwd_ms"]  # same machinery, nothing recomputed
    sac_ms = {"measured": blocks_ms["sac"]["total_ms"], "without_machinery": keep_ms + recomputed_ms}
    out = {"keep_only": 1 - per_block_s * planner["config"]["budget_frac"] * layers / res["recompute"]}
    for name, ms in sac_ms.items():
        saving, n_keep, n_sac = lp_bound(saving_keep_s=per_block_s,
                                         saving_sac_s=per_block_s * (rec_ms - ms) / (rec_ms - keep_ms),
                                         sac_bytes_per_keep=r, blocks=layers,
                                         budget_keep_blocks=planner["config"]["budget_frac"] * layers)
        out[name] = 1 - saving / res["recompute"]
        out[f"{name}_blocks"] = {"keep": n_keep, "selective": n_sac}
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    meter = CpuMeter().start()
    blocks = measure(a)
    load = meter.stop()
    findings = blocks.pop("findings")
    keep = blocks["keep"]
    for name, r in blocks.items():
        print(f"{name:10s} device bytes {r['device_bytes']:>11,} ({r['device_bytes'] / keep['device_bytes']:.3f} of "
              f"keep)  fwd {r['fwd_ms']:6.2f} ms  bwd {r['bwd_ms']:6.2f} ms  total {r['total_ms']:6.2f} ms "
              f"({r['total_ms'] / keep['total_ms']:.3f}x keep)  bitwise keep: {r['bitwise_keep']}")
    with open(a.planner_json) as f:
        planner = json.load(f)
    prediction = predict(blocks, planner)
    print("predicted planner-bench ratio vs all-RECOMPUTE: keep/recompute only {keep_only:.3f}; with SELECTIVE "
          "as measured {measured:.3f} ({measured_blocks}); SELECTIVE without the machinery's overhead "
          "{without_machinery:.3f} ({without_machinery_blocks})".format(**prediction))
    print(f"the engine's saved-tensor hooks see {findings['engine_hooks_see_bytes']:,} B of SAC's block (its input: "
          f"{findings['input_bytes']:,} B); its recompute reads the weights at backward time: "
          f"{findings['recompute_reads_weights_at_backward']}")
    print(f"other processes used {load['other_cpu_s']} CPU-s during {load['wall_s']} s")
    ratios = {f"{n}_vs_keep_s": blocks[n]["total_ms"] / keep["total_ms"] for n in blocks} | \
             {f"{n}_vs_keep_bytes": blocks[n]["device_bytes"] / keep["device_bytes"] for n in blocks}
    record = result_record("selective_ac", unit="ms per block (forward + backward)", higher_is_better=False,
                           results={n: r["total_ms"] for n, r in blocks.items()}, ratios=ratios, blocks=blocks,
                           predicted_planner_ratio=prediction, findings=findings, load=load,
                           config={**vars(a), "saved_ops": sorted(str(op) for op in SAVED_OPS),
                                   "planner_commit": (planner.get("git") or {}).get("commit")})
    print("wrote", write_json(a.out, record))


if __name__ == "__main__":
    main()
