"""The drop-in trainer: a model in, ``step(batch)`` out; everything else is Horizon's business.

Why a trainer and not a wrapper module: the model's parameters move into the host store and the
device only ever sees units, so there is no ``model(x).backward()`` to wrap. ``Trainer`` checks
the model and the config before allocating anything, builds the store, the engine and the
optimizer, and runs one exact step per call: forward and backward through the engine, then
clipping and AdamW on the host buffers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from horizon.batch import check_batch
from horizon.config import TrainConfig
from horizon.engine.engine import Engine
from horizon.engine.transfer import Transfer, make_transfer
from horizon.metrics import MemoryReport, StepMetrics
from horizon.models.units import UnitKind, find_units
from horizon.optim.clip import clip_scale
from horizon.optim.updater import Updater
from horizon.store.host_store import HostStore
from horizon.store.layout import plan_layouts

__all__ = ["Trainer"]


def _check_model(model: nn.Module) -> None:
    problems = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            problems.append(f"{name} is frozen (requires_grad=False); frozen parameters are not supported yet")
        elif not p.is_floating_point():
            problems.append(f"{name} has dtype {p.dtype}; parameters must be floating point")
        elif p.device.type not in ("cpu", "meta"):
            problems.append(f"{name} is on {p.device}; build the model on 'cpu' or 'meta', horizon places it")
    for name, b in model.named_buffers():
        if b.is_meta:
            problems.append(f"buffer {name} is on the meta device; horizon materialises parameters only")
    if problems:
        raise ValueError("unsupported model: " + "; ".join(problems[:5]) + (" …" if len(problems) > 5 else ""))


def _init_fn(model: nn.Module):
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        return init_weights

    def reset_all() -> None:
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    return reset_all


class Trainer:
    """Trains ``model`` with its parameters in host RAM, streamed unit by unit through the device.

    ``transfer`` and ``updater`` replace the copy engine and the optimizer worker (tests inject
    delays through them; leave them None).
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *,
                 transfer: Transfer | None = None, optimizer_delay_s=None) -> None:
        config = config if config is not None else TrainConfig()
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a horizon.TrainConfig, got {type(config).__name__}")
        self.config, self.model = config, model
        device = config.torch_device
        specs = find_units(model, config.units)
        _check_model(model)
        plan = config.resolved_plan
        plan.check_names([s.name for s in specs if s.kind is UnitKind.BLOCK])
        layouts = plan_layouts([s.name for s in specs], [s.module for s in specs])
        self.store = HostStore(layouts, compute_dtype=config.resolved_compute_dtype,
                               pin=device.type == "cuda" and config.pin_memory)
        self.store.adopt([s.module for s in specs], init_fn=_init_fn(model))
        self.vocab_size = specs[0].module.num_embeddings
        self.num_classes = specs[-1].module.head.out_features
        self.transfer = transfer or make_transfer(device, bandwidth_bytes_per_s=config.cpu_link_bytes_per_s)
        self.engine = Engine(specs, self.store, plan=plan, device=device, transfer=self.transfer)
        self.updater = Updater(self.store, config.optimizer, delay_s=optimizer_delay_s)
        self.device = device
        self.global_step = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def step(self, batch: Mapping[str, torch.Tensor]) -> StepMetrics:
        """One training step on ``batch`` (input_ids and labels, [B, T]); returns its metrics."""
        input_ids, labels, num_valid = check_batch(batch, vocab_size=self.vocab_size, num_classes=self.num_classes)
        start_s = time.perf_counter()
        self.engine.set_training(self.model.training)
        lr = self.config.optimizer.lr
        clipping = self.config.grad_clip_norm is not None
        # Without clipping a unit is updated as soon as its gradient lands; with clipping only its
        # norm is taken then, and the updates follow once the global norm is known.
        landed = self.updater.submit_norm if clipping else (lambda unit: self.updater.submit(unit, lr=lr))
        loss_sum = self.engine.forward_backward(input_ids.to(self.device), labels.to(self.device), num_valid,
                                                load_after=self.updater.pending, grads_landed=landed)
        grad_norm = self._clip_and_update(lr) if clipping else None
        loss = float(loss_sum / num_valid)
        self.global_step += 1
        return StepMetrics(step=self.global_step, loss=loss, tokens=num_valid,
                           seconds=time.perf_counter() - start_s, grad_norm=grad_norm)

    def _clip_and_update(self, lr: float) -> float:
        """Submit every unit's update, in forward order, scaled by the global-norm clip factor."""
        total = self.updater.total_norm()
        scale = clip_scale(total, self.config.grad_clip_norm)
        for unit in range(len(self.store.units)):
            self.updater.submit(unit, lr=lr, grad_scale=scale)
        return float(total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights with the keys and shapes of ``model.state_dict()`` (views, not copies).

        Waits for the updates still running, so the weights are those after ``global_step`` steps.
        """
        self.updater.wait_all()
        return self.model.state_dict()

    def optimizer_state_dict(self) -> dict:
        """AdamW state per parameter name: step, exp_avg, exp_avg_sq (views into the store)."""
        self.updater.wait_all()
        name_of = {p.data_ptr(): n for n, p in self.model.named_parameters()}
        state = {}
        for unit, step in zip(self.store.units, self.updater.steps):
            m, v = unit.views(unit.exp_avg), unit.views(unit.exp_avg_sq)
            for local_name, master in unit.views(unit.master).items():
                state[name_of[master.data_ptr()]] = {"step": step.clone(), "exp_avg": m[local_name],
                                                     "exp_avg_sq": v[local_name]}
        opt = self.config.optimizer
        return {"state": state, "param_groups": [{"lr": opt.lr, "betas": opt.betas, "eps": opt.eps,
                                                  "weight_decay": opt.weight_decay}]}

    def memory(self) -> MemoryReport:
        by_role = dict(self.store.bytes_by_role)
        by_role["activations"] = self.engine.host_activations.nbytes
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self.engine.ledger.peak_bytes
        return MemoryReport(device_peak_bytes=peak, host_bytes=sum(by_role.values()), host_bytes_by_role=by_role,
                            slot_bytes=self.engine.pool.slot_bytes, num_slots=self.engine.pool.num_slots)

    def close(self) -> None:
        self.updater.close()
        self.transfer.close()
        self.engine.close()
        self.store.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
