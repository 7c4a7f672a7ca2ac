"""The one-pass fused AdamW (native kernel and its pure-torch fallback) against torch.optim.AdamW.

Both implementations must give torch's AdamW within 1e-6 relative per tensor after 10 steps, write the bf16
compute copy equal to ``master.to(torch.bfloat16)`` bit for bit, leave the gradient untouched, and reject bad
arguments with ValueError. The native kernel must also be bitwise independent of its thread count and of its
instruction-set path, and bitwise equal to ``torch._fused_adamw_`` on its vector body.
"""

import os
import subprocess
import sys

import pytest
import torch

from horizon.optim import native as hn

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
IMPLS = [
    pytest.param(hn.fused_adamw_, id="native",
                 marks=pytest.mark.skipif(not hn.native_available(), reason="horizon._native not built")),
    pytest.param(hn.reference_adamw_, id="reference"),
]
needs_native = pytest.mark.skipif(not hn.native_available(), reason="horizon._native not built")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom else 1.0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _state(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(n, generator=g)


def _run(impl, n, *, steps=10, weight_decay=0.1, grad_dtype=torch.float32, grad_scale=None, num_threads=1,
         seed=0, hyper=HYPER, nan_at=()):
    """``steps`` updates by ``impl`` and by torch.optim.AdamW on the same gradients; checks the bf16 copy and
    that the gradient is untouched at every step. Returns (ours, torch's) as (master, exp_avg, exp_avg_sq)."""
    gen, init = _state(n, seed)
    master, m, v = init.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    ref = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([ref], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=weight_decay)
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * 1e-2).to(grad_dtype)
        for i in nan_at:
            grad[i] = float("nan")
        before = grad.clone()
        impl(master, grad, m, v, out, step=step, weight_decay=weight_decay, grad_scale=grad_scale,
             num_threads=num_threads, **hyper)
        assert torch.equal(_bits(grad), _bits(before)), "the gradient buffer was modified"
        _assert_bf16_copy(out, master)
        g32 = grad.float()
        ref.grad = g32 if grad_scale is None else g32 * grad_scale
        opt.step()
    st = opt.state[ref]
    return (master, m, v), (ref.detach(), st["exp_avg"], st["exp_avg_sq"])


def _assert_bf16_copy(out: torch.Tensor, master: torch.Tensor) -> None:
    expect = master.to(torch.bfloat16)
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        # torch's scalar conversion writes 0x7FC0 for a NaN, its vector paths (and ours) 0xFFFF
        nan = expect.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(_bits(out)[~nan], _bits(expect)[~nan])
    else:
        assert torch.equal(_bits(out), _bits(expect)), "bf16 copy differs from master.to(torch.bfloat16)"


def _assert_close(ours, theirs, tol=1e-6):
    for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), ours, theirs):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN positions differ"
        ok = ~b.isnan()
        err = _rel(a[ok], b[ok])
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32_grad", "bf16_grad"])
@pytest.mark.parametrize("grad_scale", [None, 0.37], ids=["noscale", "scale"])
def test_matches_torch_adamw(impl, weight_decay, grad_dtype, grad_scale):
    ours, theirs = _run(impl, 100_003, weight_decay=weight_decay, grad_dtype=grad_dtype, grad_scale=grad_scale)
    _assert_close(ours, theirs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 63, 65, 1_000_003])
def test_odd_sizes(impl, n):
    ours, theirs = _run(impl, n, num_threads=2)
    _assert_close(ours, theirs)


@pytest.mark.parametrize("impl", IMPLS)
def test_small_beta1_takes_lerps_other_branch(impl):
    # 1 - beta1 >= 0.5: torch's lerp computes grad - (grad - m) * (1 - w) instead of m + w * (grad - m)
    ours, theirs = _run(impl, 4_099, hyper=dict(lr=1e-2, beta1=0.3, beta2=0.9, eps=1e-6))
    _assert_close(ours, theirs)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_grad_propagates_like_torch(impl):
    n = 1_000 + 13  # a NaN in the vector body and one in the scalar tail
    ours, theirs = _run(impl, n, steps=3, nan_at=(5, n - 2))
    for a, b in zip(ours, theirs):
        assert torch.equal(a.isnan(), b.isnan())
        assert a.isnan().sum() == 2
    _assert_close(ours, theirs)


@needs_native
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32_grad", "bf16_grad"])
def test_native_is_bitwise_torch_fused(grad_dtype):
    # torch's own fused kernel on its vector body (numel a multiple of 16: no scalar tail in torch)
    n = 16 * 6_250
    gen, init = _state(n, 3)
    ours = [init.clone(), torch.zeros(n), torch.zeros(n)]
    theirs = [init.clone(), torch.zeros(n), torch.zeros(n)]
    for step in range(1, 11):
        grad = (torch.randn(n, generator=gen) * 1e-2).to(grad_dtype)
        hn.fused_adamw_(*ours[:1], grad, *ours[1:], None, step=step, weight_decay=0.1, grad_scale=0.5, **HYPER)
        torch._fused_adamw_([theirs[0]], [grad.float() * 0.5], [theirs[1]], [theirs[2]], [],
                            [torch.tensor(float(step))], lr=HYPER["lr"], beta1=HYPER["beta1"],
                            beta2=HYPER["beta2"], weight_decay=0.1, eps=HYPER["eps"], amsgrad=False,
                            maximize=False)
    for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), ours, theirs):
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs from torch._fused_adamw_"


def _native_run(n, *, isa=0, mode=-1, num_threads=1, steps=3, offset=0):
    """The binding directly (to pick the path and memory mode); buffers start ``offset`` elements into
    their allocation, so offset 1 makes every buffer misaligned."""
    from horizon import _native

    gen, init = _state(n, 5)
    bufs = [torch.zeros(n + offset) for _ in range(3)]
    master, m, v = (b[offset:] for b in bufs)
    master.copy_(init)
    out = torch.empty(n + offset, dtype=torch.bfloat16)[offset:]
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen).to(torch.bfloat16)
        _native.fused_adamw(master.data_ptr(), grad.data_ptr(), m.data_ptr(), v.data_ptr(), out.data_ptr(), n, 1,
                            float(step), 1e-2, 0.9, 0.95, 1e-8, 0.1, True, 0.7, num_threads, isa=isa,
                            mode=mode)
    return [master.clone(), m.clone(), v.clone(), out.clone()]


def _assert_same_bits(a, b):
    for x, y in zip(a, b):
        assert torch.equal(_bits(x), _bits(y))


@needs_native
@pytest.mark.parametrize("n", [1_000_003, 2 * 65_536 + 5], ids=["31_blocks", "5_blocks"])
def test_thread_counts_are_bitwise_identical(n):
    """Threads take 32768-element blocks from a shared counter, so which thread updates which block
    changes from run to run; the bits must not."""
    one = _native_run(n, num_threads=1)
    for threads in (2, 3, 4, 7):
        _assert_same_bits(_native_run(n, num_threads=threads), one)


@needs_native
@pytest.mark.parametrize("isa", [2, 3], ids=["avx2", "avx512"])
def test_vector_paths_match_the_scalar_path(isa):
    supported = {"avx512": (2, 3), "avx2": (2,)}.get(hn.native_isa(), ())
    if isa not in supported:
        pytest.skip(f"this CPU runs the {hn.native_isa()} path")
    for n in (1, 15, 16, 17, 64 * 3 + 5, 100_003):
        for mode in (0, 3):
            _assert_same_bits(_native_run(n, isa=isa, mode=mode), _native_run(n, isa=1))


@needs_native
def test_memory_modes_and_alignment_do_not_change_results():
    n = 200_003  # large enough for two threads
    base = _native_run(n, mode=0)
    for mode in (1, 2, 3):  # non-temporal bf16 stores, prefetch, both
        _assert_same_bits(_native_run(n, mode=mode), base)
        _assert_same_bits(_native_run(n, mode=mode, num_threads=2), base)
    _assert_same_bits(_native_run(n, mode=3, offset=1), base)  # misaligned: no streaming stores, same bits


@needs_native
def test_binding_rejects_bad_codes():
    from horizon import _native

    t = torch.zeros(4)
    args = [t.data_ptr()] * 5 + [4]
    with pytest.raises(ValueError):
        _native.fused_adamw(*args, 2, 1.0, 1e-3, 0.9, 0.95, 1e-8, 0.0, False, 1.0, 1)  # grad dtype code
    with pytest.raises(ValueError):
        _native.fused_adamw(*args, 0, 1.0, 1e-3, 0.9, 0.95, 1e-8, 0.0, False, 1.0, 0)  # threads
    with pytest.raises(ValueError):
        _native.fused_adamw(*args, 0, 1.0, 1e-3, 0.9, 0.95, 1e-8, 0.0, False, 1.0, 1, isa=7)
    assert hn.native_isa() in ("avx512", "avx2", "scalar")
    with pytest.raises(ValueError):
        _native.fused_adamw(*args, 0, 1.0, 1e-3, 0.9, 0.95, 1e-8, 0.0, False, 1.0, 1, mode=4)


def _good(n=8):
    return dict(master=torch.zeros(n), grad=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n),
                compute_out=torch.zeros(n, dtype=torch.bfloat16))


BAD = {
    "master_bf16": lambda a: a.update(master=torch.zeros(8, dtype=torch.bfloat16)),
    "m_fp64": lambda a: a.update(exp_avg=torch.zeros(8, dtype=torch.float64)),
    "v_fp16": lambda a: a.update(exp_avg_sq=torch.zeros(8, dtype=torch.float16)),
    "grad_fp16": lambda a: a.update(grad=torch.zeros(8, dtype=torch.float16)),
    "out_fp32": lambda a: a.update(compute_out=torch.zeros(8)),
    "numel": lambda a: a.update(grad=torch.zeros(9)),
    "not_contiguous": lambda a: a.update(exp_avg=torch.zeros(16)[::2]),
    "not_tensor": lambda a: a.update(grad=[0.0] * 8),
    "meta": lambda a: a.update(master=torch.zeros(8, device="meta")),
    "aliased": lambda a: a.update(exp_avg=a["master"]),
    "overlap": lambda a: a.update(exp_avg_sq=a["exp_avg"].new_zeros(0).set_(a["exp_avg"].untyped_storage(), 0, (8,))),
}
BAD_KW = {
    "step0": dict(step=0), "step_float": dict(step=1.5), "step_bool": dict(step=True),
    "lr_neg": dict(lr=-1.0), "lr_nan": dict(lr=float("nan")), "beta1_one": dict(beta1=1.0),
    "beta2_neg": dict(beta2=-0.1), "eps_inf": dict(eps=float("inf")), "wd_neg": dict(weight_decay=-0.1),
    "scale_nan": dict(grad_scale=float("nan")), "threads0": dict(num_threads=0), "threads_float": dict(num_threads=2.0),
}


def _kw(**over):
    kw = dict(step=1, weight_decay=0.0, grad_scale=None, num_threads=1, **HYPER)
    kw.update(over)
    return kw


@pytest.mark.parametrize("impl", [hn.fused_adamw_, hn.reference_adamw_], ids=["fused", "reference"])
@pytest.mark.parametrize("case", list(BAD) + list(BAD_KW))
def test_bad_arguments_raise_value_error(impl, case):
    args = _good()
    kw = _kw()
    if case in BAD:
        BAD[case](args)
    else:
        kw.update(BAD_KW[case])
    with pytest.raises(ValueError):
        impl(args["master"], args["grad"], args["exp_avg"], args["exp_avg_sq"], args["compute_out"], **kw)


@pytest.mark.parametrize("impl", [hn.fused_adamw_, hn.reference_adamw_], ids=["fused", "reference"])
def test_empty_and_no_compute_copy(impl):
    a = _good(0)
    impl(a["master"], a["grad"], a["exp_avg"], a["exp_avg_sq"], a["compute_out"], **_kw())
    a = _good(100)
    a["grad"].fill_(1.0)
    impl(a["master"], a["grad"], a["exp_avg"], a["exp_avg_sq"], None, **_kw())
    assert torch.equal(a["exp_avg"], torch.full((100,), 0.1))  # lerp(0, 1, 1 - 0.9) in fp32
    assert a["master"].lt(0).all()


def test_horizon_imports_without_the_extension():
    code = (
        "import sys; sys.modules['horizon._native'] = None\n"
        "import torch, horizon\n"
        "from horizon.optim import native as hn\n"
        "assert not hn.native_available() and hn.native_isa() is None\n"
        "t = [torch.zeros(5) for _ in range(4)]; out = torch.empty(5, dtype=torch.bfloat16)\n"
        "t[1].fill_(1.0)\n"
        "hn.fused_adamw_(*t, out, step=1, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)\n"
        "assert torch.equal(out, t[0].to(torch.bfloat16)) and t[0].lt(0).all()\n"
    )
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install -e ." in r.stderr
