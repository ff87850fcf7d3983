"""RAM implementations (marn_fast.ops.ram: "extension" = csrc/*/ram_*, "vendor_conv" =
ops/ram_vendor.py + kernels/ram.py) against the reference RAM (nn.Conv1d / ConvTranspose1d /
BatchNorm1d / tanh): forward, input and parameter gradients, running statistics, train and eval,
odd lengths and channel counts, opcheck, bad input. The vendor_conv candidate is tested with both
its pass implementations on the CPU: torch ops (its CPU path) and the Triton kernels (its CUDA
path) under TRITON_INTERPRET=1, which conftest sets.

Tolerance: error = max|fused − ref| / max(max|ref|, 1); float64 ≤ 1e-9, float32 ≤ 2e-4 (the GEMMs
sum in another order and fp32 tanh is a rational fit with |error| < 5e-7), bfloat16 (CUDA) ≤ 5e-2.
Where BatchNorm normalises few values per channel (it amplifies any rounding), a float32 gradient
may also use 3× the reference module's own error against a float64 run of it.
"""
import contextlib
import copy
import importlib
from unittest import mock

import pytest
import torch
from conftest import requires_cuda
from torch import nn

from marn_fast.kernels import interpreting
from marn_fast.ops import cpu_extension_available
from marn_fast.ops.ram import (
    EPILOGUE_ADD,
    EPILOGUE_MUL,
    EPILOGUE_MUL_TANH,
    EPILOGUE_NONE,
    available_impls,
    conv_weight,
    folded_block,
    ram_block,
    ram_forward,
)
from marn_fast.reference.ram import RAM
from marn_fast.reference.ram import ram_block as reference_block

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="marn_fast._C not built")

TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-2}
EPILOGUES = (EPILOGUE_NONE, EPILOGUE_ADD, EPILOGUE_MUL, EPILOGUE_MUL_TANH)


def rel_err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), 1.0)


def assert_close(got, want, dtype, what, slack=0.0):
    """Relative (to max(|want|, 1)) max error within TOL[dtype] + slack."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err <= TOL[dtype] + slack, f"{what}: relative error {err:.3g} > {TOL[dtype]:g} + {slack:.3g}"


@pytest.fixture(autouse=True)
def _fixed_weights():
    """Every test draws its modules' conv weights from the same global seed, whatever ran before it:
    BatchNorm over a few values per channel is ill-conditioned for some draws, and a test's outcome
    must not depend on the order of the suite."""
    torch.manual_seed(1234)


def randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Random BN affine parameters and running statistics (not the defaults), and conv weights."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(3)


def make_pair(module: nn.Module, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    randomise_bn(module, gen)
    module = module.to(device=device, dtype=dtype)
    return module, copy.deepcopy(module)


def grads_of(module):
    return [p.grad for p in module.parameters()]


def compare_modules(fused, ref, dtype, what, exact=None):
    """Gradients and buffers of fused vs ref. exact: the same module run in float64, when given:
    each comparison may then also use 3× ref's own error against it (BatchNorm over two values
    per channel amplifies rounding, whichever implementation does it)."""
    exact_grads = [None] * len(list(ref.parameters())) if exact is None else [q.grad for q in exact.parameters()]
    for (name, p), q, e in zip(fused.named_parameters(), ref.parameters(), exact_grads):
        assert p.grad is not None, f"{what}: no gradient for {name}"
        assert_close(p.grad, q.grad, dtype, f"{what}: grad {name}", 0.0 if e is None else 3 * rel_err(q.grad, e))
    for (name, b), c in zip(fused.named_buffers(), ref.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c), f"{what}: {name} {b.item()} != {c.item()}"
        assert_close(b.to(torch.float64), c.to(torch.float64), dtype, f"{what}: buffer {name}")


# ------------------------------------------------------------------------------------------ one block
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("b,n", [(1, 2), (2, 1), (3, 3), (2, 37)])
def test_block_matches_reference(dtype, training, transposed, epilogue, b, n):
    c_in, c_out = 6, 5
    fused, ref = make_pair(reference_block(c_in, c_out, transposed), dtype, seed=b * 100 + n)
    fused.train(training)
    ref.train(training)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(b, n, c_in, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    other = None
    if epilogue != EPILOGUE_NONE:
        other = torch.randn(b, n, c_out, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    other_ref = None if other is None else other.detach().clone().requires_grad_()
    exact = copy.deepcopy(ref).double() if dtype == torch.float32 else None

    def reference(module, x_in, other_in):
        v = module(x_in.transpose(1, 2)).transpose(1, 2)
        return {EPILOGUE_NONE: lambda: v, EPILOGUE_ADD: lambda: v + other_in, EPILOGUE_MUL: lambda: v * other_in,
                EPILOGUE_MUL_TANH: lambda: torch.tanh(v * other_in)}[epilogue]()

    out = ram_block(fused, x, other, epilogue)
    want = reference(ref, x_ref, other_ref)
    assert_close(out, want, dtype, "forward")
    # The gradient of a transposed view: non-contiguous on purpose.
    g = torch.randn(b, c_out, n, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    out.backward(g)
    want.backward(g)
    if exact is not None:  # BatchNorm over 2 values per channel: rounding amplified (see compare_modules)
        reference(exact, x.detach().double(), None if other is None else other.detach().double()).backward(g.double())
    assert_close(x.grad, x_ref.grad, dtype, "grad x")
    if other is not None:
        assert_close(other.grad, other_ref.grad, dtype, "grad other")
    compare_modules(fused, ref, dtype, "block", exact)


# ------------------------------------------------------------------------------------------ whole RAM
ram_ops = importlib.import_module("marn_fast.ops.ram")
# The implementations tested here: every name ram_forward takes, and "vendor_conv[triton]" — the
# vendor_conv candidate with its CUDA passes (Triton) forced onto CPU tensors (the interpreter).
TRITON_FORCED = "vendor_conv[triton]"
# "reference" is the module itself and "auto" the extension (test_auto_is_the_extension...). The
# forced Triton passes need the interpreter (a GPU machine tests them on CUDA tensors instead).
CPU_IMPLS = ("extension", "vendor_conv") + ((TRITON_FORCED,) if interpreting() else ())
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_interpreter_or_cuda = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def impl_context(impl):
    """(the impl argument of ram_forward, a context that forces the Triton passes when asked)."""
    if impl == TRITON_FORCED:
        return "vendor_conv", mock.patch.object(ram_ops, "_vendor_uses_triton", lambda x: True)
    return impl, contextlib.nullcontext()


def run_both(channels, b, n, dtype, training, output_tanh=True, device="cpu", seed=0, impl="auto",
             momentum=0.1, steps=1):
    """The implementation and the reference on the same random module and input: forward, every
    gradient, every buffer (running statistics, num_batches_tracked) after `steps` calls."""
    impl_arg, forced = impl_context(impl)
    fused, ref = make_pair(RAM(channels, output_tanh=output_tanh), dtype, device, seed)
    for module in (fused, ref):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = momentum
    for _ in range(steps - 1):  # earlier training steps: only their running statistics matter
        h = torch.randn(b, channels, n, dtype=dtype, device=device)
        with forced:
            ram_forward(fused.train(), h, impl=impl_arg)
        ref.train()(h)
    fused.train(training)
    ref.train(training)
    gen = torch.Generator().manual_seed(seed + 1)
    # h is H^T: a transposed view of [B, n, C], as marn_fast.MARN passes it.
    h = torch.randn(b, n, channels, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    h = h.transpose(1, 2).requires_grad_()
    h_ref = h.detach().clone().requires_grad_()
    exact = copy.deepcopy(ref).double() if dtype == torch.float32 else None
    with forced:
        out = ram_forward(fused, h, impl=impl_arg)
    want = ref(h_ref)
    assert_close(out, want, dtype, "RAM forward")
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    with forced:
        out.backward(g)
    want.backward(g)
    slack = 0.0
    if exact is not None:
        h_exact = h_ref.detach().double().requires_grad_()
        exact(h_exact).backward(g.double())
        # BatchNorm over a few values per channel amplifies rounding, in whichever implementation
        # (and the thread split of ATen's reductions varies it from run to run): as for the
        # parameter gradients, allow 3× the reference's own error against float64.
        slack = 3 * rel_err(h_ref.grad, h_exact.grad)
    assert_close(h.grad, h_ref.grad, dtype, "RAM grad h", slack)
    compare_modules(fused, ref, dtype, "RAM", exact)
    return fused, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("b,n", [(1, 2), (2, 1), (1, 3), (3, 4), (2, 4001)])
def test_ram_matches_reference(dtype, training, b, n):
    run_both(8, b, n, dtype, training)


# ------------------------------------------------------------------------------------------ every impl
# Odd lengths and channel counts (C = 9: 9 → 4 → 2 → 2 → 4 → 9; 13: 6, 3), one length-1 sequence,
# the output with and without tanh.
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels,b,n,output_tanh", [(8, 1, 2, True), (12, 3, 7, False), (9, 2, 13, True),
                                                       (13, 5, 1, True)])
def test_every_impl_matches_reference(impl, dtype, training, channels, b, n, output_tanh):
    run_both(channels, b, n, dtype, training, output_tanh, seed=channels + n, impl=impl)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_every_impl_gradients_and_buffers_after_steps(impl, momentum):
    """Third training call (momentum, or None's cumulative average): gradients, running statistics
    and num_batches_tracked (3) as the reference's."""
    fused, _ = run_both(12, 2, 9, torch.float64, True, impl=impl, momentum=momentum, steps=3)
    assert int(fused.down1[1].num_batches_tracked) == 3 + 3  # make_pair starts it at 3


def test_available_impls_and_unavailable_impls_raise(monkeypatch):
    ram, h = RAM(8), torch.randn(2, 8, 5)
    assert available_impls(ram, h) == ("reference", "extension", "vendor_conv")
    assert available_impls(RAM(8).double(), h.double()) == ("reference", "extension", "vendor_conv")
    ram16, h16 = RAM(8).bfloat16(), h.bfloat16()
    assert available_impls(ram16, h16) == ("reference", "vendor_conv")  # bf16 on the CPU: oneDNN's convs
    with pytest.raises(ValueError, match="impl='extension' cannot run here: .*bfloat16"):
        ram_forward(ram16, h16, impl="extension")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert available_impls(ram, h) == ("reference", "vendor_conv")
    with pytest.raises(ValueError, match="impl: expected 'auto' or one of"):
        ram_forward(ram, h, impl="cudnn")
    monkeypatch.setattr(ram_ops, "extension_available_for", lambda t: False)
    assert available_impls(ram, h) == ("reference", "vendor_conv")
    with pytest.raises(ValueError, match="impl='extension' cannot run here: the compiled extension"):
        ram_forward(ram, h, impl="extension")


@pytest.mark.parametrize("training", [True, False])
def test_auto_is_the_extension_and_reference_is_the_module(training):
    """impl="auto" keeps today's path (the extension, bit for bit); "reference" is ram(h)."""
    base, _ = make_pair(RAM(8), torch.float32, seed=4)
    base.train(training)
    h = torch.randn(2, 8, 11, generator=torch.Generator().manual_seed(5))
    outs = {impl: ram_forward(copy.deepcopy(base), h, impl=impl) for impl in ("auto", "extension", "reference")}
    assert torch.equal(outs["auto"], outs["extension"])
    assert torch.equal(outs["reference"], copy.deepcopy(base)(h))


@pytest.mark.parametrize("forced", [False] + ([True] if interpreting() else []))
def test_vendor_conv_runs_its_triton_passes_only_when_they_apply(forced, monkeypatch):
    """On CPU tensors vendor_conv runs torch passes; forced (as on CUDA), every BatchNorm's pass is
    the Triton one: 10 fused passes in training, 10 in eval."""
    ram_vendor = importlib.import_module("marn_fast.ops.ram_vendor")
    calls = []
    real = ram_vendor._FusedPass.apply
    monkeypatch.setattr(ram_vendor._FusedPass, "apply", lambda *a: calls.append(a[4]) or real(*a))
    _, context = impl_context(TRITON_FORCED if forced else "vendor_conv")
    fused = RAM(8).double()
    with context:
        ram_forward(fused.train(), torch.randn(2, 8, 5, dtype=torch.float64), impl="vendor_conv")
        ram_forward(fused.eval(), torch.randn(2, 8, 5, dtype=torch.float64), impl="vendor_conv")
    assert calls == ([True] * 10 + [False] * 10 if forced else [])


def test_vendor_conv_bad_input():
    ram = RAM(8).train()
    with pytest.raises(ValueError, match="x: BatchNorm needs more than 1 value"):
        ram_forward(ram, torch.randn(1, 8, 1), impl="vendor_conv")
    with pytest.raises(ValueError, match="h: expected"):
        ram_forward(ram, torch.randn(2, 12, 5), impl="vendor_conv")


def test_vendor_conv_channels_last_convolution_matches_conv1d():
    ram_vendor = importlib.import_module("marn_fast.ops.ram_vendor")
    gen = torch.Generator().manual_seed(9)
    for b, n, c_in, c_out in [(2, 9, 6, 5), (1, 1, 3, 4), (3, 2, 8, 8)]:
        x = torch.randn(b, n, c_in, generator=gen, dtype=torch.float64)
        w = torch.randn(c_out, c_in, 3, generator=gen, dtype=torch.float64)
        bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
        z = ram_vendor.conv3(x, w, bias)
        assert z.shape == (b, n, c_out) and z.is_contiguous()
        want = torch.nn.functional.conv1d(x.transpose(1, 2), w, bias, padding=1).transpose(1, 2)
        torch.testing.assert_close(z, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ Triton passes
# The kernels of marn_fast.kernels.ram on [R, C] matrices: in the CPU interpreter (small shapes),
# or on the GPU where there is one.
# Tolerances: float64 1e-12 relative; float32 2e-6 relative to the largest value (fp32 sums of ≤ 10³
# terms).
def _kernels():
    return importlib.import_module("marn_fast.kernels.ram")


@requires_interpreter_or_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("r,c", [(2, 3), (37, 5), (300, 70), (1000, 17)])
def test_triton_batch_stats_and_running_update(dtype, r, c, monkeypatch):
    kernels = _kernels()
    monkeypatch.setattr(kernels, "BLOCK_P", 2)            # several combination steps
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 64)   # several row strips, a short last one
    gen = torch.Generator().manual_seed(r + c)
    z = (torch.randn(r, c, generator=gen, dtype=torch.float64) * 2 + 30).to(dtype)  # mean ≫ spread
    rm, rv = torch.randn(c, generator=gen, dtype=dtype), torch.rand(c, generator=gen, dtype=dtype) + 0.5
    want_rm, want_rv = 0.1 * torch.mean(z.double(), 0) + 0.9 * rm.double(), 0.1 * z.double().var(0) + 0.9 * rv.double()
    z_dev, rm_dev, rv_dev = (t.to(TRITON_DEVICE) for t in (z, rm, rv))
    mean, rstd = (t.cpu() for t in kernels.batch_stats(z_dev, 1e-5, rm_dev, rv_dev, 0.1))
    rm, rv = rm_dev.cpu(), rv_dev.cpu()
    var, want_mean = torch.var_mean(z.double(), 0, correction=0)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(mean.double(), want_mean, **tol)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), **tol)
    torch.testing.assert_close(rm.double(), want_rm, **tol)
    torch.testing.assert_close(rv.double(), want_rv, **tol)
    assert mean.dtype == rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


EPILOGUE_FLAGS = [("none", False), ("none", True), ("add", False), ("mul", False), ("mul", True)]


@requires_interpreter_or_cuda
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("other_kind,tanh", EPILOGUE_FLAGS)
def test_triton_fused_pass_matches_autograd(norm, other_kind, tanh):
    """out = epilogue(BN(z)) (batch statistics) or epilogue(z + b), forward and the gradients of
    z, γ, β (b) and other, float64, against autograd of the plain formula; the upstream gradient
    is a transposed (non-contiguous) view."""
    ram_vendor = importlib.import_module("marn_fast.ops.ram_vendor")
    gen = torch.Generator().manual_seed(17)
    r, c = 45, 7
    def leaf(*shape, positive=False):
        t = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.5 if positive else \
            torch.randn(*shape, generator=gen, dtype=torch.float64)
        return t.to(TRITON_DEVICE).requires_grad_()

    z, gamma, beta = leaf(r, c), leaf(c, positive=True), leaf(c)
    other = None if other_kind == "none" else leaf(r, c)
    mul = other_kind == "mul"
    out = ram_vendor._FusedPass.apply(z, gamma if norm else None, beta, other, norm, mul, tanh, 1e-5, None, None, 0.0)
    u = torch.nn.functional.batch_norm(z, None, None, gamma, beta, True, 0.0, 1e-5) if norm else z + beta
    v = u if other is None else (u * other if mul else u + other)
    want = torch.tanh(v) if tanh else v
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(c, r, generator=gen, dtype=torch.float64).to(TRITON_DEVICE).t()
    inputs = [t for t in (z, gamma if norm else None, beta, other) if t is not None]
    got = torch.autograd.grad(out, inputs, g)
    expected = torch.autograd.grad(want, inputs, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


# The GPU's compiler without a GPU: every RAM kernel, in the specialisations the RAM uses (bf16),
# lowered to sm_90 PTX by Triton's own toolchain (a subprocess: the tests import the kernels
# under the interpreter). Catches what the interpreter accepts and the compiler does not.
SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from marn_fast.kernels import ram as K

def compile_(fn, types, constexprs):
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})

z, acc, i = "*bf16", "*fp32", "i32"
tile = dict(FP64=False, BLOCK_R=64, BLOCK_C=64)
compile_(K._stats_partial_kernel, dict(z_ptr=z, pmean_ptr=acc, pm2_ptr=acc, R=i, C=i, rows_per_prog=i), tile)
compile_(K._stats_combine_kernel, dict(pmean_ptr=acc, pm2_ptr=acc, mean_ptr=acc, rstd_ptr=acc, rmean_ptr=z,
         rvar_ptr=z, R=i, C=i, P=i, rows_per_prog=i, eps_hi="fp32", eps_lo="fp32", mom_hi="fp32", mom_lo="fp32"),
         dict(UPDATE=True, FP64=False, BLOCK_P=32, BLOCK_C=64))
for norm, other, mul, tanh in [(True, False, False, True), (True, True, False, False), (True, True, True, True),
                               (False, False, False, True), (False, True, True, False)]:
    compile_(K._affine_epilogue_kernel, dict(z_ptr=z, other_ptr=z, out_ptr=z, mean_ptr=acc, rstd_ptr=acc,
             gamma_ptr=z, beta_ptr=z, R=i, C=i), dict(NORM=norm, HAS_OTHER=other, MUL=mul, TANH=tanh, **tile))
    compile_(K._affine_epilogue_backward_kernel, dict(g_ptr=z, z_ptr=z, out_ptr=z, other_ptr=z, gu_ptr=z,
             dother_ptr=z, partial_ptr=acc, mean_ptr=acc, rstd_ptr=acc, gamma_ptr=z, beta_ptr=z, R=i, C=i,
             rows_per_prog=i), dict(NORM=norm, MUL_OTHER=other and mul, NEED_U=norm or (other and mul), TANH=tanh,
                                    **tile))
compile_(K._batch_norm_backward_apply_kernel, dict(gu_ptr=z, z_ptr=z, dz_ptr=z, sums_ptr=acc, mean_ptr=acc,
         rstd_ptr=acc, gamma_ptr=z, R=i, C=i), tile)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests compile the kernels for it")
def test_triton_kernels_compile_for_sm90():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# C = 128 takes both conv paths of the CPU kernels (csrc/cpu/ram_winograd.h): the Winograd F(4, 3)
# where C_in·C_out ≥ 64·64 (128→64, 64→64, 64→128, 128→128) and oneDNN below (64→32, 32→32,
# 32→64); lengths around its 4-output tiles (1, 2, 5: partial tiles; 8: whole ones; 4001), with at
# least 5 values per channel (BatchNorm over 2 values amplifies any conv rounding beyond the tolerance).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("b,n", [(5, 1), (3, 2), (3, 5), (2, 8), (2, 4001)])
def test_ram_wide_channels_matches_reference(dtype, training, b, n):
    run_both(128, b, n, dtype, training, seed=n)


@pytest.mark.parametrize("training", [True, False])
def test_ram_batch_of_one_length_one_eval_and_no_output_tanh(training):
    if training:
        run_both(12, 3, 17, torch.float64, training, output_tanh=False)
    else:
        run_both(12, 1, 1, torch.float64, training)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ram_train_steps_update_running_stats_like_batchnorm(impl):
    """Three train steps (momentum 0.1, and momentum=None's cumulative average), then eval."""
    impl_arg, forced = impl_context(impl)
    fused, ref = make_pair(RAM(8), torch.float64)
    for module in (fused, ref):
        module.up2[4].momentum = None
        module.down1[1].momentum = 0.3
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        h = torch.randn(2, 8, 9 + step, generator=gen, dtype=torch.float64)
        with forced:
            assert_close(ram_forward(fused, h, impl=impl_arg), ref(h), torch.float64, f"step {step}")
    for (name, b), c in zip(fused.named_buffers(), ref.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c), name
        assert_close(b.double(), c.double(), torch.float64, name)
    fused.eval()
    ref.eval()
    h = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad(), forced:
        assert_close(ram_forward(fused, h, impl=impl_arg), ref(h), torch.float64, "eval after training")


def test_folded_eval_equals_unfolded_eval_and_cache_invalidates():
    fused, ref = make_pair(RAM(8), torch.float64)
    fused.eval()
    ref.eval()
    h = torch.randn(2, 8, 11, dtype=torch.float64)
    with torch.no_grad():
        first = ram_forward(fused, h)
        assert_close(first, ref(h), torch.float64, "folded eval")
        cached = folded_block(fused.down1, torch.float64)
        assert folded_block(fused.down1, torch.float64) is cached  # a hit: no re-folding
        # The folded weights are the conv weights scaled by γ/sqrt(running_var + eps).
        bn = fused.down1[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(cached[0], conv_weight(fused.down1[0]) * scale[:, None, None])
        torch.testing.assert_close(cached[1], bn.bias - bn.running_mean * scale)
        # In-place updates of a weight and of a running statistic invalidate the cache.
        for module in (fused, ref):
            module.up2[3].weight.mul_(1.5)
            module.down1[1].running_var.add_(0.25)
        second = ram_forward(fused, h)
        assert_close(second, ref(h), torch.float64, "eval after in-place weight update")
        assert not torch.allclose(first, second)
        # So does loading another state dict (new data_ptrs or versions).
        other, _ = make_pair(RAM(8), torch.float64, seed=5)
        other.eval()
        fused.load_state_dict(other.state_dict())
        assert_close(ram_forward(fused, h), other(h), torch.float64, "eval after load_state_dict")
    # With gradients flowing to the parameters, the fold is recomputed and differentiable.
    out = ram_forward(fused, h)
    out.sum().backward()
    assert fused.down1[1].weight.grad is not None and fused.down1[0].weight.grad is not None


def test_inference_mode_then_grad_mode():
    fused, ref = make_pair(RAM(8), torch.float32)
    fused.eval()
    ref.eval()
    h = torch.randn(2, 8, 6)
    with torch.inference_mode():
        ram_forward(fused, h)
    for p in fused.parameters():
        p.requires_grad_(False)
    hg = h.clone().requires_grad_()
    out = ram_forward(fused, hg)
    out.sum().backward()
    assert_close(out, ref(h), torch.float32, "eval after inference mode")


# ------------------------------------------------------------------------------------------ op checks
def _block_args(training, epilogue, dtype=torch.float64, b=2, n=5, c_in=4, c_mid=3, c_out=3):
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = r(b, n, c_in)
    w1, w2 = r(c_mid, c_in, 3), r(c_out, c_mid, 3)
    other = r(b, n, c_out) if epilogue != EPILOGUE_NONE else None
    if training:
        return (x, w1, torch.rand(c_mid, generator=gen, dtype=dtype) + 0.5, r(c_mid), w2,
                torch.rand(c_out, generator=gen, dtype=dtype) + 0.5, r(c_out), other, epilogue, 1e-5, 1e-3)
    return (x, w1, r(c_mid), w2, r(c_out), other, epilogue)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training, epilogue):
    op = torch.ops.marn_fast.ram_block_train if training else torch.ops.marn_fast.ram_block_eval
    args = _block_args(training, epilogue)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)
    outs = op(*args)
    g = torch.randn_like(outs[0])
    if training:
        x, w1, g1, _, w2, g2, b2, other, ep, e1, e2 = args
        _, z1, y1, z2, m1, v1, m2, v2 = outs
        bargs = (g, x, w1, g1, z1, y1, m1, v1, w2, g2, b2, z2, m2, v2, other, ep, e1, e2)
        torch.library.opcheck(torch.ops.marn_fast.ram_block_train_backward, tuple(
            a.detach() if isinstance(a, torch.Tensor) else a for a in bargs))
    else:
        x, w1, _, w2, _, other, ep = args
        _, y1, v2 = outs
        bargs = (g, x, w1, y1, w2, v2, other, ep)
        torch.library.opcheck(torch.ops.marn_fast.ram_block_eval_backward, tuple(
            a.detach() if isinstance(a, torch.Tensor) else a for a in bargs))


def test_opcheck_update_stats():
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    mean, var = torch.randn(4), torch.rand(4)
    want_m, want_v = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var * 10 / 9
    torch.library.opcheck(torch.ops.marn_fast.ram_bn_update_stats, (rm.clone(), rv.clone(), mean, var, 10, 0.1))
    torch.ops.marn_fast.ram_bn_update_stats(rm, rv, mean, var, 10, 0.1)
    torch.testing.assert_close(rm, want_m)
    torch.testing.assert_close(rv, want_v)


def test_torch_compile_fullgraph_eval():
    fused, ref = make_pair(RAM(8), torch.float32)
    fused.eval()
    ref.eval()
    h = torch.randn(2, 8, 13)
    compiled = torch.compile(lambda t: ram_forward(fused, t), fullgraph=True)
    assert_close(compiled(h), ref(h), torch.float32, "compiled")


# ------------------------------------------------------------------------------------------ bad input
def _call_eval(**overrides):
    x, w1, b1, w2, b2, other, ep = _block_args(False, EPILOGUE_ADD)
    kw = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, other=other, epilogue=ep)
    kw.update(overrides)
    return torch.ops.marn_fast.ram_block_eval(*kw.values())


@pytest.mark.parametrize("overrides,match", [
    (dict(w1=torch.randn(3, 5, 3, dtype=torch.float64)), "w1 must have 4 input channels"),
    (dict(w2=torch.randn(3, 2, 3, dtype=torch.float64)), "w2 must have 3 input channels"),
    (dict(w1=torch.randn(3, 4, 5, dtype=torch.float64)), "w1 must have kernel size 3"),
    (dict(b2=torch.randn(4, dtype=torch.float64)), "b2 must have shape"),
    (dict(x=torch.randn(2, 4, 5, dtype=torch.float64).transpose(1, 2)), "x must be contiguous"),
    (dict(other=torch.randn(2, 3, 5, dtype=torch.float64).transpose(1, 2)), "other must be contiguous"),
    (dict(w1=torch.randn(3, 4, 3)), "w1 must have dtype"),
    (dict(other=None), "other is required"),
    (dict(epilogue=7), "epilogue must be"),
])
def test_bad_input_raises_naming_argument(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        _call_eval(**overrides)


def test_mixed_device_raises_in_cpu_kernel():
    x, w1, b1, w2, b2, other, ep = _block_args(False, EPILOGUE_NONE)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="w2 must be on x's device"):
        torch.ops.marn_fast.ram_block_eval.default.redispatch(cpu, x, w1, b1, w2.to("meta"), b2, other, ep)


def test_ram_forward_bad_input():
    ram = RAM(8)
    with pytest.raises(ValueError, match="h: expected"):
        ram_forward(ram, torch.randn(2, 12, 5))
    with pytest.raises(ValueError, match="x: BatchNorm needs more than 1 value"):
        ram_forward(ram.train(), torch.randn(1, 8, 1))
    with pytest.raises(ValueError, match="one device"):
        ram_forward(ram, torch.randn(2, 8, 5, device="meta"))


def test_train_op_rejects_single_value():
    args = list(_block_args(True, EPILOGUE_NONE, b=1, n=1))
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torch.ops.marn_fast.ram_block_train(*args)


# ------------------------------------------------------------------------------------------ bf16 (CPU)
# The CPU's bf16 path: oneDNN convolutions and ATen passes (the Triton passes run on CUDA only,
# where test_ram_cuda_matches_reference holds them in bf16).
BF16_IMPLS = ("vendor_conv",)


def _bf16_runs(fused_fn, channels, b, n, training, autocast, seed):
    """(fused, eager) results [forward, grad h, parameter grads..., buffers...] of a bf16 run and
    the fp32 reference's on the same bf16-rounded parameters and input. autocast: fp32 modules
    under torch.autocast("cpu", bf16); else bf16 modules and input."""
    base, _ = make_pair(RAM(channels), torch.float32, "cpu", seed)
    base = base.bfloat16().float()  # parameters exactly representable in bf16
    gen = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(b, n, channels, generator=gen).bfloat16().float().transpose(1, 2)
    g = torch.randn(b, channels, n, generator=gen)
    runs = {}
    for name in ("fused", "eager", "ref"):
        module = copy.deepcopy(base).train(training)
        low = name != "ref"
        if low and not autocast:
            module = module.bfloat16()
        x = (h.bfloat16() if low and not autocast else h).detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low and autocast):
            out = fused_fn(module, x) if name == "fused" else module(x)
        out.backward(g.to(out.dtype))
        runs[name] = [out, x.grad] + [q.grad for q in module.parameters()] + list(module.buffers())
    names = ["forward", "grad h"] + [f"grad {k}" for k, _ in base.named_parameters()] + \
            [f"buffer {k}" for k, _ in base.named_buffers()]
    return names, runs


@pytest.mark.parametrize("impl", BF16_IMPLS)
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels,b,n", [(16, 2, 37), (13, 3, 1)])
def test_cpu_bf16_matches_reference(impl, autocast, training, channels, b, n):
    """bf16 on the CPU — fp32 modules under autocast, or bf16 modules and input — against the fp32
    module on the same bf16-rounded values, held to the eager bf16 module's own error (as on
    CUDA): the fused path's bf16 convolutions and fp32 BatchNorm statistics are the eager ones, so
    its error is the format's. Bound: 3 × eager's error + 1e-2 (forward, grad h, buffers), 2 ×
    eager's error + 2^-6 for parameter gradients (accumulated in another order; BatchNorm over
    three values per channel at n = 1 makes eager's own error 0.3 there). Under autocast the
    output is bf16 (autocast's conv dtype), the gradients and running statistics fp32."""
    impl_arg, forced = impl_context(impl)

    def fused_fn(module, x):
        with forced:
            out = ram_forward(module, x, impl=impl_arg)
        assert out.dtype == torch.bfloat16
        return out

    names, runs = _bf16_runs(fused_fn, channels, b, n, training, autocast, seed=channels + n)
    for i, what in enumerate(names):
        want, got, eager = runs["ref"][i], runs["fused"][i], runs["eager"][i]
        if what.endswith("num_batches_tracked"):
            assert torch.equal(got, want), what
            continue
        if what.startswith("grad") or what.startswith("buffer"):
            assert got.dtype == (torch.float32 if autocast else eager.dtype), f"{what} dtype {got.dtype}"
        err, eager_err = rel_err(got, want), rel_err(eager, want)
        bound = 2 * eager_err + 2 ** -6 if what.startswith("grad ") and what != "grad h" else 3 * eager_err + 1e-2
        assert err <= bound, f"bf16 {what}: error {err:.3g}, eager bf16 {eager_err:.3g}, bound {bound:.3g}"


# ------------------------------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("impl", ["extension", "vendor_conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("b,n", [(1, 2), (3, 4), (2, 4001)])
def test_ram_cuda_matches_reference(no_tf32, impl, dtype, training, b, n):
    if dtype == torch.bfloat16:
        # bf16 storage through ten convolutions and five BatchNorms: the error against an fp32
        # run (on the same bf16-rounded parameters and input) is the format's, so the fused path
        # is held to the eager bf16 module's own error on the same input. Parameter gradients:
        # that error plus one bf16 step of the largest value (2^-8, for entries where eager's
        # error is near zero); the weight gradients accumulate in fp32 across documents like
        # cuDNN's (csrc/ram_gemm.h). Forward, grad h and buffers: at most three times it plus
        # 1e-2 (the fused path rounds each conv tap's product to bf16 before the shift-sum).
        # Measured on an H200 at n=4001 (train) before the fp32 accumulation: forward within
        # eager's error; the worst weight gradient 0.041 against eager's 0.014.
        fused, ref = make_pair(RAM(16), torch.float32, "cuda")
        fused = fused.to(torch.bfloat16)
        eager, ref = copy.deepcopy(fused), copy.deepcopy(fused).float()
        for m in (fused, eager, ref):
            m.train(training)
        h = torch.randn(b, 16, n, device="cuda").to(torch.bfloat16)
        g = torch.randn(b, 16, n, device="cuda")
        runs = {}
        for name, module, fn in (("fused", fused, lambda m, x: ram_forward(m, x, impl=impl)),
                                 ("eager", eager, lambda m, x: m(x)),
                                 ("ref", ref, lambda m, x: m(x))):
            x = (h.float() if name == "ref" else h).detach().requires_grad_()
            out = fn(module, x)
            out.backward(g.to(out.dtype))
            runs[name] = [out, x.grad] + [q.grad for q in module.parameters()] + list(module.buffers())
        names = ["forward", "grad h"] + [f"grad {k}" for k, _ in fused.named_parameters()] + \
                [f"buffer {k}" for k, _ in fused.named_buffers()]
        for i, what in enumerate(names):
            want = runs["ref"][i]
            err, eager_err = rel_err(runs["fused"][i], want), rel_err(runs["eager"][i], want)
            bound = eager_err + 2 ** -8 if what.startswith("grad ") and what != "grad h" else 3 * eager_err + 1e-2
            assert err <= bound, f"bf16 {what}: error {err:.3g}, eager bf16 {eager_err:.3g}, bound {bound:.3g}"
    else:
        run_both(16, b, n, dtype, training, device="cuda", impl=impl)
        if impl == "vendor_conv":  # odd channel counts, no output tanh, momentum=None steps
            run_both(13, b, n + 2, dtype, training, output_tanh=False, device="cuda", impl=impl,
                     momentum=None, steps=2)


@requires_cuda
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_opcheck_cuda(training, epilogue):
    op = torch.ops.marn_fast.ram_block_train if training else torch.ops.marn_fast.ram_block_eval
    args = tuple(a.cuda().requires_grad_() if isinstance(a, torch.Tensor) else a
                 for a in _block_args(training, epilogue, dtype=torch.float32))
    torch.library.opcheck(op, args)
