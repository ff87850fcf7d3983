"""Focal loss (official MARN form and the paper's eq. 16): loss and gradient in one pass.

logits x [B, L] (fp16/bf16/fp32/fp64), targets y [B, L] (float in [0, 1], soft allowed; bool;
uint8 in {0, 1}), per element with p = σ(x):
  balanced=False (official MARN code):  α·(1 − p_t)^γ·BCE(x, y),  p_t = exp(−BCE),
                                        BCE = softplus(x) − x·y,  1 − p_t = −expm1(−BCE)
  balanced=True  (paper eq. 16):        −y·α·(1 − p)^γ·log p − (1 − y)·(1 − α)·p^γ·log(1 − p)
reduction "none" → [B, L] in the logits' dtype (an output as large as the input, written at
its width); "sum" / "mean" (over all B×L elements, as the official code) → a 0-d fp32 tensor
(fp64 for fp64 logits), accumulated in fp32 whatever the logits' dtype. No gradient flows to
the targets.

Computed in log space (log p = −softplus(−x), log(1 − p) = −softplus(x)): loss and gradient
are finite for any finite logit and γ ≥ 0; γ = 0 gives α-weighted BCE exactly. The analytic
gradient is computed in the forward pass (Liger-style) and stored already scaled for the
reduction; backward only multiplies it by the incoming gradient. The formulas are in
`marn_fast.kernels.focal_loss` (and `marn_fast.reference.focal_loss.focal_loss_elementwise`).

Paths (impl, see `_backend.resolve_impl`): "triton" — one launch of the Triton kernel (per-block
partial sums summed in a fixed order, no atomics; bool/uint8 targets read as bytes);
"torch" — on CPU tensors the C++ kernel `torch.ops.marn_fast.focal_loss_forward`
(csrc/cpu/focal_loss_cpu.cpp: the same math in one vectorised pass, fixed-order sums) when the
compiled extension is available, else vectorised PyTorch computing loss and gradient together.
"auto" picks Triton on CUDA, torch on CPU. All run inside the registered op
`torch.ops.marn_fast.focal_loss` (custom_op + register_fake + register_autograd), opaque to
torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.checks import FLOAT_DTYPES, check_shape, check_targets, check_tensor
from ..reference.focal_loss import REDUCTIONS
from ._backend import resolve_impl
from ._extension import cpu_extension_available, extension_available_for


def check_focal_args(logits, targets, alpha, gamma, reduction, name="logits", target_name="targets") -> None:
    check_tensor(name, logits, ndim=2, dtypes=FLOAT_DTYPES, expected="[B, L] float")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [B, L] tensor, got shape {tuple(logits.shape)}")
    if torch.compiler.is_compiling():
        # The [0, 1] range check reads the values (a host sync, a data-dependent graph break):
        # under torch.compile only dtype and shape are checked.
        check_tensor(target_name, targets, dtypes=FLOAT_DTYPES + (torch.bool, torch.uint8),
                     expected=f"[B, L]={tuple(logits.shape)} float/bool/uint8")
        check_shape(target_name, targets, logits.shape, "(the logits' shape [B, L])")
    else:
        check_targets(target_name, targets, logits.shape)
    if targets.device != logits.device:
        raise ValueError(f"{target_name}: expected device {logits.device} ({name}'s device), got {targets.device}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if not float(gamma) >= 0.0:
        raise ValueError(f"gamma: expected a value >= 0, got {gamma}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def _loss_dtype(logits_dtype: torch.dtype, reduction: str) -> torch.dtype:
    if reduction == "none":
        return logits_dtype
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _focal_loss_torch(logits, targets, alpha, gamma, balanced, reduction, compute_grad):
    """The CPU path: the kernel's math as a few fused-where-possible PyTorch ops (fp32 math,
    fp64 for fp64 logits). Returns (loss, scale·dloss/dx or None)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    y = targets.to(x.dtype)
    scale = 1.0 / x.numel() if reduction == "mean" else 1.0
    grad = None
    if balanced:
        sp_neg, sp_pos = -F.logsigmoid(x), -F.logsigmoid(-x)        # −log p, −log(1 − p)
        w_pos = torch.exp(sp_pos * -gamma).mul_(y).mul_(alpha)          # α·y·(1 − p)^γ
        w_neg = torch.exp(sp_neg * -gamma).mul_(1 - y).mul_(1 - alpha)  # (1 − α)(1 − y)·p^γ
        elementwise = torch.addcmul(w_pos * sp_neg, w_neg, sp_pos)
        loss = elementwise if reduction == "none" else elementwise.sum() * scale
        if compute_grad:
            p, pm = torch.sigmoid(x), torch.sigmoid(-x)
            grad = (torch.addcmul(p, pm * gamma, sp_pos).mul_(w_neg)
                    .sub_(torch.addcmul(pm, p * gamma, sp_neg).mul_(w_pos)).mul_(scale))
    else:
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        q = torch.expm1(-bce).neg_()                            # 1 − p_t
        q_gamma = q.pow(gamma)
        c = alpha * scale
        if reduction == "none":
            loss = q_gamma * bce * alpha
        else:
            loss = torch.dot(q_gamma.view(-1), bce.view(-1)) * c
        if compute_grad:
            # c·(1 + γ·p_t·b/q); where q = 0 (so b = 0), b/q reads 0, harmless: q^γ·γ = 0 there.
            w = bce.div_(q.clamp_min(torch.finfo(q.dtype).tiny)).mul_(1 - q).mul_(c * gamma).add_(c)
            grad = torch.sigmoid(x).sub_(y).mul_(q_gamma).mul_(w)
    if grad is not None:
        grad = grad.to(logits.dtype)
    return loss.to(_loss_dtype(logits.dtype, reduction)), grad


@torch.library.custom_op("marn_fast::focal_loss", mutates_args=())
def _focal_loss_op(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                   balanced: bool, reduction: str, compute_grad: bool,
                   use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dloss/dlogits); the second is computed only with compute_grad (else empty [0]) and
    is not differentiable."""
    if use_triton:
        from ..kernels.focal_loss import focal_loss_forward  # imports triton
        scale = 1.0 / logits.numel() if reduction == "mean" else 1.0
        loss, grad = focal_loss_forward(logits, targets, alpha, gamma, balanced,
                                        reduce=reduction != "none", scale=scale, compute_grad=compute_grad)
    elif logits.device.type == "cpu" and extension_available_for(logits):
        scale = 1.0 / logits.numel() if reduction == "mean" else 1.0
        return torch.ops.marn_fast.focal_loss_forward(logits, targets, alpha, gamma, balanced,
                                                      reduction != "none", scale, compute_grad)
    else:
        loss, grad = _focal_loss_torch(logits, targets, alpha, gamma, balanced, reduction, compute_grad)
    return loss, (grad if grad is not None else logits.new_empty(0))


@_focal_loss_op.register_fake
def _focal_loss_fake(logits, targets, alpha, gamma, balanced, reduction, compute_grad, use_triton):
    dtype = _loss_dtype(logits.dtype, reduction)
    loss = logits.new_empty(logits.shape if reduction == "none" else (), dtype=dtype)
    return loss, (torch.empty_like(logits) if compute_grad else logits.new_empty(0))


if cpu_extension_available():
    @torch.library.register_fake("marn_fast::focal_loss_forward")
    def _focal_loss_forward_fake(logits, targets, alpha, gamma, balanced, reduce, scale, compute_grad):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss = logits.new_empty((), dtype=dtype) if reduce else torch.empty_like(logits)
        return loss, (torch.empty_like(logits) if compute_grad else logits.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[6]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError("marn_fast::focal_loss was called with compute_grad=False; "
                           "call marn_fast.ops.focal_loss, which sets it when logits require grad")
    (grad,) = ctx.saved_tensors
    return torch.mul(grad, grad_loss), None, None, None, None, None, None, None


_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.999, gamma: float = 2.0,
               balanced: bool = False, reduction: str = "mean", *, impl: str = "auto",
               names: tuple[str, str] = ("logits", "targets")) -> torch.Tensor:
    """Focal loss of logits [B, L] against targets [B, L]; see the module docstring.

    impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch". Raises ValueError naming the argument on bad input; `names`
    are the names of (logits, targets) in those messages.
    """
    check_focal_args(logits, targets, alpha, gamma, reduction, name=names[0], target_name=names[1])
    use_triton = resolve_impl(impl, logits, "focal_loss") == "triton"
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _focal_loss_op(logits, targets, float(alpha), float(gamma), bool(balanced), reduction,
                             compute_grad, use_triton)
    return loss


def multitask_focal_loss(icd_logits, icd_targets, ccs_logits, ccs_targets, lambda_icd: float = 0.7,
                         lambda_ccs: float = 0.3, *, impl: str = "auto", **focal_kwargs) -> torch.Tensor:
    """λ_icd·FL(icd_logits, icd_targets) + λ_ccs·FL(ccs_logits, ccs_targets) (paper eq. 17);
    focal_kwargs: alpha, gamma, balanced, reduction of `focal_loss`, shared by both heads.

    Two launches, one per head: choosing one launch for both heads needs a GPU measurement,
    none was available when this was written (the CPU interpreter does not count), so the
    simpler form stands until one shows that a joint launch is faster.
    """
    return (lambda_icd * focal_loss(icd_logits, icd_targets, impl=impl, names=("icd_logits", "icd_targets"),
                                    **focal_kwargs)
            + lambda_ccs * focal_loss(ccs_logits, ccs_targets, impl=impl, names=("ccs_logits", "ccs_targets"),
                                      **focal_kwargs))
