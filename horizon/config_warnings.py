"""Warnings for TrainConfig settings that are valid but would do nothing in this configuration.

Why: a setting that is silently ignored is worse than an error for the user who set it on purpose:
they believe the run is budgeted, pinned or faster than it is. These combinations are not wrong
enough to refuse (a config file shared between a CPU smoke test and a GPU run hits them), so each
one gets an ``IneffectiveSettingWarning`` that names the setting, says why it has no effect here,
and what to change. Filter them like any warning:
``warnings.filterwarnings("ignore", category=IneffectiveSettingWarning)``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from horizon.config import TrainConfig

__all__ = ["IneffectiveSettingWarning", "ineffective_settings", "warn_ineffective_settings"]


class IneffectiveSettingWarning(UserWarning):
    """A TrainConfig setting that has no effect in the configuration it is part of."""


def _device_budget(config: TrainConfig) -> str | None:
    if config.device_memory_budget_bytes is None or config.plan == "auto":
        return None
    return (f"TrainConfig.device_memory_budget_bytes={config.device_memory_budget_bytes:,} has no effect: only "
            f"plan='auto' reads it, and plan={config.plan!r} fixes the activations by hand. Set plan='auto' to "
            "plan under the budget, or drop device_memory_budget_bytes")


def _host_budget(config: TrainConfig) -> str | None:
    if config.host_memory_budget_bytes is None or config.ssd is not None:
        return None
    return (f"TrainConfig.host_memory_budget_bytes={config.host_memory_budget_bytes:,} has no effect without "
            "ssd=...: it only decides (and checks) which units' optimizer state goes to SSD. Add "
            "ssd=horizon.SSDConfig(dir=..., units='auto'), or drop host_memory_budget_bytes")


def _ignore_nonfinite(config: TrainConfig) -> str | None:
    if config.on_nonfinite != "ignore" or (config.grad_clip_norm is None and config.grad_accum_steps == 1):
        return None
    why = "grad_clip_norm is set" if config.grad_clip_norm is not None else "grad_accum_steps > 1"
    return (f"TrainConfig.on_nonfinite='ignore' gains nothing here: it lets updates start while backward runs "
            f"only without clipping or accumulation, and {why}, so updates wait for the whole backward anyway "
            "while inf/NaN gradients are still applied. Use on_nonfinite='skip' (the check then costs nothing)")


def _pin_on_cpu(config: TrainConfig) -> str | None:
    if config.pin_memory or torch.device(config.device).type != "cpu":
        return None
    return ("TrainConfig.pin_memory=False has no effect on device='cpu': nothing is page-locked without CUDA. "
            "Drop pin_memory=False (it matters only with device='cuda')")


_CHECKS = (_device_budget, _host_budget, _ignore_nonfinite, _pin_on_cpu)


def ineffective_settings(config: TrainConfig) -> list[str]:
    """The message of every setting of ``config`` that would do nothing, in a fixed order."""
    return [message for check in _CHECKS if (message := check(config)) is not None]


def warn_ineffective_settings(config: TrainConfig, *, stacklevel: int = 2) -> None:
    """One IneffectiveSettingWarning per ineffective setting, attributed ``stacklevel`` frames up."""
    for message in ineffective_settings(config):
        warnings.warn(message, IneffectiveSettingWarning, stacklevel=stacklevel + 1)
