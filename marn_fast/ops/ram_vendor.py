"""RAM candidate "vendor_conv": each k=3 convolution by the vendor library, the passes between fused.

Layout: channels-last activations x [B, n, C] (H's own layout), viewed as R = B·n rows of C
channels. `conv3` runs `F.conv2d` on the [B, C, 1, n] view of x, whose strides are channels-last
(no copy), with the weight [C_out, C_in, 1, 3]: cuDNN on CUDA, oneDNN on the CPU, both in their
native NHWC layout; the output is again a [B, n, C_out] tensor. Forward and backward of every
convolution are the vendor's (through autograd). A ConvTranspose1d (stride 1, pad 1) enters as
the conv with weight_t.transpose(0, 1).flip(2) (`ops.ram.conv_weight`).

One block conv1 → BN1 → tanh → conv2 → BN2, then out = v (NONE), v + other (ADD, U1 = up1(L1)
+ D1), v ⊙ other (MUL) or tanh(v ⊙ other) (MUL_TANH, O = tanh(up2(U1) ⊙ H)):
- Triton passes (`kernels/ram.py`; CUDA, or CPU tensors under TRITON_INTERPRET=1 for tests),
  BatchNorm on batch statistics (training):
      z1 = conv(x)  · statistics of z1 (2 launches; running statistics updated in the second)
      y1 = tanh(BN1(z1)) (1)  · z2 = conv(y1)  · statistics of z2 (2)  · out = epilogue(BN2(z2)) (1)
  backward, per BatchNorm: one pass forming dL/du with Σ and Σ·x̂ (plus dother), one pass for dz;
  the tanh and the epilogue's backward live inside the first (`_FusedPass`).
  Eval (running statistics): the BatchNorms folded into the convs (`ops.ram.folded_block`), so
  y1 = tanh(z1 + b1) and out = epilogue(z2 + b2): one pass each, backward one pass each.
- torch passes (CPU): training calls the block's own BatchNorm1d modules on the [R, C] view
  (ATen's kernel: statistics, the running-statistics update exactly as the module does,
  normalisation) and torch.tanh; eval gives the folded bias to oneDNN's conv (added in its
  epilogue), then tanh; the epilogues are ATen's vectorised ops (in place without autograd;
  `ops.mul_tanh` picks them on the CPU: its C++ kernel's scalar tanh is 40× slower).
Running statistics (Triton path) follow nn.BatchNorm1d: num_batches_tracked += 1, momentum or,
when momentum is None, 1/num_batches_tracked; unbiased variance; once per call.

TF32: the candidate leaves torch.backends.cudnn.allow_tf32 as the caller set it, like the
reference nn.Conv1d it replaces (the flag is process-global and the conv backward runs later, on
autograd's device thread, so a per-call switch would be neither local nor thread-safe). fp32
results are fp32-exact when it is False, which the parity tests and benchmarks set; PyTorch's
default (True) rounds the conv inputs to TF32 in this candidate and in the reference alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mul_tanh import mul_tanh


def conv3(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The k=3, pad-1 conv of channels-last x [B, n, C_in] with w [C_out, C_in, 3] → [B, n, C_out]."""
    x4 = x.permute(0, 2, 1).unsqueeze(2)                                 # [B, C_in, 1, n], NHWC strides
    w4 = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)    # [C_out, C_in, 1, 3]
    z = F.conv2d(x4, w4, bias, padding=(0, 1))
    return z.squeeze(2).permute(0, 2, 1).contiguous()  # a no-op when the vendor returned NHWC


# ---------------------------------------------------------------------------------- Triton passes
class _FusedPass(torch.autograd.Function):
    """out [R, C] = epilogue(BN(z)) (norm: batch statistics, γ, β) or epilogue(z + β) (folded);
    epilogue: v ⊙ other (mul) or v + other, then tanh. See `marn_fast.kernels.ram`."""

    @staticmethod
    def forward(ctx, z, gamma, beta, other, norm, mul, tanh, eps, running_mean, running_var, momentum):
        from ..kernels import ram as kernels

        mean = rstd = None
        if norm:
            mean, rstd = kernels.batch_stats(z, eps, running_mean, running_var, momentum)
        out = kernels.affine_epilogue(z, beta, other, mean, rstd, gamma if norm else None, mul, tanh)
        ctx.flags = (norm, mul, tanh, other is not None)
        ctx.save_for_backward(z, out if tanh else None, other if mul else None, mean, rstd,
                              gamma if norm else None, beta)
        return out

    @staticmethod
    def backward(ctx, g):
        from ..kernels import ram as kernels

        norm, mul, tanh, has_other = ctx.flags
        z, out, other, mean, rstd, gamma, beta = ctx.saved_tensors
        g = g.contiguous()
        gu, d_other, sums = kernels.affine_epilogue_backward(g, z, beta, out, other, mean, rstd, gamma, mul, tanh)
        if norm:
            dz = kernels.batch_norm_backward_apply(gu, z, sums, mean, rstd, gamma)
            d_gamma = sums[1].to(gamma.dtype)
        else:
            dz, d_gamma = gu, None
        if has_other and not mul:
            d_other = g
        return dz, d_gamma, sums[0].to(beta.dtype), d_other, None, None, None, None, None, None, None


def bn_update_factor(bn: nn.BatchNorm1d) -> Optional[float]:
    """nn.BatchNorm1d's training-mode bookkeeping: num_batches_tracked += 1 and the factor of the
    running-statistics update (momentum, or 1/num_batches_tracked when momentum is None), or None
    when the running statistics are not updated."""
    if not (bn.training and bn.track_running_stats):
        return None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)  # a host read, as nn.BatchNorm1d does
    return momentum


def _triton_bn(z: torch.Tensor, bn: nn.BatchNorm1d, other, mul: bool, tanh: bool) -> torch.Tensor:
    momentum = bn_update_factor(bn)
    update = momentum is not None
    return _FusedPass.apply(z, bn.weight, bn.bias, other, True, mul, tanh, bn.eps,
                            bn.running_mean if update else None, bn.running_var if update else None,
                            momentum or 0.0)


# ---------------------------------------------------------------------------------- blocks
def _in_place(v: torch.Tensor) -> bool:
    """Whether v (a temporary of this block) may be overwritten: no autograd graph records it."""
    return not (torch.is_grad_enabled() and v.requires_grad)


def _epilogue_torch(v: torch.Tensor, other, mul: bool, tanh: bool) -> torch.Tensor:
    if other is None:
        return v
    if _in_place(v) and not other.requires_grad:
        v = v.mul_(other) if mul else v.add_(other)
        return v.tanh_() if tanh else v
    if not mul:
        return v + other
    return mul_tanh(v, other) if tanh else v * other


def _tanh_torch(v: torch.Tensor) -> torch.Tensor:
    return v.tanh_() if _in_place(v) else torch.tanh(v)


def block_batch_stats(x: torch.Tensor, w1: torch.Tensor, bn1: nn.BatchNorm1d, w2: torch.Tensor,
                      bn2: nn.BatchNorm1d, other: Optional[torch.Tensor], mul: bool, tanh: bool,
                      use_triton: bool) -> torch.Tensor:
    """One block with BatchNorm on batch statistics; x [B, n, C_in] contiguous, other [B, n, C_out]
    contiguous or None; w1, w2 Conv1d weights. Running statistics updated once when tracked."""
    b, n, _ = x.shape
    r = b * n
    z1 = conv3(x, w1).view(r, -1)
    if use_triton:
        y1 = _triton_bn(z1, bn1, None, False, True)
        z2 = conv3(y1.view(b, n, -1), w2).view(r, -1)
        out = _triton_bn(z2, bn2, None if other is None else other.view(r, -1), mul, tanh)
        return out.view(b, n, -1)
    y1 = _tanh_torch(bn1(z1))
    v = bn2(conv3(y1.view(b, n, -1), w2).view(r, -1)).view(b, n, -1)
    return _epilogue_torch(v, other, mul, tanh)


def block_folded(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 other: Optional[torch.Tensor], mul: bool, tanh: bool, use_triton: bool) -> torch.Tensor:
    """One eval block with the BatchNorms folded into the convs (w1, b1, w2, b2 from
    `ops.ram.folded_block`); shapes as `block_batch_stats`."""
    b, n, _ = x.shape
    r = b * n
    if use_triton:
        y1 = _FusedPass.apply(conv3(x, w1).view(r, -1), None, b1, None, False, False, True, 0.0, None, None, 0.0)
        z2 = conv3(y1.view(b, n, -1), w2).view(r, -1)
        out = _FusedPass.apply(z2, None, b2, None if other is None else other.view(r, -1), False, mul, tanh,
                               0.0, None, None, 0.0)
        return out.view(b, n, -1)
    y1 = _tanh_torch(conv3(x, w1, b1))
    return _epilogue_torch(conv3(y1, w2, b2), other, mul, tanh)
