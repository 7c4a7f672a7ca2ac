"""The trainer's configuration: one keyword-only dataclass, validated when it is built."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import torch

from horizon.checkpoint.config import CheckpointConfig
from horizon.config_warnings import warn_ineffective_settings
from horizon.distributed.config import DistributedConfig
from horizon.engine.plan import ActivationPolicy, Plan
from horizon.models.units import Units
from horizon.optim.adamw import AdamW
from horizon.optim.schedule import ConstantLR, Schedule, WarmupCosine, WarmupLinear
from horizon.planner.cache import default_cache_dir
from horizon.store.ssd_config import SSDConfig

__all__ = ["TrainConfig"]

_PLAN_WORDS = {p.value for p in ActivationPolicy}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    device: str = "cpu"
    """Where units compute: "cpu" or "cuda" / "cuda:N". The host store is always in RAM."""
    optimizer: AdamW = dataclasses.field(default_factory=AdamW)
    """The optimizer and its hyper-parameters."""
    lr_schedule: Schedule = dataclasses.field(default_factory=ConstantLR)
    """Learning rate per update: ConstantLR(), WarmupCosine(...), WarmupLinear(...) (horizon.optim)."""
    grad_clip_norm: float | None = None
    """Clip the global gradient 2-norm to this value (exact, as clip_grad_norm_); None = off."""
    grad_accum_steps: int = 1
    """Micro-batches per update: that many ``step`` calls make one update, with the loss a mean
    over every non-ignored label of all of them (as one batch of their concatenation)."""
    on_nonfinite: str = "skip"
    """A gradient with inf/NaN: "skip" the update (counted in Trainer.skipped_steps), "raise"
    NonFiniteGradientError, or "ignore" (no check; lets updates start while backward runs)."""
    plan: str | Plan = "recompute"
    """"recompute", "keep" or "swap" for every block; "auto" (the planner picks per block under
    ``device_memory_budget_bytes`` at the first step); a plan JSON path; or a horizon.Plan."""
    device_memory_budget_bytes: int | None = None
    """Device bytes the engine may hold (slots, activations, gradients in flight); needed by plan="auto"."""
    profile_cache_dir: str | os.PathLike | None = dataclasses.field(default_factory=default_cache_dir)
    """Where plan="auto" keeps the profiles it measures, one per model shape, batch shape, link and machine,
    and loads them from at the next start (horizon/planner/cache.py); None = measure every time."""
    compute_dtype: torch.dtype | None = None
    """dtype of the weights and activations on the device (float32 or bfloat16); None = fp32 on CPU, bf16 on CUDA."""
    units: Units | None = None
    """Name the model's embedding, blocks, norm and head by hand; None = detect them."""
    pin_memory: bool = True
    """Page-lock the buffers that cross PCIe (CUDA only; falls back with a warning if short)."""
    cpu_link_bytes_per_s: float | None = None
    """device="cpu" only: throttle the transfer thread to this bandwidth (to model a PCIe link)."""
    cpu_link_duplex: bool = False
    """device="cpu" only: copies to and from the "device" run at once on two threads, each direction at
    cpu_link_bytes_per_s, as over PCIe with a GPU's two copy engines; False = one queue for both."""
    checkpoint: CheckpointConfig | None = None
    """Asynchronous checkpoints (horizon.CheckpointConfig); None = none."""
    resume: bool = False
    """Start from the newest checkpoint in checkpoint.dir that validates, if there is one."""
    hf_weights: str | None = None
    """A directory of Hugging Face safetensors (model.safetensors, or shards and their index) to load
    every parameter from instead of initialising; build the model with
    horizon.models.hf_weights.empty_hf_model(dir) so that it never exists outside the host store."""
    metrics_jsonl: str | None = None
    """Append one JSON line of StepMetrics per update to this file (path); None = off."""
    tensorboard_dir: str | None = None
    """Write the step, evaluation and memory scalars for TensorBoard to this folder (path; needs the
    ``tensorboard`` package); None = off."""
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    """Under torchrun: the collective timeout and optimizer-state sharding (horizon.DistributedConfig)."""
    ssd: SSDConfig | None = None
    """Keep some units' optimizer state (master, m, v) on SSD (horizon.SSDConfig); None = all in RAM."""
    host_memory_budget_bytes: int | None = None
    """Host RAM the store and the SSD tier's I/O pool may take; needed by SSDConfig(units="auto")."""
    preflight: bool = True
    """Before allocating, check the estimate (horizon.estimate) against this machine's available RAM,
    cgroup limit and locked-memory limit, and raise a ValueError with the shortfall (docs/observability.md)."""

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"TrainConfig.device={self.device!r} is not a device: use 'cpu' or 'cuda'") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"TrainConfig.device={self.device!r}: horizon runs on 'cpu' or 'cuda'")
        if not isinstance(self.optimizer, AdamW):
            raise ValueError(f"TrainConfig.optimizer must be horizon.AdamW(...), got {type(self.optimizer).__name__}")
        if self.grad_clip_norm is not None and not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm > 0):
            raise ValueError(f"TrainConfig.grad_clip_norm must be a positive number or None, got {self.grad_clip_norm}")
        if not isinstance(self.lr_schedule, (ConstantLR, WarmupCosine, WarmupLinear)):
            raise ValueError(f"TrainConfig.lr_schedule must be ConstantLR(), WarmupCosine(...) or WarmupLinear(...), "
                             f"got {self.lr_schedule!r}")
        if isinstance(self.grad_accum_steps, bool) or not isinstance(self.grad_accum_steps, int) \
                or self.grad_accum_steps < 1:
            raise ValueError(f"TrainConfig.grad_accum_steps must be an int >= 1, got {self.grad_accum_steps!r}")
        if self.on_nonfinite not in ("skip", "raise", "ignore"):
            raise ValueError(f"TrainConfig.on_nonfinite must be 'skip', 'raise' or 'ignore', got {self.on_nonfinite!r}")
        self._check_plan()
        if not isinstance(self.plan, (str, Plan)):
            raise ValueError(f"TrainConfig.plan must be a string or a horizon.Plan, got {type(self.plan).__name__}")
        if self.compute_dtype == torch.float16:
            raise ValueError("TrainConfig.compute_dtype=float16 would need loss scaling, which horizon does not do; "
                             "use torch.bfloat16")
        if self.compute_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"TrainConfig.compute_dtype must be float32 or bfloat16, got {self.compute_dtype}")
        if self.cpu_link_bytes_per_s is not None:
            if device.type != "cpu":
                raise ValueError("TrainConfig.cpu_link_bytes_per_s throttles the CPU transfer thread; "
                                 "it has no meaning on CUDA")
            if not self.cpu_link_bytes_per_s > 0:
                raise ValueError(f"TrainConfig.cpu_link_bytes_per_s must be positive, got {self.cpu_link_bytes_per_s}")
        if not isinstance(self.cpu_link_duplex, bool):
            raise ValueError(f"TrainConfig.cpu_link_duplex must be True or False, got {self.cpu_link_duplex!r}")
        if self.cpu_link_duplex and device.type != "cpu":
            raise ValueError("TrainConfig.cpu_link_duplex models two copy engines on device='cpu'; "
                             "CUDA copies are duplex already: leave it False")
        if self.checkpoint is not None and not isinstance(self.checkpoint, CheckpointConfig):
            raise ValueError(f"TrainConfig.checkpoint must be a horizon.CheckpointConfig or None, "
                             f"got {type(self.checkpoint).__name__}")
        if not isinstance(self.distributed, DistributedConfig):
            raise ValueError(f"TrainConfig.distributed must be a horizon.DistributedConfig, "
                             f"got {type(self.distributed).__name__}")
        if self.resume and self.checkpoint is None:
            raise ValueError("TrainConfig.resume=True needs checkpoint=horizon.CheckpointConfig(dir=...) "
                             "to know where to resume from")
        if self.hf_weights is not None and not os.path.isdir(self.hf_weights):
            raise ValueError(f"TrainConfig.hf_weights={self.hf_weights!r} is not a directory: pass the folder "
                             "save_pretrained or horizon.export_hf wrote")
        if self.metrics_jsonl is not None and os.path.isdir(self.metrics_jsonl):
            raise ValueError(f"TrainConfig.metrics_jsonl={self.metrics_jsonl!r} is a directory: name a file")
        if not isinstance(self.preflight, bool):
            raise ValueError(f"TrainConfig.preflight must be True or False, got {self.preflight!r}")
        self._check_tensorboard()
        self._check_ssd()
        warn_ineffective_settings(self, stacklevel=3)  # at the caller of TrainConfig(...)

    def _check_tensorboard(self) -> None:
        if self.tensorboard_dir is None:
            return
        if os.path.isfile(self.tensorboard_dir):
            raise ValueError(f"TrainConfig.tensorboard_dir={self.tensorboard_dir!r} is a file: name a folder")
        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("TrainConfig.tensorboard_dir needs the tensorboard package: pip install tensorboard "
                             "(or drop tensorboard_dir; metrics_jsonl needs nothing)")

    def _check_ssd(self) -> None:
        budget = self.host_memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"TrainConfig.host_memory_budget_bytes must be a positive int of bytes, got {budget!r}")
        if self.ssd is None:
            return
        if not isinstance(self.ssd, SSDConfig):
            raise ValueError(f"TrainConfig.ssd must be a horizon.SSDConfig or None, got {type(self.ssd).__name__}")
        if self.ssd.units == "auto" and budget is None:
            raise ValueError('SSDConfig(units="auto") needs TrainConfig(host_memory_budget_bytes=...): the RAM '
                             "the store may take decides how many units go to SSD")
        if self.ssd.weights and self.grad_accum_steps > 1:
            raise ValueError("SSDConfig(weights=True) is not combined with grad_accum_steps > 1 yet (the fp32 "
                             "gradient sums would stay in RAM): use grad_accum_steps=1 or SSDConfig(weights=False)")
        if self.ssd.weights and self.plan == "auto":
            raise ValueError('SSDConfig(weights=True) is not combined with plan="auto" yet (the planner measures '
                             'units from compute copies in RAM): give the plan ("recompute", a file or a horizon.Plan)')

    def _check_plan(self) -> None:
        cache_dir = self.profile_cache_dir
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise ValueError(f"TrainConfig.profile_cache_dir must be a folder path or None, got {cache_dir!r}")
        if cache_dir is not None and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise ValueError(f"TrainConfig.profile_cache_dir={cache_dir!r} is a file, not a folder: name a folder "
                             "(it is created at the first plan='auto' step) or None to measure every time")
        budget = self.device_memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"TrainConfig.device_memory_budget_bytes must be a positive int of bytes, got {budget!r}")
        if self.plan == "auto" and budget is None:
            raise ValueError('TrainConfig(plan="auto") needs device_memory_budget_bytes=... (the device bytes '
                             "the planner may use)")
        if isinstance(self.plan, str) and self.plan.endswith(".json"):
            if not os.path.isfile(self.plan):
                raise ValueError(f"TrainConfig.plan={self.plan!r}: no such plan file (write one with "
                                 "horizon.planner.apply.save_plan, or use plan='auto')")
        elif isinstance(self.plan, str) and self.plan not in _PLAN_WORDS | {"auto"}:
            raise ValueError(f"TrainConfig.plan={self.plan!r}: use one of {sorted(_PLAN_WORDS | {'auto'})}, "
                             "a plan .json path or a horizon.Plan")

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("TrainConfig.device is 'cuda' but CUDA is not available here; use device='cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32

    @property
    def eager_updates(self) -> bool:
        """Whether a unit may be updated as soon as its gradient lands (nothing global to wait for)."""
        return self.grad_clip_norm is None and self.grad_accum_steps == 1 and self.on_nonfinite == "ignore"

    @property
    def update_schedule(self) -> str:
        """How the planner's simulator meets the optimizer (``Profile.update_schedule``, with
        ``Profile.accumulation = grad_accum_steps``): "eager" or "deferred", as the updater runs them."""
        return "eager" if self.eager_updates else "deferred"

    @property
    def resolved_plan(self) -> Plan:
        """The plan to start with: "auto" starts as all-RECOMPUTE until the planner has measured a step."""
        if isinstance(self.plan, Plan):
            return self.plan
        if self.plan.endswith(".json"):
            from horizon.planner.apply import load_plan

            return load_plan(self.plan)
        return Plan.uniform("recompute" if self.plan == "auto" else self.plan)
