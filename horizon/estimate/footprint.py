"""What a training run will take, in bytes, from the model's shapes alone.

Why: people rent machines for a run, and the only way most offload runtimes let them learn what
it needs is to start it and run out of memory. Horizon's allocations are exact and known before
anything is allocated: the host store is ``store_bytes_by_role`` (the same function the store
sizes itself with), the host activation buffers are one hidden state per RECOMPUTE block, and
the device holds what the engine's ledger records, replayed in ``device_peak``. The model may
live on the meta device, so a 70B estimate costs nothing. KEEP blocks need what their autograd
graph saves; that is measured by running one block of each structure under ``FakeTensorMode``
(shapes and dtypes only, nothing allocated). That is exact for horizon's decoder; Hugging Face
attention sees the fake tensors as tracing and takes its traceable path (an explicit causal mask,
repeated key/value heads), so for HF KEEP blocks the figure is a slight upper bound.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from horizon.config import TrainConfig
from horizon.engine.plan import ActivationPolicy
from horizon.engine.slots import _structure_key, shared_slot_numel
from horizon.estimate.device_peak import replay_device_peak
from horizon.models.units import UnitKind, UnitSpec, find_units
from horizon.store.host_store import _PCIE_ROLES
from horizon.store.layout import plan_layouts
from horizon.store.ssd_layout import ssd_bytes_by_role, unit_extents
from horizon.store.ssd_placement import choose_ssd_units, ram_bytes_by_role, streamed_units

__all__ = ["MemoryEstimate", "estimate_memory"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    num_params: int
    """Parameters of the model (a tied weight counted once)."""
    host_bytes_by_role: dict[str, int]
    """The host store by role (master, exp_avg, exp_avg_sq, grad, compute, grad_accum) plus
    ``activations``: the host buffers for RECOMPUTE blocks' inputs, and with an SSD tier its buffers
    (``ssd_io_pool``; with streamed weights ``ssd_weight_window`` and ``ssd_grad_ring``)."""
    pinned_bytes: int
    """Of the host bytes, those page-locked for DMA (compute copy, gradients, activations; CUDA only)."""
    device_peak_bytes: int
    """The engine's device accounting at its peak: slots, hidden states, restored inputs, kept
    graphs, gradients in flight. On CUDA the allocator adds the workspace of one unit's compute."""
    device_bytes_at_peak: dict[str, int]
    """``device_peak_bytes`` split by what was held at that moment."""
    slot_bytes: int
    """One shared device slot: the largest unit that is not resident (own plus tied parameters) in the
    compute dtype."""
    num_slots: int
    ssd_bytes_by_role: dict[str, int] = dataclasses.field(default_factory=dict)
    """Bytes on SSD by role (master, exp_avg, exp_avg_sq; compute and grad with streamed weights):
    the size of the SSD tier's file, exactly; empty without TrainConfig.ssd."""
    ssd_units: tuple[int, ...] = ()
    """The units placed on SSD (SSDConfig.units resolved; "auto" against host_memory_budget_bytes)."""
    plan: str
    """The plan assumed, in words."""

    @property
    def host_bytes(self) -> int:
        return sum(self.host_bytes_by_role.values())

    @property
    def ssd_bytes(self) -> int:
        return sum(self.ssd_bytes_by_role.values())

    @property
    def ram_bytes_on_cpu(self) -> int:
        """With ``device="cpu"`` the "device" is RAM too: host plus device peak."""
        return self.host_bytes + self.device_peak_bytes

    def derivation(self) -> dict[str, str]:
        """How each number was computed, for the ``horizon estimate`` report."""
        return {
            "host store": "per unit and role, numel x dtype size, each region rounded up to a 4096-byte page "
                          "(horizon.store.host_store.store_bytes_by_role, the function the store allocates by)",
            "activations": "one hidden state (batch x seq_len x hidden x dtype size) per RECOMPUTE block, "
                           "the block's input offloaded to host",
            "pinned": "compute copy + gradient buffers + activations, when the device is CUDA and pinning is on",
            "device peak": "a replay of the engine's ledger over one step's unit order "
                           "(horizon.estimate.device_peak); KEEP graphs measured under FakeTensorMode",
            "ssd buffers": "SSDConfig.io_buffers x the largest SSD unit's extent; with weights=True also "
                           "weight_buffers x its compute copy and 3 x its gradient "
                           "(horizon.store.ssd_placement.ram_bytes_by_role)",
            "ssd": "per SSD unit, master + exp_avg + exp_avg_sq in fp32 (+ the compute copy, and the gradient "
                   "when clipping spills it, with SSDConfig(weights=True)), each padded to 4096 bytes "
                   "(horizon.store.ssd_layout, the layout of the tier's file)" if self.ssd_bytes_by_role
                   else "no SSD tier in this plan",
        }


def _policies(specs: list[UnitSpec], config: TrainConfig) -> list[ActivationPolicy | None]:
    plan = config.resolved_plan
    plan.check_names([s.name for s in specs if s.kind is UnitKind.BLOCK])
    return [plan.policy(s.name) if s.kind is UnitKind.BLOCK else None for s in specs]


def _kept_bytes(spec: UnitSpec, hidden_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a KEEP block's graph saves (unique storages, the weights excluded), as ``KeptGraph`` counts them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta")) for p in spec.module.parameters()}
    module = copy.deepcopy(spec.module, memo)  # weights on meta, whatever device the model is on
    with FakeTensorMode():
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
        weights = {p.untyped_storage()._cdata for p in module.parameters()}
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            storage = t.untyped_storage()
            if storage._cdata not in weights and storage._cdata not in seen:
                seen.add(storage._cdata)
                total += storage.nbytes()
            return t

        x = torch.empty(hidden_shape, dtype=dtype).requires_grad_()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            spec.call(module, x)
    return total


def _ssd_units(config: TrainConfig, layouts) -> frozenset[int]:
    """The units TrainConfig.ssd places on SSD; with "auto" and a budget even all of them miss, all of them
    (the estimate then shows the shortfall instead of failing)."""
    if config.ssd is None:
        return frozenset()
    kwargs = dict(accumulate=config.grad_accum_steps > 1, spill_grads=not config.eager_updates)
    try:
        return choose_ssd_units(config.ssd, layouts, config.resolved_compute_dtype,
                                host_budget_bytes=config.host_memory_budget_bytes, **kwargs)
    except ValueError:
        if config.ssd.units != "auto":
            return choose_ssd_units(config.ssd, layouts, config.resolved_compute_dtype, host_budget_bytes=None,
                                    **kwargs)
        return frozenset(range(len(layouts)))


def _check_shape(batch_size: int, seq_len: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def estimate_memory(model: nn.Module, config: TrainConfig | None = None, *, batch_size: int,
                    seq_len: int) -> MemoryEstimate:
    """Host, pinned and device bytes of training ``model`` under ``config`` on batches of
    ``batch_size`` x ``seq_len`` tokens. Build the model on ``torch.device("meta")``: nothing is allocated."""
    _check_shape(batch_size, seq_len)
    config = config if config is not None else TrainConfig()
    specs = find_units(model, config.units)
    layouts = plan_layouts([s.name for s in specs], [s.module for s in specs])
    policies = _policies(specs, config)
    dtype, plan = config.resolved_compute_dtype, config.resolved_plan
    itemsize = dtype.itemsize
    hidden_shape = (batch_size, seq_len, specs[0].module.embedding_dim)
    hidden_bytes = batch_size * seq_len * hidden_shape[-1] * itemsize

    accumulate = config.grad_accum_steps > 1
    ssd_units = _ssd_units(config, layouts)
    ssd, spill = config.ssd, not config.eager_updates
    by_role = ram_bytes_by_role(layouts, dtype, accumulate=accumulate, ssd_units=ssd_units,
                                io_buffers=ssd.io_buffers if ssd else 0, weights=bool(ssd and ssd.weights),
                                weight_buffers=ssd.weight_buffers if ssd else 0, spill_grads=spill)
    if not ssd_units:
        del by_role["ssd_io_pool"]
    streamed = streamed_units(layouts, ssd_units, weights=bool(ssd and ssd.weights))
    on_ssd = ssd_bytes_by_role([unit_extents(layouts[u], compute_dtype=dtype, weights=u in streamed, spill_grad=spill)
                                for u in sorted(ssd_units)])
    num_recompute = sum(p is ActivationPolicy.RECOMPUTE for p in policies)
    by_role["activations"] = num_recompute * hidden_bytes
    pinned = 0
    if torch.device(config.device).type == "cuda" and config.pin_memory:
        pinned = sum(by_role[r.value] for r in _PCIE_ROLES) + by_role["activations"]

    kept_by_structure: dict[tuple, int] = {}
    kept = [0] * len(specs)
    for u, (spec, policy) in enumerate(zip(specs, policies)):
        if policy is ActivationPolicy.KEEP:
            key = _structure_key(spec.module, layouts[u])
            if key not in kept_by_structure:
                kept_by_structure[key] = _kept_bytes(spec, hidden_shape, dtype)
            kept[u] = kept_by_structure[key]
    resident = plan.resident_units([s.name for s in specs])
    peak = replay_device_peak(layouts, policies, num_slots=plan.num_slots, hidden_bytes=hidden_bytes,
                              kept_bytes=kept, itemsize=itemsize, resident=resident)
    counts = {p: sum(q is p for q in policies) for p in ActivationPolicy}
    words = ", ".join(f"{n} {p.value}" for p, n in counts.items() if n)
    return MemoryEstimate(
        num_params=sum(layout.numel for layout in layouts), host_bytes_by_role=by_role, pinned_bytes=pinned,
        device_peak_bytes=peak.peak_bytes, device_bytes_at_peak=peak.bytes_by_part_at_peak,
        slot_bytes=shared_slot_numel(layouts, resident) * itemsize, num_slots=plan.num_slots,
        ssd_bytes_by_role=on_ssd, ssd_units=tuple(sorted(ssd_units)),
        plan=f"{plan.num_slots} slots{_resident_words(plan)}; blocks: {words}; {dtype} compute on {config.device}")


def _resident_words(plan) -> str:
    return f" and {len(plan.resident)} resident units" if plan.resident else ""
