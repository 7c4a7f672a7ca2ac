"""Measure a ``Profile`` on the machine that will train: run each unit as the engine runs it.

Why measured, not estimated: the plan trades compute against link time against device bytes,
and all three depend on the machine, the dtype and the batch shape. Each distinct block
structure is timed once (identical blocks share it): forward without autograd, forward with
autograd under the KEEP hooks, backward from the kept graph; medians after two warm-ups. Saved
bytes come from the same hooks the engine uses (KEEP and SWAP), so they are exact, also for each
row fraction the engine can execute at this batch (a copy of the first f·B rows, as the engine
runs it), and so are the seconds of such a part, timed in the same rounds as the whole block; the
link is timed through the engine's own transfer (throttled on CPU, a copy stream on CUDA), and so
is what a copy costs the compute beside it; each unit's optimizer update is timed with the
optimizer's kernel on scratch buffers (``update_cost.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import torch

from horizon.engine.activations import KeptGraph
from horizon.engine.loss import head_forward_backward
from horizon.engine.slots import SlotPool
from horizon.engine.swap import SwappedGraph
from horizon.engine.transfer import Transfer
from horizon.models.units import UnitKind, UnitSpec
from horizon.optim.adamw import optimizer_threads, overlap_threads
from horizon.planner.profile import Profile, UnitCost, UnitRole
from horizon.planner.update_cost import update_s_per_param
from horizon.store.host_store import HostStore

__all__ = ["measure_profile", "median_profile", "FRACTIONS"]

FRACTIONS = (0.25, 0.5, 0.75)
"""Row fractions offered to the planner where they are whole rows of the batch."""

COPY_PROBE_BYTES = 64 << 20
"""The largest copy timed beside the compute: a large model's block swaps gigabytes, which the profile
must not allocate again on the device to learn a rate per byte."""

_ROLE = {UnitKind.EMBEDDING: UnitRole.EMBEDDING, UnitKind.BLOCK: UnitRole.BLOCK, UnitKind.HEAD: UnitRole.HEAD}


def _medians_s(fns, *, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Median seconds of each of ``fns``, run in turn ``warmup + reps`` times (the first ``warmup`` untimed)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + reps):
        for fn, out in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _median_s(fn, **kwargs) -> float:
    return _medians_s([fn], **kwargs)[0]


def measure_profile(specs: list[UnitSpec], store: HostStore, *, device: torch.device, transfer: Transfer,
                    batch_size: int, seq_len: int, reps: int = 5, warmup: int = 3,
                    fractions: tuple[float, ...] = FRACTIONS) -> Profile:
    """Costs of every unit at ``batch_size × seq_len`` tokens; allocates one slot and a few activations.

    Each time is the median of ``reps`` runs after ``warmup`` untimed ones (first calls pay for
    kernel selection and page faults; on a shared machine, more of both is steadier). Of
    ``fractions`` the profile keeps those that are whole rows of ``batch_size`` (none for 1 row)."""
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"measure_profile needs a positive batch shape, got {batch_size} × {seq_len}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"measure_profile needs reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    if any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"measure_profile: fractions must each be in (0, 1), got {fractions}")
    levels = tuple(sorted({f for f in fractions if abs(f * batch_size - round(f * batch_size)) < 1e-9}))
    median_s = functools.partial(_median_s, device=device, reps=reps, warmup=warmup)
    medians_s = functools.partial(_medians_s, device=device, reps=reps, warmup=warmup)
    layouts = [u.layout for u in store.units]
    itemsize = store.compute_dtype.itemsize
    pool = SlotPool([s.module for s in specs], layouts, num_slots=1, device=device, dtype=store.compute_dtype)
    slot = pool.slots[0]

    def load(unit: int) -> None:
        layout = layouts[unit]
        slot[:layout.numel].copy_(store.units[unit].compute)
        for b in layout.borrowed:
            owner = store.units[b.owner].compute
            slot[b.offset:b.offset + b.owner_slot.numel].copy_(owner[b.owner_slot.offset:][:b.owner_slot.numel])

    vocab = specs[0].module.num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    load(0)
    with torch.no_grad():
        hidden = specs[0].call(pool.template(0, 0), ids)
    costs, timed, copy_cost = [], {}, 0.0
    for unit, spec in enumerate(specs):
        load(unit)
        template, params = pool.template(0, unit), pool.params(0, unit)
        run = (lambda x, t=template, s=spec: s.call(t, x))
        times = {}
        if spec.kind is UnitKind.BLOCK:
            key = (type(spec.module).__qualname__, layouts[unit].device_numel)
            if key not in timed:
                timed[key] = _time_block(run, hidden, params, slot, medians_s, levels)
                if len(timed) == 1:
                    copy_cost = _copy_cost_s_per_byte(run, hidden, params, slot, transfer,
                                                      min(timed[key]["swap_bytes"], COPY_PROBE_BYTES),
                                                      pin=store.pinned, reps=reps, warmup=warmup)
            times = timed[key]
        elif spec.kind is UnitKind.EMBEDDING:
            times = _time_embedding(spec, template, params, ids, median_s)
        else:
            labels = torch.randint(0, vocab, (batch_size, seq_len), device=device)
            times = {"fwd_s": median_s(lambda: head_forward_backward(
                run, params, hidden, labels, loss_divisor=labels.numel(),
                chunk_tokens=max(1, (256 * 2**20) // (4 * spec.module.head.out_features))))}
        layout = layouts[unit]
        costs.append(UnitCost(name=spec.name, role=_ROLE[spec.kind], weight_bytes=layout.device_numel * itemsize,
                              grad_bytes=layout.numel * itemsize,
                              borrowed_grad_bytes=tuple((b.owner, b.owner_slot.numel * itemsize)
                                                        for b in layout.borrowed), **times))
    costs = _with_update_times(costs, layouts, store.compute_dtype)
    return Profile(units=tuple(costs), hidden_bytes=hidden.numel() * hidden.element_size(),
                   slot_bytes=pool.slot_bytes, link_bytes_per_s=_link_bytes_per_s(transfer, store, slot, device),
                   pageable_link_bytes_per_s=_pageable_bytes_per_s(transfer, store, slot, device),
                   duplex=transfer.duplex, tokens=batch_size * seq_len, fractions=levels,
                   copy_compute_s_per_byte=copy_cost)


def _block_timers(run, hidden, params, slot) -> tuple[list, Callable[[list[float]], dict]]:
    """The three things ``_time_block`` times for a block on ``hidden`` (forward without autograd, KEEP
    forward, its backward), and how to turn their medians into the block's costs."""
    graphs: list[KeptGraph] = []  # at most one: each backward consumes the graph the forward before it made
    grad_y, keep_bytes = torch.ones_like(hidden), []

    def forward() -> None:
        with torch.no_grad():
            run(hidden)

    def forward_keep() -> None:
        graphs.append(KeptGraph(slot))
        graphs[-1].forward(run, hidden, params)

    def backward() -> None:
        kept = graphs.pop()
        keep_bytes.append(kept.saved_bytes)
        kept.backward(grad_y, slot)

    def costs(seconds: list[float]) -> dict:
        swapped = SwappedGraph(slot)
        swapped.forward(run, hidden, params)
        swapped.discard()  # only its bytes are wanted: no backward will free the graph
        fwd_s, fwd_grad_s, bwd_s = seconds
        return {"fwd_s": fwd_s, "fwd_grad_s": fwd_grad_s, "bwd_s": bwd_s, "keep_bytes": keep_bytes[-1],
                "swap_bytes": swapped.nbytes}

    return [forward, forward_keep, backward], costs


def _time_block(run, hidden, params, slot, medians_s, levels: tuple[float, ...]) -> dict:
    """The block's costs on the whole batch and, per level f, on its first f·B rows copied out as the
    engine does them (small parts run less efficiently than a share of the whole, and not every saved
    tensor is per row). All of them are timed in the same rounds, in turn: the planner weighs a split
    against whole blocks by the ratio of these times, so they share the machine's state of each round."""
    sizes = [hidden] + [hidden[:round(f * hidden.shape[0])].clone() for f in levels]
    timers = [_block_timers(run, h, params, slot) for h in sizes]
    split = _split_timers(hidden, params) if levels else []
    seconds = medians_s([fn for fns, _ in timers for fn in fns] + split)
    whole, *parts = [costs(seconds[3 * i:3 * i + 3]) for i, (_, costs) in enumerate(timers)]
    return whole | {f"{name}_at": tuple(p[name] for p in parts)
                    for name in ("fwd_s", "fwd_grad_s", "bwd_s", "keep_bytes", "swap_bytes")} \
        | ({"split_fwd_s": seconds[-2], "split_bwd_s": seconds[-1]} if split else {})


def _split_timers(hidden: torch.Tensor, params: list[torch.Tensor]) -> list[Callable[[], None]]:
    """What the engine does for each part of a split beyond the first (``Engine._forward_block`` and
    ``_backward_unit``): in forward a part's rows copied out and the outputs concatenated, in backward
    the input gradients concatenated and one more sum of the block's parameter gradients."""
    rows = hidden.shape[0] // 2
    grads = [torch.ones_like(p) for p in params]  # stand-ins for two parts' parameter gradients

    def forward() -> None:
        torch.cat([hidden[:rows].clone(), hidden[rows:]])

    def backward() -> None:
        torch.cat([hidden[:rows], hidden[rows:]])
        for g in grads:
            torch.add(g, g)

    return [forward, backward]


def _copy_cost_s_per_byte(run, hidden, params, slot, transfer: Transfer, nbytes: int, *, pin: bool, reps: int,
                          warmup: int) -> float:
    """What a copy to the host costs the compute beside it, per byte: a block's KEEP forward and backward
    timed alone and while the transfer copies ``nbytes`` (what swapping the block moves, up to
    ``COPY_PROBE_BYTES``), in turn.

    Only the compute is timed (on CUDA its stream is synchronised, not the copy's; on the CPU the
    throttle's sleep costs no core, the copy does). ~0 with a DMA engine; on the CPU device a copy
    takes one of the cores the compute runs on."""
    device = slot.device
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    (_, forward_keep, backward), _ = _block_timers(run, hidden, params, slot)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + reps):
        for beside, out in zip((False, True), times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            handle = transfer.d2h([dst], [src]) if beside else None
            forward_keep()
            backward()
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            if i >= warmup:
                out.append(time.perf_counter() - start)
            if handle is not None:
                handle.wait_host()
    alone_s, beside_s = map(statistics.median, times)
    return max(beside_s - alone_s, 0.0) / nbytes if nbytes else 0.0


def _time_embedding(spec: UnitSpec, template, params, ids, median_s) -> dict:
    with torch.no_grad():
        fwd_s = median_s(lambda: spec.call(template, ids))

    def backward() -> None:
        with torch.enable_grad():
            y = spec.call(template, ids)
            torch.autograd.grad(y, params, torch.ones_like(y))

    return {"fwd_s": fwd_s, "bwd_s": median_s(backward)}


def _link_bytes_per_s(transfer: Transfer, store: HostStore, slot: torch.Tensor, device: torch.device) -> float:
    """Bandwidth of one host-to-device copy of the largest unit from the store, through the engine's transfer."""
    return _copy_rate(transfer, max((u.compute for u in store.units), key=lambda t: t.numel()), slot, device)


def _pageable_bytes_per_s(transfer: Transfer, store: HostStore, slot: torch.Tensor, device: torch.device) -> float:
    """The same copy from pageable memory (a fresh buffer of up to ``COPY_PROBE_BYTES``): what the link gives
    when pinning fails or is off (``TrainConfig(pin_memory=False)``)."""
    largest = max((u.compute for u in store.units), key=lambda t: t.numel())
    src = torch.ones(min(largest.numel(), COPY_PROBE_BYTES // largest.element_size()), dtype=largest.dtype)
    return _copy_rate(transfer, src, slot, device)


def _copy_rate(transfer: Transfer, src: torch.Tensor, slot: torch.Tensor, device: torch.device) -> float:
    dst = slot[:src.numel()]

    def copy() -> None:
        transfer.h2d([dst], [src]).wait_host()

    return src.numel() * src.element_size() / _median_s(copy, device=device, reps=3, warmup=2)


def _with_update_times(costs: list[UnitCost], layouts, compute_dtype: torch.dtype) -> list[UnitCost]:
    """Each unit's AdamW update seconds, with every core and with the eager schedule's threads."""
    every, overlap = optimizer_threads(), overlap_threads()
    rate = update_s_per_param(compute_dtype, total_params=sum(layout.numel for layout in layouts),
                              threads=tuple(sorted({every, overlap})))
    return [dataclasses.replace(cost, update_s=layout.numel * rate[every],
                                update_overlap_s=layout.numel * rate[overlap]) for cost, layout in zip(costs, layouts)]


def median_profile(profiles: list[Profile]) -> Profile:
    """Per unit and per cost, the median over profiles of one model measured at different times.

    On a shared machine, measuring in rounds interleaved with real steps (and taking the median
    here) lets a burst of load slow profile and steps alike instead of skewing one of them."""
    if not profiles:
        raise ValueError("median_profile needs at least one profile")
    first = profiles[0]
    if any(len(p.units) != len(first.units) or p.tokens != first.tokens for p in profiles):
        raise ValueError("median_profile: profiles of different models or batch shapes cannot be combined")
    def median(i: int, f: str):
        values = [getattr(p.units[i], f) for p in profiles]
        return tuple(map(statistics.median, zip(*values))) if f.endswith("_at") else statistics.median(values)

    units = tuple(dataclasses.replace(u, **{f: median(i, f) for f in ("fwd_s", "fwd_grad_s", "bwd_s", "fwd_s_at",
                                                                        "fwd_grad_s_at", "bwd_s_at", "split_fwd_s",
                                                                        "split_bwd_s", "update_s", "update_overlap_s")})
                  for i, u in enumerate(first.units))
    return dataclasses.replace(first, units=units,
                               link_bytes_per_s=statistics.median(p.link_bytes_per_s for p in profiles),
                               pageable_link_bytes_per_s=statistics.median(p.pageable_link_bytes_per_s
                                                                           for p in profiles),
                               copy_compute_s_per_byte=statistics.median(p.copy_compute_s_per_byte for p in profiles))
