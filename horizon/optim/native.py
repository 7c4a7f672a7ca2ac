"""One-pass fused AdamW over a unit's flat host buffers, with the bf16 compute copy written in the same pass.

Why: the CPU optimizer is memory bound. ``torch._fused_adamw_`` updates master, m and v in one pass
(28 bytes of traffic per parameter), but a unit also needs its bf16 compute copy refreshed for the next
host->device load (a second pass over the master, 6 more bytes) and, with a bf16 gradient, an upcast
first (6 more). The native kernel (``horizon._native``, built from ``native/adamw.cpp`` at install time)
reads master, grad (fp32 or bf16), m and v once and writes master, m, v and the bf16 copy: 30 bytes.

Numerics: the kernel performs torch's fused CPU AdamW operations in torch's order with torch's fp32
constants, so master, m and v equal ``torch._fused_adamw_`` bit for bit (save torch's own scalar tail,
see native/adamw.cpp) and ``torch.optim.AdamW`` to an ulp; the bf16 copy equals ``master.to(torch.bfloat16)``
bit for bit. ``grad_scale`` multiplies the gradient (global-norm clipping) without writing it back.

When the extension was not built (no compiler at install time), ``fused_adamw_`` runs
``reference_adamw_``: the same update with ``torch._fused_adamw_`` and a ``copy_`` into the bf16 copy.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch

__all__ = ["native_available", "fused_adamw_", "reference_adamw_"]

log = logging.getLogger(__name__)

try:
    from horizon import _native
except ImportError as exc:  # built with optional=True: a failed build leaves the pure-torch path
    _native = None
    _NATIVE_ERROR: str | None = f"{type(exc).__name__}: {exc}"
    log.warning("horizon's native AdamW kernel (horizon._native) is not built (%s); using the slower "
                "pure-torch path. Reinstall with `pip install -e .` (needs a C++17 compiler) to build it.",
                _NATIVE_ERROR)
else:
    _NATIVE_ERROR = None

_GRAD_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def native_available() -> bool:
    """True when the native kernel was built and imported."""
    return _native is not None


def native_isa() -> str | None:
    """The instruction-set path the native kernel runs here ('avx512', 'avx2' or 'scalar'), None when not built."""
    return None if _native is None else _native.best_isa()


def fused_adamw_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 compute_out: torch.Tensor | None, *, step: int, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, grad_scale: float | None = None,
                 num_threads: int = 1) -> None:
    """One AdamW update of flat buffers in place, and the bf16 copy of the new master into ``compute_out``.

    ``master``, ``exp_avg``, ``exp_avg_sq``: fp32; ``grad``: fp32 or bf16, read only; ``compute_out``: bf16
    or None. All contiguous CPU tensors of one numel, none overlapping another. ``step`` is the step count
    after this update (1 for the first). ``grad_scale`` multiplies the gradient first. ``num_threads``
    threads share the range (the pure-torch fallback uses torch's intra-op threads instead).
    Raises ValueError on bad arguments.
    """
    n = _validate(master, grad, exp_avg, exp_avg_sq, compute_out, step=step, lr=lr, beta1=beta1, beta2=beta2,
                  eps=eps, weight_decay=weight_decay, grad_scale=grad_scale, num_threads=num_threads)
    if _native is None:
        _reference(master, grad, exp_avg, exp_avg_sq, compute_out, step=step, lr=lr, beta1=beta1, beta2=beta2,
                   eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)
        return
    if n == 0:
        return
    _native.fused_adamw(master.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                        0 if compute_out is None else compute_out.data_ptr(), n, _GRAD_DTYPE_CODE[grad.dtype],
                        float(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                        grad_scale is not None, 1.0 if grad_scale is None else float(grad_scale), int(num_threads))


def reference_adamw_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     compute_out: torch.Tensor | None, *, step: int, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, grad_scale: float | None = None,
                     num_threads: int = 1) -> None:
    """``fused_adamw_`` in pure torch (``torch._fused_adamw_``, then ``compute_out.copy_(master)``), always.

    The gradient buffer is left untouched: a bf16 or scaled gradient goes through a temporary.
    ``num_threads`` is accepted for signature parity; torch's intra-op thread pool does the work.
    """
    _validate(master, grad, exp_avg, exp_avg_sq, compute_out, step=step, lr=lr, beta1=beta1, beta2=beta2,
              eps=eps, weight_decay=weight_decay, grad_scale=grad_scale, num_threads=num_threads)
    _reference(master, grad, exp_avg, exp_avg_sq, compute_out, step=step, lr=lr, beta1=beta1, beta2=beta2,
               eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)


def _reference(master, grad, exp_avg, exp_avg_sq, compute_out, *, step, lr, beta1, beta2, eps, weight_decay,
               grad_scale) -> None:
    if master.numel() == 0:
        return
    g = grad if grad.dtype == torch.float32 else grad.float()
    if grad_scale is not None:
        g = g.mul(float(grad_scale)) if g is grad else g.mul_(float(grad_scale))
    torch._fused_adamw_([master], [g], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))],
                        lr=float(lr), beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay),
                        eps=float(eps), amsgrad=False, maximize=False)
    if compute_out is not None:
        compute_out.copy_(master)


def _validate(master, grad, exp_avg, exp_avg_sq, compute_out, *, step, lr, beta1, beta2, eps, weight_decay,
              grad_scale, num_threads) -> int:
    named = {"master": master, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if compute_out is not None:
        named["compute_out"] = compute_out
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense CPU tensor, got {t.device} {t.layout}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a flat host buffer), got strides {t.stride()}")
    n = master.numel()
    for name, t in named.items():
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, master has {n}")
    for name in ("master", "exp_avg", "exp_avg_sq"):
        if named[name].dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {named[name].dtype}")
    if grad.dtype not in _GRAD_DTYPE_CODE:
        raise ValueError(f"grad must be float32 or bfloat16, got {grad.dtype}")
    if compute_out is not None and compute_out.dtype != torch.bfloat16:
        raise ValueError(f"compute_out must be bfloat16 or None, got {compute_out.dtype}")
    _check_disjoint(named)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the count after this update), got {step!r}")
    for name, x in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not _is_real(x) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    for name, x in (("beta1", beta1), ("beta2", beta2)):
        if not _is_real(x) or not 0.0 <= x < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {x!r}")
    if grad_scale is not None and (not _is_real(grad_scale) or not math.isfinite(grad_scale)):
        raise ValueError(f"grad_scale must be a finite number or None, got {grad_scale!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    return n


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_disjoint(named: dict[str, torch.Tensor]) -> None:
    """The kernel reads and writes each buffer once per element: no two may share memory."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in named.items() if t.numel() > 0)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"{name_a} and {name_b} overlap in memory; each needs its own buffer")
