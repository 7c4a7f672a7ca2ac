"""A progress bar for a training loop: loss, tokens/s, MFU, host (and RSS) / device / SSD bytes, ETA.

Why a callback: the numbers a person watching a run wants (is it learning, is it fast, is memory
where the estimate said) are all known to the trainer at the end of each update, so the bar
hangs off ``on_step_end`` and any loop around ``Trainer.step`` gets it by passing
``callbacks=[ProgressBar(...)]``. Under torchrun only rank 0 draws it. MFU uses
``horizon.flops`` (the benchmarks' formula) against the device's peak, when it is known or given.
"""

from __future__ import annotations

import math

import psutil
from tqdm import tqdm

from horizon.callbacks import Callback
from horizon.flops import mfu
from horizon.metrics import EvalMetrics, MemoryReport, StepMetrics
from horizon.store.capacity import format_bytes

__all__ = ["ProgressBar", "format_postfix", "format_duration"]

SMOOTHING = 0.9
"""Weight of the past in the bar's exponentially smoothed loss."""


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``, ``65`` -> ``"1m05s"``, ``7.4`` -> ``"7s"``."""
    if not math.isfinite(seconds):
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_postfix(*, loss: float, tokens_per_s: float, mfu: float | None, memory: MemoryReport, rss_bytes: int,
                   eta_s: float) -> str:
    """The bar's tail: ``loss 2.345 | 12,345 tok/s | MFU 41.2% | host 1.50 GiB (RSS 1.62 GiB) | dev 3.0 GiB |
    ETA 1m05s``: host is the store and activation buffers, RSS the whole process's resident memory (MFU
    left out when unknown, SSD only when some state is there)."""
    parts = [f"loss {loss:.3f}", f"{tokens_per_s:,.0f} tok/s"]
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    parts += [f"host {format_bytes(memory.host_bytes)} (RSS {format_bytes(rss_bytes)})",
              f"dev {format_bytes(memory.device_peak_bytes)}"]
    if memory.ssd_bytes:
        parts.append(f"ssd {format_bytes(memory.ssd_bytes)}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class ProgressBar(Callback):
    """A tqdm bar of ``total_steps`` updates. ``flops_per_token``: horizon.flops.flops_per_token of the
    model at the run's seq_len; ``peak_flops``: the device's FLOP/s (horizon.flops.device_peak_flops);
    MFU is shown when both are given. ``rank``: only rank 0 draws."""

    def __init__(self, total_steps: int, *, flops_per_token: float | None = None, peak_flops: float | None = None,
                 rank: int = 0, file=None) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"ProgressBar total_steps must be a positive int, got {total_steps!r}")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"ProgressBar peak_flops must be positive FLOP/s or None, got {peak_flops}")
        self.total_steps, self.flops_per_token, self.peak_flops = total_steps, flops_per_token, peak_flops
        self.smoothed_loss = math.nan
        self._process = psutil.Process()
        self.tokens, self.seconds, self.updates = 0, 0.0, 0
        self.start_step = 0
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, disable=rank != 0, file=file,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}")

    @property
    def tokens_per_s(self) -> float:
        """Mean training throughput over the updates so far (labels that counted per second of step)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        return mfu(self.tokens_per_s, self.flops_per_token, self.peak_flops) if self.flops_per_token else None

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        first = math.isnan(self.smoothed_loss)
        self.smoothed_loss = metrics.loss if first else SMOOTHING * self.smoothed_loss + (1 - SMOOTHING) * metrics.loss
        self.tokens, self.seconds, self.updates = self.tokens + metrics.tokens, self.seconds + metrics.seconds, \
            self.updates + 1
        eta_s = (self.total_steps - self.start_step - self.updates) * self.seconds / self.updates
        self.bar.set_postfix_str(format_postfix(loss=self.smoothed_loss, tokens_per_s=self.tokens_per_s, mfu=self.mfu,
                                                memory=trainer.memory(), rss_bytes=self._process.memory_info().rss,
                                                eta_s=eta_s), refresh=False)
        self.bar.update(1)

    def start_at(self, step: int) -> None:
        """A resumed run: the bar starts at ``step`` of ``total_steps``, and the ETA counts what is left."""
        self.start_step = step
        self.bar.update(step)

    def on_eval(self, trainer, metrics: EvalMetrics) -> None:
        if not self.bar.disable:
            self.bar.write(f"step {metrics.step}: eval loss {metrics.loss:.4f} over {metrics.tokens:,} tokens "
                           f"({metrics.seconds:.1f} s)", file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()
