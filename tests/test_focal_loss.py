"""Fused focal loss (marn_fast.ops.focal_loss) against float64 plain-PyTorch references.

Three paths (the `impl` parameter of these tests): "triton" (Triton's CPU interpreter here,
TRITON_INTERPRET=1 from conftest), "cpp" (impl="torch" on CPU with the compiled extension: the C++
kernel csrc/cpu/focal_loss_cpu.cpp; the PyTorch path is made to raise, so the kernel is what runs)
and "torch" (impl="torch" with the extension reported unavailable: the vectorised-PyTorch
fallback). References, run in float64:
  - `reference.focal_loss` (the official code's transcription, gradient by autograd) at moderate
    logits, where it is accurate;
  - `reference.focal_loss_elementwise` (log space, analytic gradient) at extreme logits, itself
    checked against autograd of the transcription.

Tolerances (fp32 results vs float64 references), chosen from the measured errors (max ≈ 5e-6
relative per element at γ = 5 from fp32 exp/log, ≈ 1e-6 relative for reductions):
  reductions "sum"/"mean":  rtol 1e-5
  "none" and gradients:     |a − r| ≤ 1e-4·|r| + 1e-6·max|r|  (the absolute part covers elements
                            whose value is a cancellation in fp32, e.g. PyTorch's BCE of a
                            confident negative, which the torch path uses like the eager code)
  float64 inputs:           rtol 1e-6 (α, γ enter the Triton kernel as fp32 scalars)
  fp16 logits (CPU):        rtol 2e-3 / atol 1e-3·max; bf16 (CUDA only): rtol 2e-2 / atol 1e-2·max
"""
import importlib
import math

import pytest
import torch
from conftest import requires_cuda

from marn_fast.kernels.focal_loss import BLOCK_SIZE
from marn_fast.ops import cpu_extension_available
from marn_fast.ops import focal_loss as _focal_loss
from marn_fast.ops import multitask_focal_loss as _multitask_focal_loss

# the module (the package exports a function of that name)
ref = importlib.import_module("marn_fast.reference.focal_loss")
ops_module = importlib.import_module("marn_fast.ops.focal_loss")

IMPLS = ("triton", "cpp", "torch")
IMPL_ARG = {"cpp": "torch"}  # the test's path → the op's impl argument
CPP_BLOCK = 2048  # kBlock of csrc/cpu/focal_loss_cpu.cpp (one partial sum per block)


@pytest.fixture(autouse=True)
def _select_cpu_path(request, monkeypatch):
    """impl="cpp": the C++ kernel must run (the PyTorch path raises); impl="torch": the fallback."""
    impl = request.node.callspec.params.get("impl") if hasattr(request.node, "callspec") else None
    if impl == "cpp":
        if not cpu_extension_available():
            pytest.fail("marn_fast._C is not built: `pip install --no-build-isolation -e .`")

        def not_this_path(*args, **kwargs):
            raise AssertionError("the PyTorch path ran where the C++ kernel should have")
        monkeypatch.setattr(ops_module, "_focal_loss_torch", not_this_path)
    elif impl == "torch":
        monkeypatch.setattr(ops_module, "extension_available_for", lambda t: False)


# The Triton path runs on the GPU where there is one (else in the interpreter on the CPU): its
# inputs move there and its result comes back, differentiably, so every test compares on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_triton_device(value):
    return value.to(TRITON_DEVICE) if isinstance(value, torch.Tensor) else value


def _run(fn, args, impl, kw):
    if impl == "triton":
        args, kw = [on_triton_device(a) for a in args], {k: on_triton_device(v) for k, v in kw.items()}
        return fn(*args, impl="triton", **kw).cpu()
    return fn(*args, impl=IMPL_ARG.get(impl, impl), **kw)


def focal_loss(*args, impl="auto", **kw):
    return _run(_focal_loss, args, impl, kw)


def multitask_focal_loss(*args, impl="auto", **kw):
    return _run(_multitask_focal_loss, args, impl, kw)
GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
ALPHA = 0.25  # both weights α and 1 − α matter in eq. 16 (the official default 0.999 hides 1 − α)


def make_inputs(b, l, seed, scale=10.0, soft=False, target_dtype=torch.float32):
    """Logits uniform in ±scale; targets ~1 % positives (at least one per row), or soft in [0, 1]
    with ~half exact zeros."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(b, l, generator=g) * 2 - 1) * scale
    if soft:
        targets = torch.rand(b, l, generator=g) * (torch.rand(b, l, generator=g) < 0.5)
    else:
        targets = torch.rand(b, l, generator=g) < 0.01
        targets[torch.arange(b), torch.randint(0, l, (b,), generator=g)] = True
    return logits, targets.to(target_dtype)


def close(actual, expected, rtol=1e-4, atol_frac=1e-6):
    actual, expected = actual.double(), expected.double()
    atol = atol_frac * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def fused_loss_and_grad(logits, targets, reduction, weights=None, **kw):
    x = logits.clone().requires_grad_()
    loss = focal_loss(x, targets, reduction=reduction, **kw)
    (loss * weights).sum().backward() if weights is not None else loss.backward()
    return loss.detach(), x.grad


def reference_loss_and_grad(logits, targets, reduction, weights=None, **kw):
    x = logits.detach().to(torch.float64, copy=True).requires_grad_()
    loss = ref.focal_loss(x, targets.double(), reduction=reduction, **kw)
    (loss * weights.double()).sum().backward() if weights is not None else loss.backward()
    return loss.detach(), x.grad


def upstream(reduction, shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if reduction == "none" else None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_reference(impl, balanced, gamma, reduction):
    # 3 × 701: L not a multiple of BLOCK_SIZE, and the flattened tail is partial.
    logits, targets = make_inputs(3, 701, seed=int(gamma * 10) + 7 * balanced)
    kw = dict(alpha=ALPHA, gamma=gamma, balanced=balanced)
    w = upstream(reduction, logits.shape, seed=1)
    loss, grad = fused_loss_and_grad(logits, targets, reduction, w, impl=impl, **kw)
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, reduction, w, **kw)
    if reduction == "none":
        assert loss.dtype == torch.float32 and loss.shape == logits.shape
        close(loss, ref_loss)
    else:
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    close(grad, ref_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_soft_targets(impl, balanced, gamma):
    logits, targets = make_inputs(4, 300, seed=3, soft=True)
    kw = dict(alpha=ALPHA, gamma=gamma, balanced=balanced)
    w = upstream("none", logits.shape, seed=2)
    loss, grad = fused_loss_and_grad(logits, targets, "none", w, impl=impl, **kw)
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, "none", w, **kw)
    close(loss, ref_loss)
    close(grad, ref_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float16, torch.float64])
@pytest.mark.parametrize("balanced", [False, True])
def test_target_dtypes(impl, target_dtype, balanced):
    """bool/uint8/other float targets give the results of float32 targets: bit-identical on the
    CPU paths and in the interpreter; on a GPU to 1e-6 relative, since Triton compiles one kernel
    per target dtype and may contract a multiply-add differently in each (seen on an H200: the
    mean differed in its last bit)."""
    logits, targets = make_inputs(2, 1500, seed=5)
    kw = dict(alpha=ALPHA, gamma=2.0, balanced=balanced, impl=impl)
    compiled_for_gpu = impl == "triton" and TRITON_DEVICE == "cuda"
    for reduction in ("none", "mean"):
        w = upstream(reduction, logits.shape, seed=4)
        want = fused_loss_and_grad(logits, targets, reduction, w, **kw)
        got = fused_loss_and_grad(logits, targets.to(target_dtype), reduction, w, **kw)
        if compiled_for_gpu:
            close(got[0], want[0], rtol=1e-6, atol_frac=1e-7)
            close(got[1], want[1], rtol=1e-6, atol_frac=1e-7)
        else:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, "mean", alpha=ALPHA, gamma=2.0,
                                                 balanced=balanced)
    torch.testing.assert_close(got[0].double(), ref_loss, rtol=1e-5, atol=0)
    close(got[1], ref_grad)


def test_logspace_reference_matches_autograd():
    """The analytic log-space oracle equals autograd through the transcription (float64,
    moderate logits, hard and soft targets, both forms, every γ): rtol 1e-9."""
    for soft in (False, True):
        logits, targets = make_inputs(3, 200, seed=11, soft=soft)
        logits, targets = logits.double(), targets.double()
        for balanced in (False, True):
            for gamma in GAMMAS:
                kw = dict(alpha=ALPHA, gamma=gamma, balanced=balanced)
                loss, grad = ref.focal_loss_elementwise(logits, targets, **kw)
                w = upstream("none", logits.shape, seed=0)
                ref_loss, ref_grad = reference_loss_and_grad(logits, targets, "none", w, **kw)
                torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=0)
                torch.testing.assert_close(grad * w.double(), ref_grad, rtol=1e-9, atol=1e-300)


def extreme_inputs(soft):
    values = torch.tensor([-200.0, -100.0, -50.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 50.0, 100.0, 200.0])
    logits = values.repeat(2, 1)
    if soft:
        targets = torch.tensor([[0.0, 0.3, 1.0, 0.7, 0.5, 0.01, 0.99, 0.2, 0.0, 1.0, 0.4, 0.6, 0.9]] * 2)
    else:
        targets = torch.stack([torch.zeros(13), torch.ones(13)])
    return logits, targets


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("soft", [False, True])
def test_extreme_logits_finite_and_accurate(impl, balanced, gamma, soft):
    logits, targets = extreme_inputs(soft)
    kw = dict(alpha=ALPHA, gamma=gamma, balanced=balanced)
    loss, grad = fused_loss_and_grad(logits, targets, "none", torch.ones_like(logits), impl=impl, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = ref.focal_loss_elementwise(logits.double(), targets.double(), **kw)
    close(loss, ref_loss)
    close(grad, ref_grad)
    mean, _ = fused_loss_and_grad(logits, targets, "mean", impl=impl, **kw)
    torch.testing.assert_close(mean.double(), ref_loss.mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gamma_zero_is_alpha_weighted_bce(impl):
    logits, targets = make_inputs(3, 400, seed=13)
    loss, grad = fused_loss_and_grad(logits, targets, "none", torch.ones_like(logits), alpha=ALPHA,
                                     gamma=0.0, impl=impl)
    x = logits.double().requires_grad_()
    bce = ALPHA * ref.bce_loss(x, targets, reduction="none")
    bce.sum().backward()
    close(loss, bce.detach())
    close(grad, x.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (1, BLOCK_SIZE), (2, BLOCK_SIZE + 1), (5, 333), (3, CPP_BLOCK + 7)])
def test_block_boundaries(impl, shape):
    logits, targets = make_inputs(*shape, seed=17)
    for reduction in ("none", "sum"):
        w = upstream(reduction, shape, seed=5)
        loss, grad = fused_loss_and_grad(logits, targets, reduction, w, impl=impl, alpha=ALPHA)
        ref_loss, ref_grad = reference_loss_and_grad(logits, targets, reduction, w, alpha=ALPHA)
        close(loss, ref_loss, rtol=1e-5)
        close(grad, ref_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_inputs_and_upstream(impl):
    """Transposed logits/targets, and the expanded stride-0 gradient of .sum() on "none"."""
    logits, targets = make_inputs(300, 3, seed=19)
    lt, tt = logits.t(), targets.t()
    assert not lt.is_contiguous()
    x = logits.clone().requires_grad_()
    loss = focal_loss(x.t(), tt, alpha=ALPHA, reduction="none", impl=impl)
    loss.sum().backward()
    ref_loss, ref_grad = reference_loss_and_grad(lt, tt, "none", torch.ones(lt.shape), alpha=ALPHA)
    close(loss.detach(), ref_loss)
    close(x.grad.t(), ref_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_logits(impl):
    logits, targets = make_inputs(2, 600, seed=23)
    logits = logits.half()
    for reduction in ("none", "mean"):
        w = upstream(reduction, logits.shape, seed=6)
        loss, grad = fused_loss_and_grad(logits, targets, reduction, w, impl=impl, alpha=ALPHA)
        assert loss.dtype == (torch.float16 if reduction == "none" else torch.float32)
        assert grad.dtype == torch.float16
        ref_loss, ref_grad = reference_loss_and_grad(logits, targets, reduction, w, alpha=ALPHA)
        close(loss, ref_loss, rtol=2e-3, atol_frac=1e-3)
        close(grad, ref_grad, rtol=2e-3, atol_frac=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("balanced", [False, True])
def test_float64_matches_reference_and_gradcheck(impl, balanced):
    logits, targets = make_inputs(2, 300, seed=29, scale=6.0)
    for gamma in (0.5, 2.0):
        kw = dict(alpha=ALPHA, gamma=gamma, balanced=balanced)
        loss, grad = fused_loss_and_grad(logits.double(), targets, "mean", impl=impl, **kw)
        ref_loss, ref_grad = reference_loss_and_grad(logits, targets, "mean", **kw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6 * ref_grad.abs().max().item())
    small_x, small_t = make_inputs(2, 5, seed=31, scale=4.0, soft=True)
    x = small_x.double().requires_grad_()
    for reduction in ("none", "sum", "mean"):
        fn = lambda v: focal_loss(v, small_t, alpha=ALPHA, gamma=1.5, balanced=balanced,  # noqa: E731
                                  reduction=reduction, impl=impl)
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    logits, targets = make_inputs(3, 70, seed=37)
    samples = [
        (logits.clone().requires_grad_(), targets, 0.999, 2.0, False, "mean", True, use_triton),
        (logits.clone().requires_grad_(), targets.bool(), ALPHA, 0.5, True, "none", True, use_triton),
        (logits.double().requires_grad_(), targets.to(torch.uint8), ALPHA, 0.0, False, "sum", True, use_triton),
        (logits.clone(), targets, ALPHA, 2.0, True, "sum", False, use_triton),
    ]
    for args in samples:
        if use_triton:
            args = tuple(on_triton_device(a.detach()).requires_grad_(a.requires_grad)
                         if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.marn_fast.focal_loss.default, args)


def test_no_grad_computes_no_gradient():
    logits, targets = make_inputs(2, 50, seed=41)
    logits, targets = on_triton_device(logits), on_triton_device(targets)
    loss, grad = torch.ops.marn_fast.focal_loss(logits, targets, ALPHA, 2.0, False, "mean", False, True)
    assert grad.numel() == 0
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        assert not focal_loss(x, targets, impl="triton").requires_grad
    loss2 = torch.ops.marn_fast.focal_loss(x, targets, ALPHA, 2.0, False, "mean", False, True)[0]
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss2.backward()


def test_triton_is_deterministic():
    logits, targets = make_inputs(4, 1000, seed=43)
    a = fused_loss_and_grad(logits, targets, "mean", impl="triton")
    b = fused_loss_and_grad(logits, targets, "mean", impl="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", ["cpp"])
def test_cpp_is_deterministic_across_thread_counts(impl):
    logits, targets = make_inputs(5, 9216, seed=44)  # 23 blocks of the C++ kernel
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(fused_loss_and_grad(logits, targets, "mean", impl=impl, balanced=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])


@pytest.mark.parametrize("impl", ["cpp"])
def test_cpp_op_opcheck_and_all_target_dtypes(impl):
    """The C++ op itself: opcheck (schema, fake kernel) and float/bool/uint8 targets, fp32 and fp64
    logits, read as stored, against the float64 log-space reference (γ = 0.5, L odd)."""
    logits, targets = make_inputs(3, 1001, seed=38, scale=50.0)
    op = torch.ops.marn_fast.focal_loss_forward.default
    for x in (logits, logits.double()):
        for t in (targets, targets.bool(), targets.to(torch.uint8), targets.double()):
            for balanced in (False, True):
                for reduce in (False, True):
                    args = (x, t, ALPHA, 0.5, balanced, reduce, 0.25, True)
                    torch.library.opcheck(op, args)
                    loss, grad = op(*args)
                    want, want_grad = ref.focal_loss_elementwise(x.double(), t.double(), alpha=ALPHA, gamma=0.5,
                                                                 balanced=balanced)
                    want = want.sum() * 0.25 if reduce else want
                    tol = dict(rtol=1e-9, atol_frac=1e-12) if x.dtype == torch.float64 else {}
                    close(loss, want, **tol) if not reduce else torch.testing.assert_close(
                        loss.double(), want, rtol=1e-9 if x.dtype == torch.float64 else 1e-5, atol=0)
                    close(grad, want_grad * 0.25, **tol)
    loss, grad = op(logits, targets, ALPHA, 2.0, False, True, 1.0, False)
    assert grad.numel() == 0 and loss.dim() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_multitask_equals_weighted_sum(impl):
    icd, icd_t = make_inputs(3, 500, seed=47)
    ccs, ccs_t = make_inputs(3, 40, seed=53)
    kw = dict(alpha=ALPHA, gamma=2.0, balanced=True)
    xi, xc = icd.clone().requires_grad_(), ccs.clone().requires_grad_()
    total = multitask_focal_loss(xi, icd_t.bool(), xc, ccs_t, lambda_icd=0.6, lambda_ccs=0.4, impl=impl, **kw)
    total.backward()
    ri, rc = icd.double().requires_grad_(), ccs.double().requires_grad_()
    want = ref.multitask_focal_loss(ri, icd_t.double(), rc, ccs_t.double(), lambda_icd=0.6, lambda_ccs=0.4, **kw)
    want.backward()
    torch.testing.assert_close(total.double(), want.detach(), rtol=1e-5, atol=0)
    close(xi.grad, ri.grad)
    close(xc.grad, rc.grad)
    # Both heads in one call (λ folded into each head's scale, one sum): the two separate calls'
    # weighted sum to fp32 rounding (a few ulps).
    separate = (0.6 * focal_loss(icd, icd_t, impl=impl, **kw) + 0.4 * focal_loss(ccs, ccs_t, impl=impl, **kw))
    torch.testing.assert_close(total.detach(), separate, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph(impl):
    icd, icd_t = make_inputs(2, 300, seed=59)
    ccs, ccs_t = make_inputs(2, 30, seed=61)

    def step(a, b):
        return multitask_focal_loss(a * 1.5, icd_t, b, ccs_t, impl=impl, gamma=2.0)

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if impl == "triton" else "aot_eager")
    xa, xb = icd.clone().requires_grad_(), ccs.clone().requires_grad_()
    got = compiled(xa, xb)
    got.backward()
    ya, yb = icd.clone().requires_grad_(), ccs.clone().requires_grad_()
    want = step(ya, yb)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(xa.grad, ya.grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(xb.grad, yb.grad, rtol=1e-6, atol=1e-12)


def _bad_calls():
    x, t = make_inputs(2, 8, seed=67)
    return [
        ("targets", lambda: focal_loss(x, t[:, :7])),
        ("targets", lambda: focal_loss(x, t * 1.5, check_targets=True)),
        ("targets", lambda: focal_loss(x, t - 0.5, check_targets=True)),
        ("targets", lambda: focal_loss(x, (t * 2).to(torch.uint8), check_targets=True)),
        ("ccs_targets", lambda: multitask_focal_loss(x, t, x, t * 1.5, check_targets=True)),
        ("targets", lambda: focal_loss(x, t.long())),
        ("alpha", lambda: focal_loss(x, t, alpha=1.5)),
        ("alpha", lambda: focal_loss(x, t, alpha=-0.1)),
        ("alpha", lambda: focal_loss(x, t, alpha=math.nan)),
        ("gamma", lambda: focal_loss(x, t, gamma=-1.0)),
        ("gamma", lambda: focal_loss(x, t, gamma=math.nan)),
        ("reduction", lambda: focal_loss(x, t, reduction="avg")),
        ("logits", lambda: focal_loss(x[:0], t[:0])),
        ("logits", lambda: focal_loss(x[:, :0], t[:, :0])),
        ("logits", lambda: focal_loss(x[0], t[0])),
        ("logits", lambda: focal_loss(x.long(), t)),
        ("impl", lambda: focal_loss(x, t, impl="cuda")),
        ("impl", lambda: multitask_focal_loss(x, t, x, t, impl="cuda")),
        ("focal_kwargs", lambda: multitask_focal_loss(x, t, x, t, gama=2.0)),
        ("icd_targets", lambda: multitask_focal_loss(x, t[:1], x, t)),
        ("ccs_logits", lambda: multitask_focal_loss(x, t, x[:0], t[:0])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{name}\b|\b{name}\b"):
        call()


# ------------------------------------------------------------------ per-call cost (issue 19)
kernels_module = importlib.import_module("marn_fast.kernels.focal_loss")


class no_host_reads:
    """Every Python-side read of a tensor's value (item, float/int/bool, tolist, aminmax: what a
    host synchronisation on a GPU goes through) raises inside the block."""
    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __enter__(self):
        def forbidden(*args, **kwargs):
            raise AssertionError("a tensor's value was read on the host (a device synchronisation)")
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self.aminmax = torch.aminmax
        for n in self.NAMES:
            setattr(torch.Tensor, n, forbidden)
        torch.aminmax = forbidden
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        torch.aminmax = self.aminmax


@pytest.mark.parametrize("impl", IMPLS)
def test_no_host_read_unless_the_target_check_is_asked(impl, monkeypatch):
    """Out-of-range targets pass unseen (no value is read) unless check_targets=True or
    MARN_FAST_CHECK_TARGETS=1; check_targets=False wins over the variable."""
    monkeypatch.delenv("MARN_FAST_CHECK_TARGETS", raising=False)
    logits, targets = make_inputs(2, 88, seed=73)
    bad = targets * 1.5
    x = on_triton_device(logits) if impl == "triton" else logits
    x = x.clone().requires_grad_()
    y, y_bad = ((on_triton_device(t) if impl == "triton" else t) for t in (targets, bad))
    arg = IMPL_ARG.get(impl, impl)
    with no_host_reads():
        loss = _focal_loss(x, y_bad, impl=arg)
        loss.backward()
        _multitask_focal_loss(x, y, x, y_bad, impl=arg).backward()
        _focal_loss(x, y_bad, impl=arg, reduction="none").sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="targets: values must lie in"):
        _focal_loss(x, y_bad, impl=arg, check_targets=True)
    monkeypatch.setenv("MARN_FAST_CHECK_TARGETS", "1")
    with pytest.raises(ValueError, match="targets: values must lie in"):
        _focal_loss(x, y_bad, impl=arg)
    with pytest.raises(ValueError, match="ccs_targets: values must lie in"):
        _multitask_focal_loss(x, y, x, y_bad, impl=arg)
    _focal_loss(x, y, impl=arg)  # in range: passes the check
    with no_host_reads():
        _focal_loss(x, y_bad, impl=arg, check_targets=False)
    monkeypatch.setenv("MARN_FAST_CHECK_TARGETS", "0")
    with no_host_reads():
        _focal_loss(x, y_bad, impl=arg)


class count_launches:
    """Counts launches of the Triton focal-loss kernel and the ATen ops that compute (views,
    allocations and metadata are not launches) inside the block, outside the kernel (the CPU
    interpreter runs ATen copies of its own inside a launch)."""
    FREE = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "alias", "slice", "detach",
            "as_strided", "t", "reshape", "expand"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.kernels, self.ops, self.in_kernel = 0, [], False
        real = kernels_module.focal_loss_kernel

        class Counting:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    outer.kernels += 1
                    outer.in_kernel = True
                    try:
                        return real[grid](*args, **kwargs)
                    finally:
                        outer.in_kernel = False
                return launch

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in outer.FREE and not outer.in_kernel:
                    outer.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.real = real
        kernels_module.focal_loss_kernel = Counting()
        self.mode = Ops()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        kernels_module.focal_loss_kernel = self.real


@pytest.mark.parametrize("multitask", [False, True])
def test_triton_path_is_one_launch_each_way(multitask):
    """Forward: one kernel launch (the reduction to the scalar included), no other compute op;
    backward: one multiply. Two heads: still one launch each way."""
    icd, icd_t = (on_triton_device(t) for t in make_inputs(2, 3000, seed=79))
    ccs, ccs_t = (on_triton_device(t) for t in make_inputs(2, 40, seed=83))
    xi, xc = icd.clone().requires_grad_(), ccs.clone().requires_grad_()
    g = torch.tensor(0.5, device=icd.device)
    icd_b = icd_t.bool()
    with count_launches() as fwd:
        loss = (_multitask_focal_loss(xi, icd_b, xc, ccs_t, impl="triton") if multitask
                else _focal_loss(xi, icd_b, impl="triton"))
    assert (fwd.kernels, fwd.ops) == (1, [])
    with count_launches() as bwd:
        grads = torch.autograd.grad(loss, [xi, xc] if multitask else [xi], g)
    assert (bwd.kernels, bwd.ops) == (0, ["mul"])
    want = (ref.multitask_focal_loss(icd.double(), icd_t.double(), ccs.double(), ccs_t.double()) if multitask
            else ref.focal_loss(icd.double(), icd_t.double()))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    assert all(torch.isfinite(d).all() for d in grads)


def test_triton_reduction_ticket_is_reset_and_results_repeat():
    """The last program resets the ticket counter: many calls in a row (two sizes, one and two
    heads) give the same, correct results."""
    logits, targets = (on_triton_device(t) for t in make_inputs(3, 2500, seed=89))
    first = _focal_loss(logits, targets, impl="triton")
    for _ in range(3):
        _multitask_focal_loss(logits, targets, logits[:, :100], targets[:, :100], impl="triton")
        assert torch.equal(_focal_loss(logits, targets, impl="triton"), first)
    ticket = kernels_module._ticket(logits.device)
    assert ticket.cpu().item() == 0


def test_available_impls_and_reference_impl():
    ops_fl = ops_module
    logits, targets = make_inputs(2, 30, seed=97)
    impls = ops_fl.available_impls(logits, targets)
    assert impls[:2] == ("reference", "torch") and "auto" not in impls
    assert ("triton" in impls) == (TRITON_DEVICE == "cpu")  # the interpreter runs CPU tensors here
    for impl in impls:
        x = logits.clone().requires_grad_()
        loss = _focal_loss(x, targets, impl=impl, alpha=ALPHA, gamma=1.5)
        loss.backward()
        want, want_grad = reference_loss_and_grad(logits, targets, "mean", alpha=ALPHA, gamma=1.5)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
        close(x.grad, want_grad)


SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from marn_fast.kernels.focal_loss import focal_loss_kernel as fn

for x, reduce, two in [("*bf16", True, True), ("*fp32", True, False), ("*fp32", False, False)]:
    acc = "*fp32" if reduce else x
    types = dict(xa_ptr=x, ya_ptr="*u8", xb_ptr=x, yb_ptr="*fp32", loss_ptr=acc, grad_ptr=x, partial_ptr=acc,
                 ticket_ptr="*i32" if reduce else x, n_a="i32", n_b="i32", programs_a="i32", alpha="fp32",
                 gamma="fp32", scale_a="fp32", scale_b="fp32")
    constexprs = dict(BALANCED=False, REDUCE=reduce, COMPUTE_GRAD=True, TWO_HEADS=two, FP64=False, BLOCK=1024)
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests compile the kernel for it")
def test_triton_kernel_compiles_for_sm90():
    """The GPU compiler without a GPU (a subprocess: the tests import the kernel under the
    interpreter): one and two heads with the in-kernel reduction, and the per-element loss."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@requires_cuda
def test_cuda_no_sync_per_call():
    """torch.cuda's sync debug mode raises on any synchronising call during forward + backward."""
    logits, targets = make_inputs(16, 9216, seed=101)
    x = logits.cuda().requires_grad_()
    y = targets.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _focal_loss(x, y).backward()
        _multitask_focal_loss(x, y.bool(), x[:, :295], y[:, :295]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bf16_cuda(balanced, reduction):
    logits, targets = make_inputs(16, 9216, seed=71)
    logits, targets = logits.cuda().bfloat16(), targets.cuda()
    w = upstream(reduction, logits.shape, seed=7)
    w = None if w is None else w.cuda()
    for tgt in (targets, targets.bool()):
        loss, grad = fused_loss_and_grad(logits, tgt, reduction, w, alpha=ALPHA, balanced=balanced)
        assert grad.dtype == torch.bfloat16
        assert loss.dtype == (torch.bfloat16 if reduction == "none" else torch.float32)
        ref_loss, ref_grad = reference_loss_and_grad(logits, targets, reduction, w, alpha=ALPHA, balanced=balanced)
        close(loss.cpu(), ref_loss.cpu(), rtol=2e-2, atol_frac=1e-2)
        close(grad.cpu(), ref_grad.cpu(), rtol=2e-2, atol_frac=1e-2)
