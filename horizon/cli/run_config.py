"""The ``horizon train`` run as a TOML file: sections of keyword-only dataclasses, dotted overrides.

Why: a run someone wants to repeat belongs in a file, not in a shell history, and a typo in a
key must fail before a model is built, not silently train with a default. Each section is a
frozen dataclass validated at construction; the loader rejects a key no section has (naming it
and the keys that exist), a value of the wrong type (naming the key), and passes every other
check to the dataclass, whose message is prefixed with the key. ``--set section.key=value``
overrides a file value; the value is read as TOML (``3e-4``, ``[0.9, 0.95]``, ``true``) or, if
it is not TOML, taken as a string (``--set model.preset=tiny``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path

import horizon
from horizon.models import PRESETS

__all__ = ["RunConfig", "CheckpointSection", "load_run_config", "to_toml", "parse_override"]


def _positive(section: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{section}.{name} must be positive, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    preset: str = "small"
    """Decoder shape from horizon.models.PRESETS (the vocabulary set to the tokenizer's); unused with hf_config."""
    hf_config: str = ""
    """A folder holding a Hugging Face config.json: train that model instead of a preset (path; "" = off)."""
    hf_weights: str = ""
    """A folder of Hugging Face safetensors to start from, streamed into the host store (path; needs
    hf_config; "" = initialise the weights)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r}: choose one of {sorted(PRESETS)}")
        if self.hf_config and not Path(self.hf_config, "config.json").is_file():
            raise ValueError(f"model.hf_config={self.hf_config!r} holds no config.json: name the folder "
                             "save_pretrained wrote")
        if self.hf_weights and not self.hf_config:
            raise ValueError("model.hf_weights needs model.hf_config (the folder with the model's config.json; "
                             "often the same folder)")
        if self.hf_weights and not Path(self.hf_weights).is_dir():
            raise ValueError(f"model.hf_weights={self.hf_weights!r} is not a folder of safetensors")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    text: str = "stdlib"
    """Training text: a file path, or "stdlib" for the Python standard library's source."""
    max_bytes: int = 4 << 20
    """Cap on the text read (bytes)."""
    seq_len: int = 256
    """Tokens per sequence (bytes)."""
    batch_size: int = 16
    """Sequences per step (count)."""
    tokenizer: str = ""
    """A tokenizer.json file or a local Hugging Face tokenizer folder (path; nothing is downloaded);
    "" = bytes (a token is a byte)."""
    eval_fraction: float = 0.05
    """Share of the token stream held out for evaluation (its end; fraction in (0, 0.5])."""

    def __post_init__(self) -> None:
        _positive("data", self, ("max_bytes", "seq_len", "batch_size"))
        if self.tokenizer and not Path(self.tokenizer).exists():
            raise ValueError(f"data.tokenizer={self.tokenizer!r} does not exist: name a tokenizer.json or a "
                             "tokenizer folder (or \"\" for bytes)")
        if not 0 < self.eval_fraction <= 0.5:
            raise ValueError(f"data.eval_fraction must be in (0, 0.5], got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSection:
    steps: int = 100
    """Optimizer steps (count)."""
    seed: int = 0
    """Seed of the weights and the batch order."""
    eval_every_steps: int = 50
    """Evaluate on the held-out split every this many steps (steps; 0 = only before and after training)."""
    eval_batches: int = 4
    """Validation batches per evaluation (count)."""
    device: str = "cpu"
    """Where units compute: "cpu" or "cuda" / "cuda:N"."""
    plan: str = "recompute"
    """Activation plan of every block: "recompute" or "keep"."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clipping; 0 = off."""
    grad_accum_steps: int = 1
    """Micro-batches per update (count)."""
    metrics_jsonl: str = ""
    """Append one JSON line of metrics per update and per evaluation to this file (path); "" = off."""
    tensorboard_dir: str = ""
    """Write TensorBoard scalars to this folder (path; needs tensorboard); "" = off."""
    peak_flops: float = 0.0
    """The device's peak FLOP/s for the progress bar's MFU (FLOP/s; 0 = the known peak of an
    H100/H200/A100, else no MFU)."""
    preflight: bool = True
    """Check the estimate against this machine's memory before allocating (TrainConfig.preflight)."""
    resume: bool = False
    """Continue from the newest valid checkpoint in checkpoint.dir (if any) up to ``steps``; needs checkpoint.dir."""

    def __post_init__(self) -> None:
        _positive("training", self, ("steps", "eval_batches", "grad_accum_steps"))
        if self.eval_every_steps < 0:
            raise ValueError(f"training.eval_every_steps must be >= 0, got {self.eval_every_steps}")
        if not (math.isfinite(self.peak_flops) and self.peak_flops >= 0):
            raise ValueError(f"training.peak_flops must be >= 0 FLOP/s (0 = look it up), got {self.peak_flops}")
        if self.plan not in ("recompute", "keep"):
            raise ValueError(f"training.plan={self.plan!r}: use 'recompute' or 'keep'")
        if not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm >= 0):
            raise ValueError(f"training.grad_clip_norm must be >= 0 (0 = off), got {self.grad_clip_norm}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    dir: str = ""
    """Folder of the run's checkpoints, ``step-<N>`` each (path; created if missing); "" = no checkpoints."""
    every_steps: int = 0
    """Take a checkpoint after every this many updates (steps); 0 = only the final one, at the end of the run."""
    keep_last: int = 2
    """Committed checkpoints kept, newest first (count; at least 2)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, forever (steps; 0 = none)."""
    on_busy: str = "wait"
    """A checkpoint due while the previous one is still being written: "wait" for it, or "skip" this one."""
    timeout_s: float = 1800.0
    """Abort a checkpoint that is not durable this many seconds after it was requested (seconds)."""
    recycle_files: bool = True
    """Write over the files of the checkpoint retention retires instead of deleting them (false = delete)."""

    def __post_init__(self) -> None:
        for name in ("every_steps", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"checkpoint.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.keep_last < 2:
            raise ValueError(f"checkpoint.keep_last must be >= 2, got {self.keep_last}: with one, a checkpoint "
                             "damaged on disk leaves nothing to resume from")
        if self.on_busy not in ("wait", "skip"):
            raise ValueError(f"checkpoint.on_busy={self.on_busy!r}: use 'wait' or 'skip'")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"checkpoint.timeout_s must be a positive number of seconds, got {self.timeout_s}")
        if self.dir and Path(self.dir).is_file():
            raise ValueError(f"checkpoint.dir={self.dir!r} is a file: name a folder")

    def checkpoint_config(self) -> horizon.CheckpointConfig | None:
        if not self.dir:
            return None
        return horizon.CheckpointConfig(dir=self.dir, every_steps=self.every_steps or None, keep_last=self.keep_last,
                                        keep_every=self.keep_every or None, on_busy=self.on_busy,
                                        timeout_s=self.timeout_s, recycle_files=self.recycle_files)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSection:
    lr: float = 1.5e-3
    """AdamW learning rate (per step)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    weight_decay_exclude: tuple[str, ...] = ()
    """Regular expressions of parameter names that get no weight decay."""

    def __post_init__(self) -> None:
        try:
            self.adamw()
        except ValueError as e:
            raise ValueError(f"optimizer: {e}") from e
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")

    def adamw(self) -> horizon.AdamW:
        return horizon.AdamW(lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay,
                             weight_decay_exclude=tuple(self.weight_decay_exclude))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)

    def __post_init__(self) -> None:
        if self.training.resume and not self.checkpoint.dir:
            raise ValueError("training.resume needs checkpoint.dir (the folder to resume from), e.g. "
                             "--set checkpoint.dir=ckpt")

    def train_config(self) -> horizon.TrainConfig:
        t = self.training
        return horizon.TrainConfig(device=t.device, plan=t.plan, grad_clip_norm=t.grad_clip_norm or None,
                                   grad_accum_steps=t.grad_accum_steps, optimizer=self.optimizer.adamw(),
                                   metrics_jsonl=t.metrics_jsonl or None, tensorboard_dir=t.tensorboard_dir or None,
                                   hf_weights=self.model.hf_weights or None, preflight=t.preflight,
                                   checkpoint=self.checkpoint.checkpoint_config(), resume=t.resume)


def _convert(key: str, value, annotation):
    """``value`` as the field's type, or a ValueError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        item = typing.get_args(annotation)[0]
        return tuple(_convert(key, v, item) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the file'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}; {cls.__name__} has {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        kwargs[name] = (_build(hint, value, f"{prefix}{name}.") if dataclasses.is_dataclass(hint)
                        else _convert(prefix + name, value, hint))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """``"optimizer.lr=3e-4"`` -> (["optimizer", "lr"], 0.0003); a non-TOML value stays a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"--set {text!r}: write section.key=value, e.g. --set optimizer.lr=3e-4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _set(data: dict, keys: list[str], value, what: str) -> None:
    table = data
    for part in keys[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ValueError(f"{what}: {part} is a value, not a section")
    table[keys[-1]] = value


def load_run_config(path: str | None = None, *, flags: dict[str, object] | None = None,
                    overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``flags`` (dotted key -> value),
    then each ``section.key=value`` of ``overrides``."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"cannot read the config file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
    for key, value in (flags or {}).items():
        _set(data, key.split("."), value, key)
    for text in overrides:
        keys, value = parse_override(text)
        _set(data, keys, value, f"--set {text!r}")
    return _build(RunConfig, data)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(config: RunConfig) -> str:
    """``config`` as a TOML file that ``load_run_config`` reads back to an equal config."""
    lines = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        for field in dataclasses.fields(getattr(config, section.name)):
            lines.append(f"{field.name} = {_toml_value(getattr(getattr(config, section.name), field.name))}")
        lines.append("")
    return "\n".join(lines)
