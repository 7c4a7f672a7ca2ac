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
from horizon.optim.updater import Updater
from horizon.store.host_store import HostStore
from horizon.store.layout import plan_layouts

__all__ = ["Trainer"]


class _MicroBatches:
    """What the micro-batches of the update in progress have added up to."""

    def __init__(self) -> None:
        self.count, self.loss_sum, self.tokens, self.seconds = 0, 0.0, 0, 0.0

    def add(self, loss_sum: float, tokens: int) -> None:
        self.count += 1
        self.loss_sum += loss_sum
        self.tokens += tokens


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

    ``transfer`` replaces the copy engine and ``optimizer_delay_s`` (a callable returning seconds)
    delays every optimizer task: tests inject races through them; leave both None.
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
                               pin=device.type == "cuda" and config.pin_memory,
                               accumulate=config.grad_accum_steps > 1)
        self.store.adopt([s.module for s in specs], init_fn=_init_fn(model))
        self.vocab_size = specs[0].module.num_embeddings
        self.num_classes = specs[-1].module.head.out_features
        self.transfer = transfer or make_transfer(device, bandwidth_bytes_per_s=config.cpu_link_bytes_per_s)
        self.engine = Engine(specs, self.store, plan=plan, device=device, transfer=self.transfer)
        self.updater = Updater(self.store, config.optimizer, decay_runs=self._decay_runs(),
                               delay_s=optimizer_delay_s)
        self.device = device
        self.plan_solution = None
        """For plan="auto": the planner's ``Solution`` once the first step has measured and solved."""
        if config.plan == "auto" and config.device_memory_budget_bytes < 2 * self.engine.pool.slot_bytes:
            raise ValueError(f"device_memory_budget_bytes={config.device_memory_budget_bytes:,} cannot hold two "
                             f"weight slots of {self.engine.pool.slot_bytes:,} bytes; raise it")
        self.global_step = 0
        """Updates made so far (a skipped step does not count)."""
        self.skipped_steps = 0
        """Updates skipped because a gradient was not finite."""
        self._micro = _MicroBatches()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _decay_runs(self) -> list[list[tuple[int, int, float]]]:
        """Per unit, contiguous element ranges with their weight decay (exclusions by name)."""
        opt = self.config.optimizer
        name_of = {p.data_ptr(): n for n, p in self.model.named_parameters()}
        runs = []
        for unit in self.store.units:
            unit_runs: list[tuple[int, int, float]] = []
            for slot in unit.layout.own:
                name = name_of[unit.master[slot.offset:].data_ptr()]
                decay = opt.weight_decay if opt.decays(name) else 0.0
                if unit_runs and unit_runs[-1][1] == slot.offset and unit_runs[-1][2] == decay:
                    unit_runs[-1] = (unit_runs[-1][0], slot.offset + slot.numel, decay)
                else:
                    unit_runs.append((slot.offset, slot.offset + slot.numel, decay))
            runs.append(unit_runs)
        return runs

    def step(self, batch: Mapping[str, torch.Tensor]) -> StepMetrics:
        """Forward and backward on ``batch`` (input_ids and labels, [B, T]); with
        ``grad_accum_steps=k`` every k-th call also updates. Returns the metrics of the update so far."""
        input_ids, labels, num_valid = check_batch(batch, vocab_size=self.vocab_size, num_classes=self.num_classes)
        if self.config.plan == "auto" and self.plan_solution is None:
            self._plan_auto(*input_ids.shape)
        start_s = time.perf_counter()
        cfg, micro = self.config, self._micro
        first, last = micro.count == 0, micro.count == cfg.grad_accum_steps - 1
        lr = cfg.lr_schedule.lr_at(self.global_step, cfg.optimizer.lr)
        eager_lr = lr if cfg.eager_updates else None

        def landed(unit: int) -> None:
            self.updater.landed(unit, first_micro=first, last_micro=last, eager_lr=eager_lr)

        self.engine.set_training(self.model.training)
        # One micro-batch divides by its own label count; several sum token losses and divide at the update.
        divisor = num_valid if cfg.grad_accum_steps == 1 else 1
        loss_sum = self.engine.forward_backward(input_ids.to(self.device), labels.to(self.device), divisor,
                                                load_after=self.updater.pending, grads_landed=landed)
        micro.add(float(loss_sum), num_valid)
        grad_norm, skipped = self._end_update(lr, micro.tokens) if last else (None, False)
        micro.seconds += time.perf_counter() - start_s
        metrics = StepMetrics(step=self.global_step, loss=micro.loss_sum / micro.tokens, tokens=micro.tokens,
                              seconds=micro.seconds, grad_norm=grad_norm, lr=lr, skipped=skipped,
                              updated=last and not skipped)
        if last:
            self._micro = _MicroBatches()
        return metrics

    def _plan_auto(self, batch_size: int, seq_len: int) -> None:
        """Measure the units at this batch shape, solve the plan, and rebuild the engine to execute it."""
        from horizon.planner.apply import auto_plan

        specs = self.engine.specs
        plan, _, self.plan_solution = auto_plan(specs, self.store, device=self.device, transfer=self.transfer,
                                                batch_size=batch_size, seq_len=seq_len,
                                                budget_bytes=self.config.device_memory_budget_bytes)
        self.engine.close()
        self.engine = Engine(specs, self.store, plan=plan, device=self.device, transfer=self.transfer)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _end_update(self, lr: float, tokens: int) -> tuple[float | None, bool]:
        """After the last micro-batch: the deferred schedule's check, clip and updates; (norm, skipped)."""
        cfg, grad_norm, skipped = self.config, None, False
        if not cfg.eager_updates:
            outcome = self.updater.finish(lr=lr, divisor=tokens if cfg.grad_accum_steps > 1 else 1,
                                          clip_norm=cfg.grad_clip_norm, on_nonfinite=cfg.on_nonfinite)
            grad_norm, skipped = outcome.grad_norm, outcome.skipped
        self.skipped_steps += skipped
        self.global_step += not skipped
        return grad_norm, skipped

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
