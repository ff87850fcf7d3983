"""The RAM (paper §3.2): h [B, C, n] (H^T) → O [B, C, n], by one of three implementations.

`ram_forward(ram, h, impl)`; `available_impls(ram, h)` names those that can run on h:
- "reference": the module itself, `ram(h)` (plain nn.Conv1d / BatchNorm1d / tanh), any device.
- "extension": the fused block ops of csrc/ (below); CPU (fp32, fp64) and CUDA builds.
- "vendor_conv": the convolutions by cuDNN / oneDNN, BatchNorm, tanh and the epilogues fused in
  between (`marn_fast.ops.ram_vendor`; Triton passes on CUDA, torch ops on the CPU).
Precision: the fused implementations compute in `ops.precision.compute_dtype(h)` — h's dtype, or
under torch.autocast the autocast dtype (bf16 convolutions by oneDNN on the CPU's matrix units or
cuDNN) — with the conv weights cast to it and the BatchNorms' statistics, running statistics and
affine parameters in fp32 (fp64 for fp64); the output is in the compute dtype, as autocast's
convolutions return. "extension" takes fp32/fp64 on the CPU (and every float dtype on CUDA), so
bf16 on the CPU is "vendor_conv"'s; "reference" is the module under the caller's autocast.
"auto" is the measured dispatcher's choice among `available_impls` for this call's key
(ops/dispatch.py; the trial runs on a copy of the module, so only the real call updates the
running statistics); where nothing is measured, the static `default_impl`: the extension where
it has kernels for h, the plain module path elsewhere (block by block: a block whose layout
differs from the reference's runs its own modules).

"extension": each block conv(k=3) → BN → tanh → conv(k=3) → BN runs as one op of csrc/ (`ram_block_eval`,
`ram_block_train`) over channels-last activations x [B, n, C] (H's own layout: H^T costs no copy),
with the block's fusion epilogue:
    D1 = down1(H), D2 = down2(D1), L1 = lateral(D2),
    U1 = up1(L1) + D1            (epilogue ADD, other = D1)
    O  = tanh(up2(U1) ⊙ H)       (epilogue MUL_TANH, other = H; MUL when output_tanh=False).
Every k=3 conv is one GEMM [B·n, C_in] × [C_in, 3·C_out] plus a shift-sum fused into the next pass;
a ConvTranspose1d (stride 1, pad 1) enters as the conv with weight_t.transpose(0, 1).flip(2).

Eval: BN folded into the conv, w' = w·s, b' = β − μ·s, s = γ/sqrt(σ² + eps); the folded tensors are
cached per block, keyed on the parameters' and buffers' `_version` and data_ptr (used when no
gradient reaches the parameters; otherwise folded afresh so autograd reaches γ, β, w).
Train: BN on batch statistics over (B, n) (biased variance), the running statistics updated in
place exactly as nn.BatchNorm1d (momentum, or the cumulative average when momentum is None; the
unbiased variance; num_batches_tracked += 1). Backward: `ram_block_*_backward` in the extension,
from the saved conv outputs and batch statistics.

Parameters and buffers are read from the reference `marn_fast.reference.RAM`, so state_dicts are
the reference's; every implementation updates the running statistics exactly once per training
call, as the module does.
"""
from __future__ import annotations

import weakref
from copy import deepcopy
from typing import Optional, Tuple, cast

import torch
from torch import nn

from ..reference.checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference.ram import KERNEL_SIZE, PADDING, RAM
from . import dispatch, ram_vendor
from ._backend import triton_available
from ._extension import cpu_extension_available, extension_available_for
from .mul_tanh import mul_tanh
from .precision import autocast_off, compute_dtype

# Epilogue codes of the block ops (mirror csrc/ram_common.h).
EPILOGUE_NONE, EPILOGUE_ADD, EPILOGUE_MUL, EPILOGUE_MUL_TANH = 0, 1, 2, 3
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The compute dtypes each fused implementation takes, per device type.
_DTYPES = {"extension": {"cpu": (torch.float32, torch.float64), "cuda": _CUDA_DTYPES},
           "vendor_conv": {"cpu": (torch.float32, torch.float64, torch.bfloat16), "cuda": _CUDA_DTYPES}}
IMPLS = ("reference", "extension", "vendor_conv")

if cpu_extension_available():
    def _stats_dtype(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("marn_fast::ram_block_eval")
    def _eval_fake(x, w1, b1, w2, b2, other, epilogue):
        b, n, _ = x.shape
        v2_shape = (b, n, w2.shape[0]) if epilogue >= EPILOGUE_MUL else (0,)
        return x.new_empty(b, n, w2.shape[0]), x.new_empty(b, n, w1.shape[0]), x.new_empty(v2_shape)

    @torch.library.register_fake("marn_fast::ram_block_eval_backward")
    def _eval_backward_fake(grad, x, w1, y1, w2, v2, other, epilogue):
        d_other = torch.empty_like(grad) if epilogue >= EPILOGUE_MUL else grad.new_empty(0)
        return (torch.empty_like(x), torch.empty_like(w1), x.new_empty(w1.shape[0]), torch.empty_like(w2),
                x.new_empty(w2.shape[0]), d_other)

    @torch.library.register_fake("marn_fast::ram_block_train")
    def _train_fake(x, w1, gamma1, beta1, w2, gamma2, beta2, other, epilogue, eps1, eps2):
        b, n, _ = x.shape
        cm, co = w1.shape[0], w2.shape[0]
        stats = dict(dtype=_stats_dtype(x), device=x.device)
        return (x.new_empty(b, n, co), x.new_empty(b, n, cm), x.new_empty(b, n, cm), x.new_empty(b, n, co),
                torch.empty(cm, **stats), torch.empty(cm, **stats), torch.empty(co, **stats),
                torch.empty(co, **stats))

    @torch.library.register_fake("marn_fast::ram_block_train_backward")
    def _train_backward_fake(grad, x, w1, gamma1, z1, y1, mean1, var1, w2, gamma2, beta2, z2, mean2, var2,
                             other, epilogue, eps1, eps2):
        d_other = torch.empty_like(grad) if epilogue >= EPILOGUE_MUL else grad.new_empty(0)
        return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(gamma1), torch.empty_like(gamma1),
                torch.empty_like(w2), torch.empty_like(gamma2), torch.empty_like(gamma2), d_other)

    @torch.library.register_fake("marn_fast::ram_bn_update_stats")
    def _update_stats_fake(running_mean, running_var, mean, var, count, momentum):
        return None

    def _grad_other(epilogue, grad, d_other):
        if epilogue == EPILOGUE_ADD:
            return grad
        return d_other if epilogue >= EPILOGUE_MUL else None

    def _eval_setup(ctx, inputs, output):
        x, w1, b1, w2, b2, other, epilogue = inputs
        _, y1, v2 = output
        ctx.mark_non_differentiable(y1, v2)
        ctx.set_materialize_grads(False)
        ctx.epilogue = epilogue
        ctx.save_for_backward(x, w1, y1, w2, v2, other)

    def _eval_backward(ctx, grad, _gy1, _gv2):
        x, w1, y1, w2, v2, other = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        grad = grad.contiguous()
        dx, dw1, db1, dw2, db2, d_other = torch.ops.marn_fast.ram_block_eval_backward(
            grad, x, w1, y1, w2, v2, other, ctx.epilogue)
        return dx, dw1, db1, dw2, db2, _grad_other(ctx.epilogue, grad, d_other), None

    def _train_setup(ctx, inputs, output):
        x, w1, gamma1, _beta1, w2, gamma2, beta2, other, epilogue, eps1, eps2 = inputs
        _, z1, y1, z2, mean1, var1, mean2, var2 = output
        ctx.mark_non_differentiable(z1, y1, z2, mean1, var1, mean2, var2)
        ctx.set_materialize_grads(False)
        ctx.args = (epilogue, eps1, eps2)
        ctx.save_for_backward(x, w1, gamma1, z1, y1, mean1, var1, w2, gamma2, beta2, z2, mean2, var2, other)

    def _train_backward(ctx, grad, *_aux_grads):
        if grad is None:
            return (None,) * 11
        epilogue, eps1, eps2 = ctx.args
        grad = grad.contiguous()
        dx, dw1, dg1, db1, dw2, dg2, db2, d_other = torch.ops.marn_fast.ram_block_train_backward(
            grad, *ctx.saved_tensors, epilogue, eps1, eps2)
        return dx, dw1, dg1, db1, dw2, dg2, db2, _grad_other(epilogue, grad, d_other), None, None, None

    torch.library.register_autograd("marn_fast::ram_block_eval", _eval_backward, setup_context=_eval_setup)
    torch.library.register_autograd("marn_fast::ram_block_train", _train_backward, setup_context=_train_setup)


def conv_weight(conv: nn.Module) -> torch.Tensor:
    """The block conv's weight as a Conv1d weight [C_out, C_in, 3] (ConvTranspose1d flipped/transposed)."""
    weight = cast(torch.Tensor, conv.weight)
    if isinstance(conv, nn.ConvTranspose1d):
        return weight.transpose(0, 1).flip(2)
    return weight


def _parts(block: nn.Sequential) -> Tuple[nn.Module, nn.BatchNorm1d, nn.Module, nn.BatchNorm1d]:
    """(conv1, bn1, conv2, bn2) of a block with the reference layout (see `_reference_layout`)."""
    conv1, bn1, _, conv2, bn2 = block
    return conv1, cast(nn.BatchNorm1d, bn1), conv2, cast(nn.BatchNorm1d, bn2)


def _parameter_dtype(ram: RAM) -> torch.dtype:
    """The dtype of the RAM's parameters."""
    return conv_weight(ram.down1[0]).dtype


def _batch_stats(bn: nn.BatchNorm1d) -> bool:
    """Whether the BatchNorm normalises with the batch's statistics (else its running ones)."""
    return bn.training or not bn.track_running_stats


def _reference_layout(block: nn.Sequential) -> bool:
    """Whether the block has the reference layout the fused paths implement."""
    if len(block) != 5:
        return False
    conv1, bn1, _, conv2, bn2 = block
    for conv in (conv1, conv2):
        if (not isinstance(conv, (nn.Conv1d, nn.ConvTranspose1d)) or conv.kernel_size != (KERNEL_SIZE,)
                or conv.stride != (1,) or conv.padding != (PADDING,) or conv.dilation != (1,)
                or conv.groups != 1 or conv.bias is not None or conv.padding_mode != "zeros"
                or getattr(conv, "output_padding", (0,)) != (0,)):
            return False
    return (isinstance(bn1, nn.BatchNorm1d) and isinstance(bn2, nn.BatchNorm1d) and bn1.affine and bn2.affine
            and _batch_stats(bn1) == _batch_stats(bn2))


def _fusable(block: nn.Sequential, x: torch.Tensor) -> bool:
    """Whether the extension's block ops can run this block on x."""
    return (_reference_layout(block) and x.dtype in _DTYPES["extension"].get(x.device.type, ())
            and extension_available_for(x))


def _plain_block(block: nn.Sequential, x: torch.Tensor, other: Optional[torch.Tensor], epilogue: int):
    mixed = any(p.is_floating_point() and p.dtype != x.dtype for p in block.parameters())
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=mixed and x.dtype in (torch.bfloat16, torch.float16)):
        v = block(x.transpose(1, 2)).transpose(1, 2).to(x.dtype)
    if epilogue == EPILOGUE_NONE:
        return v
    assert other is not None, "the ADD, MUL and MUL_TANH epilogues take `other`"
    if epilogue == EPILOGUE_ADD:
        return v + other
    return v * other if epilogue == EPILOGUE_MUL else mul_tanh(v, other)


# block → (key, folded (w1, b1, w2, b2)); entries die with their block.
_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fold(conv: nn.Module, bn: nn.BatchNorm1d, dtype: torch.dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = cast(torch.Tensor, bn.weight), cast(torch.Tensor, bn.bias)
    mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    scale = gamma.to(acc) * torch.rsqrt(var.to(acc) + bn.eps)
    w = (conv_weight(conv).to(acc) * scale[:, None, None]).to(dtype).contiguous()
    b = (beta.to(acc) - mean.to(acc) * scale).to(dtype).contiguous()
    return w, b


def folded_block(block: nn.Sequential, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """(w1, b1, w2, b2): the eval block's BatchNorms folded into its convs, in `dtype`.

    Cached when no gradient needs to reach the parameters; the cache key holds every parameter's
    and running statistic's `_version` and data_ptr, so in-place updates and reloads invalidate it.
    """
    conv1, bn1, conv2, bn2 = _parts(block)
    tensors = cast(Tuple[torch.Tensor, ...], (conv1.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var,
                                              conv2.weight, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad or torch.compiler.is_compiling():
        return _fold(conv1, bn1, dtype) + _fold(conv2, bn2, dtype)
    key = (dtype, bn1.eps, bn2.eps) + tuple((t._version, t.data_ptr(), t.device) for t in tensors)
    hit = _FOLD_CACHE.get(block)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, reusable outside inference mode
        folded = _fold(conv1, bn1, dtype) + _fold(conv2, bn2, dtype)
    _FOLD_CACHE[block] = (key, folded)
    return folded


def _update_running_stats(bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """nn.BatchNorm1d's training-mode update of running_mean/var and num_batches_tracked."""
    momentum = ram_vendor.bn_update_factor(bn)
    if momentum is not None:
        torch.ops.marn_fast.ram_bn_update_stats(bn.running_mean, bn.running_var, mean, var, count, momentum)


def _check_count(x: torch.Tensor) -> int:
    count = x.shape[0] * x.shape[1]
    if count <= 1:
        raise ValueError(f"x: BatchNorm needs more than 1 value per channel when training, got "
                         f"[B, n] = {list(x.shape[:2])}")
    return count


def ram_block(block: nn.Sequential, x: torch.Tensor, other: Optional[torch.Tensor] = None,
              epilogue: int = EPILOGUE_NONE) -> torch.Tensor:
    """One RAM block plus its epilogue on channels-last x [B, n, C_in] → [B, n, C_out].

    out = BN2(conv2(tanh(BN1(conv1(x))))), then + other (ADD), ⊙ other (MUL) or tanh(· ⊙ other)
    (MUL_TANH); other [B, n, C_out]. BN modes follow the block's BatchNorm modules.
    """
    if not _fusable(block, x):
        return _plain_block(block, x, other, epilogue)
    conv1, bn1, conv2, bn2 = _parts(block)
    x = x.contiguous()
    other = None if other is None else other.contiguous()
    if _batch_stats(bn1):
        count = _check_count(x)
        dtype = x.dtype  # the block ops take their parameters in x's dtype (cast under autocast)
        out, _, _, _, mean1, var1, mean2, var2 = torch.ops.marn_fast.ram_block_train(
            x, conv_weight(conv1).to(dtype).contiguous(), bn1.weight.to(dtype), bn1.bias.to(dtype),
            conv_weight(conv2).to(dtype).contiguous(), bn2.weight.to(dtype), bn2.bias.to(dtype), other, epilogue,
            bn1.eps, bn2.eps)
        _update_running_stats(bn1, mean1, var1, count)
        _update_running_stats(bn2, mean2, var2, count)
        return out
    w1, b1, w2, b2 = folded_block(block, x.dtype)
    return torch.ops.marn_fast.ram_block_eval(x, w1, b1, w2, b2, other, epilogue)[0]


# epilogue → (multiply by other instead of adding, tanh after)
_VENDOR_EPILOGUES = {EPILOGUE_NONE: (False, False), EPILOGUE_ADD: (False, False),
                     EPILOGUE_MUL: (True, False), EPILOGUE_MUL_TANH: (True, True)}


def _vendor_uses_triton(x: torch.Tensor) -> bool:
    """The vendor_conv candidate's passes: Triton on CUDA, torch ops on the CPU."""
    return x.is_cuda


def vendor_conv_block(block: nn.Sequential, x: torch.Tensor, other: Optional[torch.Tensor] = None,
                      epilogue: int = EPILOGUE_NONE) -> torch.Tensor:
    """`ram_block` through the "vendor_conv" candidate (`marn_fast.ops.ram_vendor`)."""
    if not _reference_layout(block):
        return _plain_block(block, x, other, epilogue)
    conv1, bn1, conv2, bn2 = _parts(block)
    x = x.contiguous()
    other = None if other is None else other.contiguous()
    mul, tanh = _VENDOR_EPILOGUES[epilogue]
    use_triton = _vendor_uses_triton(x)
    if _batch_stats(bn1):
        _check_count(x)
        return ram_vendor.block_batch_stats(x, conv_weight(conv1).to(x.dtype), bn1, conv_weight(conv2).to(x.dtype),
                                            bn2, other, mul, tanh, use_triton)
    w1, b1, w2, b2 = folded_block(block, x.dtype)
    return ram_vendor.block_folded(x, w1, b1, w2, b2, other, mul, tanh, use_triton)


def _run_dtype(ram: RAM, h: torch.Tensor) -> torch.dtype:
    """The dtype the fused implementations run in: h's, or the autocast dtype under autocast."""
    return compute_dtype(h)


def _unavailable(impl: str, h: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """Why `impl` cannot run on h's device in `dtype`, or None. Both fused implementations take
    the dtypes of _DTYPES (vendor_conv: cuDNN/oneDNN convolutions, Triton or torch passes)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected 'auto' or one of {IMPLS}, got {impl!r}")
    device = h.device.type
    if impl != "reference" and dtype not in _DTYPES[impl].get(device, ()):
        return f"{impl} takes {_DTYPES[impl].get(device, ())} on {device}, got {dtype}"
    if impl == "extension" and not extension_available_for(h):
        return f"the compiled extension has no kernels for {device} tensors (not built or not loaded)"
    if impl == "vendor_conv" and device == "cuda" and not triton_available():
        return "vendor_conv needs triton for CUDA tensors"
    return None


def available_impls(ram: RAM, h: torch.Tensor) -> tuple[str, ...]:
    """The implementations that can run `ram_forward(ram, h, impl=...)` now, "reference" first.

    Under autocast the fused ones run in the autocast dtype (see the module docstring)."""
    dtype = _run_dtype(ram, h)
    return tuple(impl for impl in IMPLS if _unavailable(impl, h, dtype) is None)


# Values per h element (B·C·n) that each implementation holds at its peak beyond h (estimated
# from the code; the blocks' widths C/2, C/4, C/4, C/2, C sum to 2.5·C): infer, then train
# (forward and backward). The reference and vendor_conv keep about five activations per block for
# autograd (conv, BN, tanh, conv, BN: 12.5) plus the backward's gradients (~3.5); the extension
# keeps z1, y1, z2 per block (7.5) plus its gradients (~2.5). Inference holds D1, a block's
# intermediates and the output products: ~4.
PEAK_VALUES = {"reference": (4, 16), "vendor_conv": (4, 16), "extension": (4, 10)}


def peak_bytes(impl: str, h: torch.Tensor, train: bool, dtype: torch.dtype) -> int:
    """Estimated extra peak bytes of one call of `impl` (forward, and backward when `train`) on h
    [B, C, n] computing in `dtype`, beyond h: PEAK_VALUES[impl] · B·C·n values of `dtype` (the
    measured dispatcher's memory estimate)."""
    infer, training = PEAK_VALUES[impl]
    return (training if train else infer) * h.numel() * torch.finfo(dtype).bits // 8


def default_impl(ram: RAM, h: torch.Tensor) -> str:
    """The static choice: "extension" where it can run on h, else "reference"."""
    return "extension" if _unavailable("extension", h, _run_dtype(ram, h)) is None else "reference"


def _measured_impl(ram: RAM, h: torch.Tensor) -> str:
    """impl="auto": the measured dispatcher's choice for this key (mode: whether a gradient flows;
    batch_stats: whether the BatchNorms normalise by the batch's statistics)."""
    parameters = list(ram.parameters())
    train = dispatch.grad_flows(h, *parameters)
    batch, channels, n = h.shape

    def trial():
        copy = deepcopy(ram)  # the trial's training calls update the copy's running statistics
        return dispatch.autograd_trial(lambda impl, x: ram_forward(copy, x, impl), [h], train,
                                       params=list(copy.parameters()))

    return dispatch.choose(
        "ram", device=h.device, dtype=_run_dtype(ram, h), train=train,
        sizes={"B": batch, "C": channels, "n": n, "batch_stats": int(_batch_stats(_parts(ram.down1)[1]))},
        candidates=lambda: available_impls(ram, h), default=default_impl(ram, h), trial=trial,
        memory=lambda impl, dtype: peak_bytes(impl, h, train, dtype))


def ram_forward(ram: RAM, h: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """O [B, C, n] = RAM(h) for h [B, C, n] (H^T).

    impl: "auto" (measured dispatch; see the module docstring), "reference",
    "extension" or "vendor_conv" (see the module docstring); an implementation that cannot run
    on h raises ValueError with the reason. The fused ones return a transposed view of [B, n, C].
    """
    check_tensor("h", h, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, C, n] float")
    channels = ram.down1[0].in_channels
    if h.shape[1] != channels:
        raise ValueError(f"h: expected [B, C={channels}, n] (the RAM's channels), got shape {tuple(h.shape)}")
    if h.shape[2] == 0:
        raise ValueError(f"h: expected at least one token (n >= 1), got shape {tuple(h.shape)}")
    check_same_device(h=h, ram_parameters=conv_weight(ram.down1[0]))
    parameter_dtype = _parameter_dtype(ram)
    if h.dtype != parameter_dtype and not torch.is_autocast_enabled(h.device.type):
        raise ValueError(f"h: expected dtype {parameter_dtype} (the RAM's parameters; or run under autocast), "
                         f"got {h.dtype}")
    if impl == "auto":
        impl = _measured_impl(ram, h)
    if impl == "reference":
        return ram(h)
    reason = _unavailable(impl, h, _run_dtype(ram, h))
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run here: {reason}")
    # The fused blocks take their input in the compute dtype and cast their conv weights to it;
    # autocast would re-cast the ATen calls inside them (BatchNorm's statistics among them).
    dtype = _run_dtype(ram, h)
    with autocast_off(h.device):
        return _fused(ram, h.to(dtype), impl)


def _fused(ram: RAM, h: torch.Tensor, impl: str) -> torch.Tensor:
    """The RAM's five blocks through impl's block function, in h's dtype."""
    block = vendor_conv_block if impl == "vendor_conv" else ram_block
    x = h.transpose(1, 2)
    d1 = block(ram.down1, x)
    l1 = block(ram.lateral, block(ram.down2, d1))
    u1 = block(ram.up1, l1, d1, EPILOGUE_ADD)
    out = block(ram.up2, u1, x, EPILOGUE_MUL_TANH if ram.output_tanh else EPILOGUE_MUL)
    return out.transpose(1, 2)
