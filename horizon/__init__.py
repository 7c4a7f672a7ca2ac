"""Horizon: train models larger than device memory, with the host store as their home.

The public surface: ``Trainer`` and its ``TrainConfig``, the optimizer ``AdamW``, ``Plan`` and
``ActivationPolicy`` for activation placement, ``Units`` to name a model's parts by hand, and
the reference decoder in ``horizon.models``.
"""

from horizon.callbacks import Callback, JsonlMetrics, TensorBoardMetrics
from horizon.checkpoint import CheckpointConfig
from horizon.checkpoint.export import export_hf
from horizon.config import TrainConfig
from horizon.distributed import DistributedConfig, PeerFailure
from horizon.engine.plan import ActivationPolicy, Plan, RowSplit
from horizon.metrics import EvalMetrics, MemoryReport, StepMetrics
from horizon.models.units import Units
from horizon.optim.adamw import AdamW
from horizon.optim.schedule import ConstantLR, WarmupCosine, WarmupLinear
from horizon.optim.updater import NonFiniteGradientError
from horizon.progress import ProgressBar
from horizon.store.ssd_config import SSDConfig
from horizon.trainer import Trainer

__all__ = ["Trainer", "TrainConfig", "CheckpointConfig", "DistributedConfig", "PeerFailure", "SSDConfig", "AdamW",
           "ConstantLR", "WarmupCosine", "WarmupLinear", "Plan", "RowSplit", "ActivationPolicy", "Units",
           "StepMetrics", "EvalMetrics", "MemoryReport", "NonFiniteGradientError", "export_hf", "Callback",
           "JsonlMetrics", "TensorBoardMetrics", "ProgressBar"]
