"""The drop-in trainer: a model in, ``step(batch)`` out; everything else is Horizon's business.

Why a trainer and not a wrapper module: the model's parameters move into the host store and the
device only ever sees units, so there is no ``model(x).backward()`` to wrap. ``Trainer`` checks
the model and the config before allocating anything, builds the store, the engine and the
optimizer, and runs one exact step per call: forward and backward through the engine, then
clipping and AdamW on the host buffers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from horizon.auto_plan import needs_plan, plan_for_batch
from horizon.batch import check_batch, check_extras
from horizon.callbacks import CallbackList
from horizon.checkpoint.manager import CheckpointError, Checkpointer
from horizon.checkpoint.ranks import RankGroup
from horizon.checkpoint.session import CheckpointSession
from horizon.checkpoint.train_state import check_json
from horizon.config import TrainConfig
from horizon.distributed.data_parallel import DataParallel, ShardedDataParallel
from horizon.distributed.world import init_world, is_multi_rank
from horizon.engine.engine import Engine
from horizon.estimate.preflight import applies as preflight_applies, preflight
from horizon.engine.transfer import Transfer, make_transfer
from horizon.evaluation import evaluate
from horizon.metrics import EvalMetrics, MemoryReport, StepMetrics
from horizon.models.adopt import check_trainable, init_fn, model_config_json
from horizon.models.hf import is_hf_model
from horizon.models.hf_weights import HFWeights
from horizon.models.units import UnitKind, find_units
from horizon.optim.adamw import decay_runs_by_name
from horizon.optim.updater import Updater
from horizon.state_dicts import master_state_dict, optimizer_state_dict
from horizon.store.grad_ring import GradRing
from horizon.store.host_store import HostStore
from horizon.store.layout import plan_layouts
from horizon.store.ssd import SSDTier
from horizon.store.ssd_placement import choose_ssd_units, streamed_units
from horizon.store.weight_stream import WeightStream
from horizon.trainer_checks import check_auto_budget, check_checkpoint_dir, refuse_sharded_choices

__all__ = ["Trainer"]


class _MicroBatches:
    """What the micro-batches of the update in progress have added up to."""

    def __init__(self) -> None:
        self.count, self.loss_sum, self.tokens, self.seconds = 0, 0.0, 0, 0.0

    def add(self, loss_sum: float, tokens: int) -> None:
        self.count += 1
        self.loss_sum += loss_sum
        self.tokens += tokens


def _ssd_units(config: TrainConfig, layouts) -> tuple[frozenset[int], frozenset[int]]:
    """(units whose optimizer state is on SSD, those of them whose weights are streamed too)."""
    if config.ssd is None:
        return frozenset(), frozenset()
    units = choose_ssd_units(config.ssd, layouts, config.resolved_compute_dtype,
                             accumulate=config.grad_accum_steps > 1, host_budget_bytes=config.host_memory_budget_bytes,
                             spill_grads=not config.eager_updates)
    return units, streamed_units(layouts, units, weights=config.ssd.weights)


class Trainer:
    """Trains ``model`` with its parameters in host RAM, streamed unit by unit through the device.

    ``callbacks``: objects with some of ``on_step_end(trainer, metrics)``, ``on_checkpoint(trainer,
    step, path)`` and ``on_eval(trainer, metrics)`` (horizon.Callback); ``TrainConfig(metrics_jsonl=...)``
    adds a horizon.JsonlMetrics, ``TrainConfig(tensorboard_dir=...)`` a horizon.TensorBoardMetrics.

    ``transfer`` replaces the copy engine, ``optimizer_delay_s`` (a callable returning seconds)
    delays every optimizer task and ``checkpoint_disk`` replaces the checkpoint writer's file
    system calls: tests inject races and faults through them; leave them None.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *,
                 callbacks: Sequence = (), transfer: Transfer | None = None, optimizer_delay_s=None,
                 checkpoint_disk=None) -> None:
        config = config if config is not None else TrainConfig()
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a horizon.TrainConfig, got {type(config).__name__}")
        self.config, self.model = config, model
        specs = find_units(model, config.units)
        check_trainable(model)
        refuse_sharded_choices(config)
        self.world = init_world(config.distributed, torch.device(config.device))
        """The data-parallel process group under torchrun (horizon.distributed); None for one process."""
        rank0 = self.world is None or self.world.rank == 0  # one metrics file and one TensorBoard run, not W
        self.callbacks = CallbackList(callbacks, metrics_jsonl=config.metrics_jsonl if rank0 else None,
                                      tensorboard_dir=config.tensorboard_dir if rank0 else None)
        self.data_parallel = None if self.world is None else (
            ShardedDataParallel if config.distributed.shard_optimizer_state else DataParallel)(self.world)
        sharded = isinstance(self.data_parallel, ShardedDataParallel)
        self.device = device = config.torch_device
        plan = config.resolved_plan
        plan.check_names([s.name for s in specs if s.kind is UnitKind.BLOCK])
        layouts = plan_layouts([s.name for s in specs], [s.module for s in specs])
        check_auto_budget(config, layouts)
        weights = HFWeights.open(model, config.hf_weights) if config.hf_weights else None  # checked before allocating
        if config.checkpoint is not None:
            check_checkpoint_dir(config, layouts, world_size=self.world.world_size if sharded else 1)
        if preflight_applies(config, is_multi_rank()):
            preflight(model, config)  # the estimate against this machine, before the store exists
        self._build_store(specs, layouts, weights, sharded=sharded)
        self.vocab_size = specs[0].module.num_embeddings
        self.takes_extras = config.units is None and is_hf_model(model)  # attention_mask, position_ids
        self.num_classes = specs[-1].module.head.out_features
        self.transfer = transfer or make_transfer(device, bandwidth_bytes_per_s=config.cpu_link_bytes_per_s,
                                                     duplex=config.cpu_link_duplex)
        self.collectives = self.data_parallel if sharded else None
        """ZeRO-3 (shard_optimizer_state under torchrun): what the engine gathers and reduce-scatters with."""
        self.engine = Engine(specs, self.store, plan=plan, device=device, transfer=self.transfer,
                             weights=self.weight_stream, grads=self.grad_ring, collectives=self.collectives)
        self._build_optimizer(model, checkpoint_disk, optimizer_delay_s, sharded=sharded)
        self.plan_solution = None
        """For plan="auto": the planner's ``Solution`` once the first step has measured and solved."""
        self.plan_profile = None
        """For plan="auto": the calibrated ``Profile`` the plan was solved from."""
        self.planned_shape: tuple[int, int] | None = None
        """For plan="auto": the (rows, tokens per row) the plan is for; a larger batch is planned for first."""
        self.global_step = 0
        """Updates made so far (a skipped step does not count)."""
        self.skipped_steps = 0
        """Updates skipped because a gradient was not finite."""
        self.tokens_seen = 0
        """Labels that counted in the loss of every update so far (skipped ones included)."""
        self._micro = _MicroBatches()
        self.checkpoints = CheckpointSession(self, self.checkpointer)
        self.device_base_bytes = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            # What others held before this trainer existed is not its peak.
            self.device_base_bytes = torch.cuda.memory_allocated(device)
        if config.resume:
            self.resume()

    def _build_store(self, specs, layouts, weights: HFWeights | None, *, sharded: bool) -> None:
        """The host store (and its SSD tier), its parameters initialised, loaded or broadcast."""
        config, device, dtype = self.config, self.device, self.config.resolved_compute_dtype
        ssd_units, streamed = _ssd_units(config, layouts)
        if ssd_units and (self.data_parallel is not None or weights is not None):
            raise ValueError("TrainConfig.ssd is not combined with torchrun data parallel or hf_weights yet: "
                             "drop ssd=..., or train in one process from an initialised model")
        pin, accumulate = device.type == "cuda" and config.pin_memory, config.grad_accum_steps > 1
        if self.data_parallel is not None:
            self.store = self.data_parallel.make_store(layouts, compute_dtype=dtype, pin=pin, accumulate=accumulate)
        else:
            self.store = HostStore(layouts, compute_dtype=dtype, pin=pin, accumulate=accumulate,
                                   ssd_units=ssd_units, streamed=streamed)
        self.ssd = SSDTier(config.ssd, layouts, ssd_units, compute_dtype=dtype, streamed=streamed,
                           spill_grads=not config.eager_updates) if ssd_units else None
        """The optimizer state of ``store.ssd_units`` (TrainConfig.ssd); None when every unit is in RAM."""
        self.weight_stream = WeightStream(self.ssd, dtype=dtype, num_buffers=config.ssd.weight_buffers,
                                          io_backend=config.ssd.io_backend) if streamed else None
        self.grad_ring = GradRing(layouts, streamed, dtype) if streamed else None
        """With SSDConfig(weights=True): the read-ahead window of streamed compute copies and their gradients' ring."""
        sources = {"ssd": self.ssd} if self.ssd is not None else {}
        if sharded:
            sources["weights"] = weights  # each rank reads its own slices
        self.store.adopt([s.module for s in specs], init_fn=None if weights else init_fn(self.model), **sources)
        if weights is not None and not sharded:
            weights.load()
            for unit in self.store.units:
                unit.refresh_compute()
        if self.data_parallel is not None:
            self.data_parallel.broadcast_store(self.store)

    def _build_optimizer(self, model: nn.Module, checkpoint_disk, optimizer_delay_s, *, sharded: bool) -> None:
        """The checkpointer (on the ranks that write) and the updater, which lets the checkpointer copy a
        unit's state before it changes."""
        config = self.config
        # Data parallel: the replicas are equal, rank 0 writes the checkpoints; sharded, every rank writes its shards.
        writes = config.checkpoint is not None and (self.world is None or self.world.rank == 0 or sharded)
        ranks = RankGroup(rank=self.world.rank, world_size=self.world.world_size, group=self.world.writer) \
            if writes and sharded else None
        self.checkpointer = None if not writes else Checkpointer(
            config.checkpoint, self.store, param_names=self.param_names(), model_config=model_config_json(model, check_json),
            disk=checkpoint_disk, ssd=self.ssd, ranks=ranks)
        decay_runs = decay_runs_by_name(self.store.units, self.param_names(), config.optimizer)
        if self.data_parallel is not None:
            decay_runs = self.data_parallel.local_decay_runs(self.store, decay_runs)
        self.updater = Updater(self.store, config.optimizer, decay_runs=decay_runs, delay_s=optimizer_delay_s,
                               before_update=self.checkpointer.before_update if self.checkpointer else None,
                               reducer=self.data_parallel, ssd=self.ssd, grads=self.grad_ring)
        if self.checkpointer is not None:
            self.checkpointer.optimizer_busy = self.updater.busy  # the copier yields to the optimizer

    def step(self, batch: Mapping[str, torch.Tensor]) -> StepMetrics:
        """Forward and backward on ``batch`` (input_ids and labels, [B, T]); with
        ``grad_accum_steps=k`` every k-th call also updates. Returns the metrics of the update so far.
        Under torchrun ``batch`` is this rank's share of the global batch, and the loss, tokens and
        update are those of the global batch (docs/distributed.md)."""
        input_ids, labels, num_valid = check_batch(batch, vocab_size=self.vocab_size, num_classes=self.num_classes)
        extras = check_extras(batch, input_ids.shape, accepted=self.takes_extras)
        dp = self.data_parallel
        if dp is not None:  # the loss of the concatenated global batch: divide by every rank's labels
            num_valid = dp.global_count(num_valid)
        if self.config.plan == "auto":
            shape = tuple(input_ids.shape) if dp is None else dp.global_max(tuple(input_ids.shape))
            if needs_plan(self, shape):
                plan_for_batch(self, input_ids, labels, extras, shape)
        start_s = time.perf_counter()
        cfg, micro = self.config, self._micro
        first, last = micro.count == 0, micro.count == cfg.grad_accum_steps - 1
        lr = cfg.lr_schedule.lr_at(self.global_step, cfg.optimizer.lr)
        eager_lr = lr if cfg.eager_updates else None

        # One micro-batch: the engine takes the gradient norm on the device as gradients are made.
        norm_on_device = not cfg.eager_updates and cfg.grad_accum_steps == 1 and dp is None

        def sent(unit: int, landed) -> None:
            self.updater.landed(unit, landed, first_micro=first, last_micro=last, eager_lr=eager_lr,
                                norm_on_device=norm_on_device)

        self.engine.set_training(self.model.training)
        if first:  # the weights may have changed since the last window (an update, a resume, a hand edit)
            self.engine.pool.mark_stale()
        # One micro-batch divides by its own label count; several sum token losses and divide at the update.
        divisor = num_valid if cfg.grad_accum_steps == 1 else 1
        loss_sum, norm = self.engine.forward_backward(input_ids.to(self.device), labels.to(self.device), divisor,
                                                      load_after=self.updater.pending, grads_sent=sent,
                                                      grad_norm=norm_on_device,
                                                      extras={k: v.to(self.device) for k, v in extras.items()})
        # One device-to-host sync per step, for both scalars.
        scalars = torch.stack([loss_sum, norm]) if norm is not None else loss_sum[None]
        scalars = scalars.cpu()
        micro.add(float(scalars[0]) if dp is None else dp.global_sum(float(scalars[0])), num_valid)
        device_norm = scalars[1] if norm is not None else None
        grad_norm, skipped = self._end_update(lr, micro.tokens, device_norm) if last else (None, False)
        if last:  # updates are on their way: a resident unit's buffer holds the old weights
            self.engine.pool.mark_stale()
        micro.seconds += time.perf_counter() - start_s
        errors = self.checkpoints.after_step(updated=last and not skipped)
        metrics = StepMetrics(step=self.global_step, loss=micro.loss_sum / micro.tokens, tokens=micro.tokens,
                              seconds=micro.seconds, grad_norm=grad_norm, lr=lr, skipped=skipped,
                              updated=last and not skipped, checkpoint_errors=errors)
        if last:
            self._micro = _MicroBatches()
            self.callbacks.run("on_step_end", self, metrics)
        self.checkpoints.announce()
        return metrics

    def evaluate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> EvalMetrics:
        """The token-weighted mean loss of the current weights over ``batches`` (batches as for
        ``step``), on the device, without gradients: no gradient, weight or optimizer state changes.
        Each unit's pending update is waited for before its weights are read; dropout is off.
        Under torchrun every rank passes its own batches and gets the loss over all of them."""
        return evaluate(self, batches)

    def _end_update(self, lr: float, tokens: int, device_norm: torch.Tensor | None) -> tuple[float | None, bool]:
        """After the last micro-batch: the deferred schedule's check, clip and updates; (norm, skipped)."""
        cfg, grad_norm, skipped = self.config, None, False
        if not cfg.eager_updates:
            outcome = self.updater.finish(lr=lr, divisor=tokens if cfg.grad_accum_steps > 1 else 1,
                                          clip_norm=cfg.grad_clip_norm, on_nonfinite=cfg.on_nonfinite,
                                          grad_norm=device_norm)
            grad_norm, skipped = outcome.grad_norm, outcome.skipped
        self.skipped_steps += skipped
        self.global_step += not skipped
        self.tokens_seen += tokens
        return grad_norm, skipped

    # -- checkpoints (horizon/checkpoint, docs/checkpoint.md) -------------------------------------

    @property
    def micro_batches_pending(self) -> bool:
        """True between the micro-batches of one update (grad_accum_steps > 1)."""
        return self._micro.count > 0

    def restore_counters(self, *, step: int, skipped_steps: int, tokens_seen: int) -> None:
        """Set the step counters (a resume) and drop any micro-batches of an unfinished update; the weights
        were loaded, so resident units are loaded again."""
        self.global_step, self.skipped_steps, self.tokens_seen = step, skipped_steps, tokens_seen
        self._micro = _MicroBatches()
        self.engine.pool.mark_stale()

    def param_names(self) -> list[list[str]]:
        """Per unit, the model's names of its own parameters in store order."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [[name_of[id(spec.module.get_parameter(slot.local_name))] for slot in unit.layout.own]
                for spec, unit in zip(self.engine.specs, self.store.units)]

    # -- checkpoints (horizon/checkpoint, docs/checkpoint.md) -------------------------------------

    def save(self, *, wait: bool = False) -> str | None:
        """Checkpoint the state after ``global_step`` updates; with ``wait``, block until it is durable
        and return its directory (CheckpointError if it failed). Needs TrainConfig(checkpoint=...).
        With DistributedConfig(shard_optimizer_state=True) every rank writes its shards: call it on every rank."""
        return self.checkpoints.save(wait=wait)

    def resume(self, dir=None) -> int | None:
        """Load the newest checkpoint in ``dir`` (default: checkpoint.dir) that validates; its step, or None
        when there is none. Corrupt checkpoints are moved aside; if all are, NoValidCheckpoint is raised
        unless CheckpointConfig(allow_fresh_start=True)."""
        return self.checkpoints.resume(dir)

    def register_data(self, loader) -> None:
        """Checkpoint ``loader``'s position: it needs ``state_dict()`` (JSON-serialisable) and
        ``load_state_dict(state)``; if this trainer resumed, the saved position is loaded into it now."""
        self.checkpoints.register_data(loader)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights with the keys and shapes of ``model.state_dict()`` (views, not copies;
        copies read from SSD for units whose master is there and whose compute copy is bf16; gathered
        copies for a sharded store computing in bf16: a collective then, call it on every rank).

        Waits for the updates still running, so the weights are those after ``global_step`` steps.
        """
        self.updater.wait_all()
        return master_state_dict(self)

    def export_hf(self, out: str, **kwargs) -> list[str]:
        """``horizon.checkpoint.export.export_hf(self, out, ...)``: a directory ``from_pretrained`` loads."""
        from horizon.checkpoint.export import export_hf

        return export_hf(self, out, **kwargs)

    def optimizer_state_dict(self) -> dict:
        """AdamW state per parameter name: step, exp_avg, exp_avg_sq (views into the store; copies read
        from SSD for the units there; with DistributedConfig(shard_optimizer_state=True), gathered copies:
        a collective, call it on every rank)."""
        self.updater.wait_all()
        return optimizer_state_dict(self)

    def memory(self) -> MemoryReport:
        by_role = dict(self.store.bytes_by_role)
        by_role["activations"] = self.engine.host_activations.nbytes
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.device_base_bytes
        else:
            peak = self.engine.ledger.peak_bytes
        if self.ssd is not None:
            by_role["ssd_io_pool"] = self.ssd.pool_bytes
        if self.weight_stream is not None:
            by_role["ssd_weight_window"] = self.weight_stream.pool_bytes
            by_role["ssd_grad_ring"] = self.grad_ring.pool_bytes
        return MemoryReport(device_peak_bytes=peak, host_bytes=sum(by_role.values()), host_bytes_by_role=by_role,
                            slot_bytes=self.engine.pool.slot_bytes, num_slots=self.engine.pool.num_slots,
                            resident_bytes=self.engine.pool.resident_bytes,
                            ssd_bytes_by_role=self.ssd.bytes_by_role if self.ssd is not None else {})

    def close(self) -> None:
        """Wait for the updates and the checkpoint in flight, take the final checkpoint, free everything."""
        error = None
        try:
            error = self.checkpoints.finish()
        finally:
            self.checkpoints.close()
            self.callbacks.close()
            self.updater.close()
            if self.weight_stream is not None:
                self.weight_stream.close()
            if self.ssd is not None:
                self.ssd.close()
            self.transfer.close()
            self.engine.close()
            self.store.close()
            if self.world is not None:
                self.world.close()
        if error is not None:
            raise CheckpointError(f"the final checkpoint failed: {error}")

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
