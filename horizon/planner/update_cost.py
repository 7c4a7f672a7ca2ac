"""What one AdamW update costs the host per parameter, measured with the optimizer's own kernel.

Why measured here: the next step's load of a unit waits for the unit's update, so where the CPU
optimizer is slower than the device (small batches, few cores) it sets the step; the simulator
needs its seconds to say so (``Profile.update_schedule``). The update is memory bound, so its cost
is per parameter once the state comes from DRAM. It is timed on scratch buffers shaped as the
store's (fp32 master, m and v; the gradient and a separate compute copy in the compute dtype),
never on the model's own state, round-robin over enough of them that the working set is the
model's own up to ``_SCRATCH_BYTES`` (a small model's state stays in cache in a real step too),
with the thread counts the updater uses.
"""

from __future__ import annotations

import statistics
import time

import torch

from horizon.optim.adamw import AdamW, adamw_unit_step
from horizon.store.host_store import UnitBuffers
from horizon.store.layout import ParamSlot, UnitLayout

__all__ = ["update_s_per_param"]

_SCRATCH_BYTES = 128 << 20
"""The most scratch state the timing allocates: more than a server's last-level cache."""
_CHUNK_PARAMS = 1 << 21
"""Parameters per scratch unit."""


def _scratch_unit(numel: int, compute_dtype: torch.dtype) -> UnitBuffers:
    layout = UnitLayout(name="scratch", own=(ParamSlot(local_name="w", offset=0, shape=torch.Size([numel])),),
                        borrowed=())
    master = torch.randn(numel)
    compute = master if compute_dtype == torch.float32 else torch.empty(numel, dtype=compute_dtype)
    return UnitBuffers(layout=layout, master=master, exp_avg=torch.zeros(numel), exp_avg_sq=torch.zeros(numel),
                       grad=torch.randn(numel).to(compute_dtype), compute=compute)


def update_s_per_param(compute_dtype: torch.dtype, *, total_params: int, threads: tuple[int, ...],
                       rounds: int = 3) -> dict[int, float]:
    """Median seconds per parameter of one update with each of ``threads`` thread counts."""
    state_bytes = 16 * total_params
    numel = max(1, min(_CHUNK_PARAMS, total_params))
    units = [_scratch_unit(numel, compute_dtype) for _ in range(max(1, min(state_bytes, _SCRATCH_BYTES)
                                                                       // (16 * numel)))]
    out, step, cfg = {}, torch.zeros(()), AdamW()
    for num_threads in threads:
        times = []
        for i in range(rounds + 1):  # the first round warms up
            step += 1
            for unit in units:
                start = time.perf_counter()
                adamw_unit_step(unit, step, cfg, lr=1e-3, grad=unit.grad, grad_scale=None,
                                decay_runs=[(0, numel, 0.01)], num_threads=num_threads)
                if i:
                    times.append(time.perf_counter() - start)
        out[num_threads] = statistics.median(times) / numel
    return out
