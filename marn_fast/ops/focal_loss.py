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

Implementations (`impl`; `available_impls(logits, targets)` lists those that can run):
"reference" — `marn_fast.reference.focal_loss` (autograd through the transcription);
"triton" — one launch forward, the reduction to the scalar included, and one launch backward
(deterministic: a fixed-order sum of per-block partials, no float atomics; bool/uint8 targets
read as bytes); CUDA, or CPU tensors under TRITON_INTERPRET=1;
"torch" — on CPU tensors the C++ kernel `torch.ops.marn_fast.focal_loss_forward`
(csrc/cpu/focal_loss_cpu.cpp: the same math in one vectorised pass, fixed-order sums) when the
compiled extension is available, else vectorised PyTorch computing loss and gradient together.
"auto" is the measured dispatcher's choice for the call's key (ops/dispatch.py); where nothing
is measured, the static `default_impl`: Triton on CUDA, torch on CPU. `multitask_focal_loss` runs
both heads in one launch
(and one backward launch) on the Triton path.

Per-call cost: nothing on the way synchronises with the device. The check that float/uint8
targets lie in [0, 1] reads their values (a host synchronisation), so it runs only when asked:
`check_targets=True`, or `check_targets=None` (the default) with the environment variable
MARN_FAST_CHECK_TARGETS=1 (read at each call). Shapes, dtypes, devices, α, γ and the reduction
are always checked (host-side metadata only). In eager mode the op runs through a
torch.autograd.Function (a registered custom op costs far more Python per call); under
torch.compile through the registered op `torch.ops.marn_fast.focal_loss` (custom_op +
register_fake + register_autograd), opaque to the compiler.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import reference
from ..reference.checks import FLOAT_DTYPES, check_tensor
from ..reference.checks import check_targets as _check_targets
from ..reference.focal_loss import ALPHA, GAMMA, REDUCTIONS
from . import dispatch
from ._backend import interpreting, resolve_impl, triton_available
from ._extension import cpu_extension_available, extension_available_for

CHECK_TARGETS_ENV = "MARN_FAST_CHECK_TARGETS"
IMPLS = ("reference", "torch", "triton")


def target_check_requested(check_targets: Optional[bool]) -> bool:
    """Whether to check the targets' values: the argument when given, else MARN_FAST_CHECK_TARGETS."""
    if check_targets is not None:
        return bool(check_targets)
    return os.environ.get(CHECK_TARGETS_ENV, "0") not in ("", "0")


_LOGITS_DTYPES = frozenset(FLOAT_DTYPES)
_TARGET_DTYPES = frozenset(FLOAT_DTYPES + (torch.bool, torch.uint8))


def check_focal_args(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, reduction: str,
                     name: str = "logits", target_name: str = "targets", check_values: bool = False) -> None:
    """Shapes, dtypes, devices, α, γ, reduction; and, with check_values, the targets' range [0, 1]
    (a host synchronisation; never under torch.compile, where it would break the graph)."""
    well_formed = (isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor) and logits.dim() == 2
                   and logits.dtype in _LOGITS_DTYPES and targets.dtype in _TARGET_DTYPES
                   and targets.shape == logits.shape and logits.numel() > 0)
    if not well_formed or check_values:  # the detailed checks build their messages: only when needed
        check_tensor(name, logits, ndim=2, dtypes=FLOAT_DTYPES, expected="[B, L] float")
        if logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ValueError(f"{name}: expected a non-empty [B, L] tensor, got shape {tuple(logits.shape)}")
        _check_targets(target_name, targets, logits.shape,
                       check_values=check_values and not torch.compiler.is_compiling())
    if targets.device != logits.device:
        raise ValueError(f"{target_name}: expected device {logits.device} ({name}'s device), got {targets.device}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if not gamma >= 0.0:
        raise ValueError(f"gamma: expected a value >= 0, got {gamma}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def _loss_dtype(logits_dtype: torch.dtype, reduction: str) -> torch.dtype:
    if reduction == "none":
        return logits_dtype
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _focal_loss_torch(logits, targets, alpha, gamma, balanced, reduce, scale, compute_grad):
    """The CPU path without the extension: the kernel's math as a few fused-where-possible
    PyTorch ops (fp32 math, fp64 for fp64 logits). Returns (loss: scale·Σ loss when reduce, else
    [B, L]; scale·dloss/dx or None)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    y = targets.to(x.dtype)
    grad = None
    if balanced:
        sp_neg, sp_pos = -F.logsigmoid(x), -F.logsigmoid(-x)        # −log p, −log(1 − p)
        w_pos = torch.exp(sp_pos * -gamma).mul_(y).mul_(alpha)          # α·y·(1 − p)^γ
        w_neg = torch.exp(sp_neg * -gamma).mul_(1 - y).mul_(1 - alpha)  # (1 − α)(1 − y)·p^γ
        elementwise = torch.addcmul(w_pos * sp_neg, w_neg, sp_pos)
        loss = elementwise.sum() * scale if reduce else elementwise
        if compute_grad:
            p, pm = torch.sigmoid(x), torch.sigmoid(-x)
            grad = (torch.addcmul(p, pm * gamma, sp_pos).mul_(w_neg)
                    .sub_(torch.addcmul(pm, p * gamma, sp_neg).mul_(w_pos)).mul_(scale))
    else:
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        q = torch.expm1(-bce).neg_()                            # 1 − p_t
        q_gamma = q.pow(gamma)
        c = alpha * scale
        if reduce:
            loss = torch.dot(q_gamma.view(-1), bce.view(-1)) * c
        else:
            loss = q_gamma * bce * alpha
        if compute_grad:
            # c·(1 + γ·p_t·b/q); where q = 0 (so b = 0), b/q reads 0, harmless: q^γ·γ = 0 there.
            w = bce.div_(q.clamp_min(torch.finfo(q.dtype).tiny)).mul_(1 - q).mul_(c * gamma).add_(c)
            grad = torch.sigmoid(x).sub_(y).mul_(q_gamma).mul_(w)
    if grad is not None:
        grad = grad.to(logits.dtype)
    return loss.to(_loss_dtype(logits.dtype, "sum" if reduce else "none")), grad


def _scale(logits: torch.Tensor, reduction: str) -> float:
    return 1.0 / logits.numel() if reduction == "mean" else 1.0


def _run(logits, targets, alpha, gamma, balanced, reduce, scale, compute_grad, use_triton):
    """(loss, scale·dloss/dx or None) of one head by the chosen path (see the module docstring)."""
    if use_triton:
        from ..kernels.focal_loss import focal_loss_forward  # imports triton

        return focal_loss_forward(logits, targets, alpha, gamma, balanced, reduce, scale, compute_grad)
    if logits.device.type == "cpu" and extension_available_for(logits):
        loss, grad = torch.ops.marn_fast.focal_loss_forward(logits, targets, alpha, gamma, balanced, reduce,
                                                            scale, compute_grad)
        return loss, (grad if compute_grad else None)
    return _focal_loss_torch(logits, targets, alpha, gamma, balanced, reduce, scale, compute_grad)


@torch.library.custom_op("marn_fast::focal_loss", mutates_args=())
def _focal_loss_op(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                   balanced: bool, reduction: str, compute_grad: bool,
                   use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dloss/dlogits); the second is computed only with compute_grad (else empty [0]) and
    is not differentiable. The torch.compile path of `focal_loss`."""
    loss, grad = _run(logits, targets, alpha, gamma, balanced, reduction != "none", _scale(logits, reduction),
                      compute_grad, use_triton)
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


class _FocalLoss(torch.autograd.Function):
    """The eager path: one forward call of the kernel (loss and scaled gradient), backward one
    multiply. params = (alpha, gamma, balanced, reduce, scale, use_triton): one argument, as
    Function.apply's per-argument bookkeeping is a good part of the per-call cost."""

    @staticmethod
    def forward(ctx, logits, targets, params):
        alpha, gamma, balanced, reduce, scale, use_triton = params
        loss, grad = _run(logits, targets, alpha, gamma, balanced, reduce, scale, True, use_triton)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return torch.mul(grad, grad_loss), None, None


class _MultitaskFocalLoss(torch.autograd.Function):
    """λ_a·FL(a) + λ_b·FL(b) ("sum"/"mean"): λ folded into each head's scale. Triton: one launch
    each way (the two gradients share one buffer); CPU: one kernel call per head.
    params = (scale_a, scale_b, alpha, gamma, balanced, use_triton)."""

    @staticmethod
    def forward(ctx, xa, ya, xb, yb, params):
        scale_a, scale_b, alpha, gamma, balanced, use_triton = params
        loss, grads = _multitask_run(xa, ya, xb, yb, scale_a, scale_b, alpha, gamma, balanced, True, use_triton)
        ctx.shapes = (xa.shape, xb.shape)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [torch.mul(g, grad_loss) for g in ctx.saved_tensors]
        if len(grads) == 1:  # one buffer: head a's elements, then head b's
            shape_a, shape_b = ctx.shapes
            n_a = shape_a.numel()
            grads = [grads[0][:n_a].view(shape_a), grads[0][n_a:].view(shape_b)]
        return grads[0], None, grads[1], None, None


def _multitask_run(xa, ya, xb, yb, scale_a, scale_b, alpha, gamma, balanced, compute_grad, use_triton):
    """(loss, gradients: one flat buffer (Triton) or one per head; empty without compute_grad)."""
    if use_triton:
        from ..kernels.focal_loss import focal_loss_forward  # imports triton

        loss, grad = focal_loss_forward(xa, ya, alpha, gamma, balanced, True, scale_a, compute_grad, xb, yb, scale_b)
        return loss, (() if grad is None else (grad,))
    loss_a, grad_a = _run(xa, ya, alpha, gamma, balanced, True, scale_a, compute_grad, False)
    loss_b, grad_b = _run(xb, yb, alpha, gamma, balanced, True, scale_b, compute_grad, False)
    return loss_a + loss_b, (() if grad_a is None else (grad_a, grad_b))


def _use_triton(impl: str, logits: torch.Tensor, op: str) -> bool:
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"impl: expected 'auto' or one of {IMPLS}, got {impl!r}")
    return resolve_impl(impl, logits, op) == "triton"


def available_impls(logits: torch.Tensor, targets: torch.Tensor) -> tuple[str, ...]:
    """The implementations that can run on these tensors now ("reference" first, "auto" excluded)."""
    impls = ["reference", "torch"]
    if triton_available() and (logits.is_cuda or (logits.device.type == "cpu" and interpreting())):
        impls.append("triton")
    return tuple(impls)


def default_impl(logits: torch.Tensor) -> str:
    """The static choice: "triton" on CUDA (when installed), else "torch"."""
    return resolve_impl("auto", logits, "focal_loss")


def peak_bytes(impl: str, logits: Sequence[torch.Tensor], train: bool) -> int:
    """Estimated extra peak bytes of one call of `impl` on these logits (forward, and backward when
    `train`): N = their elements in all, 4 bytes each (8 for fp64). "reference" holds ~6·N values
    (the BCE, p_t, the modulating factor and their products; 12·N training, with autograd's saved
    tensors and gradients); "torch" and "triton" at most N (the gradient they compute with the
    loss, or the per-element loss of reduction "none"). The measured dispatcher's memory estimate."""
    count = sum(x.numel() for x in logits)
    size = 8 if logits[0].dtype == torch.float64 else 4
    return (12 if train else 6) * count * size if impl == "reference" else count * size


def _measured_impl(op: str, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], run) -> str:
    """impl="auto": the measured dispatcher's choice for this key; run(impl, *logits, *targets)
    is the op on copies of the inputs."""
    train = dispatch.grad_flows(*logits)
    first = logits[0]
    sizes = {"B": first.shape[0], **{f"L{i}": x.shape[1] for i, x in enumerate(logits)}}
    return dispatch.choose(
        op, device=first.device, dtype=first.dtype, train=train, sizes=sizes,
        candidates=lambda: available_impls(first, targets[0]), default=default_impl(first),
        trial=lambda: dispatch.autograd_trial(run, [*logits, *targets], train),
        memory=lambda impl, dtype: peak_bytes(impl, logits, train))


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = ALPHA, gamma: float = GAMMA,
               balanced: bool = False, reduction: str = "mean", *, impl: str = "auto",
               check_targets: Optional[bool] = None, names: tuple[str, str] = ("logits", "targets")) -> torch.Tensor:
    """Focal loss of logits [B, L] against targets [B, L]; see the module docstring.

    impl: "auto" (measured dispatch, see the module docstring), "reference", "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch". check_targets: check that targets lie in [0, 1] (a host sync;
    None: only when MARN_FAST_CHECK_TARGETS=1). Raises ValueError naming the argument on bad
    input; `names` are the names of (logits, targets) in those messages.
    """
    check_focal_args(logits, targets, alpha, gamma, reduction, names[0], names[1],
                     target_check_requested(check_targets))
    if impl == "auto":
        impl = _measured_impl("focal_loss", [logits], [targets], lambda i, x, y: focal_loss(
            x, y, alpha, gamma, balanced, reduction, impl=i, check_targets=False))
    if impl == "reference":
        return reference.focal_loss(logits, targets, alpha, gamma, balanced, reduction)
    use_triton = _use_triton(impl, logits, "focal_loss")
    alpha, gamma, balanced = float(alpha), float(gamma), bool(balanced)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if torch.compiler.is_compiling():
        return _focal_loss_op(logits, targets, alpha, gamma, balanced, reduction, compute_grad, use_triton)[0]
    reduce, scale = reduction != "none", _scale(logits, reduction)
    if compute_grad:
        return _FocalLoss.apply(logits, targets, (alpha, gamma, balanced, reduce, scale, use_triton))
    return _run(logits, targets, alpha, gamma, balanced, reduce, scale, False, use_triton)[0]


def multitask_focal_loss(icd_logits: torch.Tensor, icd_targets: torch.Tensor, ccs_logits: torch.Tensor,
                         ccs_targets: torch.Tensor, lambda_icd: float = 0.7, lambda_ccs: float = 0.3, *,
                         impl: str = "auto", check_targets: Optional[bool] = None,
                         **focal_kwargs: Any) -> torch.Tensor:
    """λ_icd·FL(icd_logits, icd_targets) + λ_ccs·FL(ccs_logits, ccs_targets) (paper eq. 17);
    focal_kwargs: alpha, gamma, balanced, reduction of `focal_loss`, shared by both heads.

    With reduction "sum"/"mean" both heads run in one call (λ folded into each head's scale):
    on the Triton path one launch forward and one backward. reduction "none" (a sum of two
    [B, L] tensors, so equal L) and torch.compile take the two `focal_loss` calls.
    """
    alpha = focal_kwargs.get("alpha", ALPHA)
    gamma = focal_kwargs.get("gamma", GAMMA)
    reduction = focal_kwargs.get("reduction", "mean")
    balanced = focal_kwargs.get("balanced", False)
    unknown = set(focal_kwargs) - {"alpha", "gamma", "reduction", "balanced"}
    if unknown:
        raise ValueError(f"focal_kwargs: unexpected {sorted(unknown)}; expected alpha, gamma, balanced, reduction")
    check_values = target_check_requested(check_targets)
    check_focal_args(icd_logits, icd_targets, alpha, gamma, reduction, "icd_logits", "icd_targets", check_values)
    check_focal_args(ccs_logits, ccs_targets, alpha, gamma, reduction, "ccs_logits", "ccs_targets", check_values)
    if impl == "auto":
        impl = _measured_impl("multitask_focal_loss", [icd_logits, ccs_logits], [icd_targets, ccs_targets],
                              lambda i, xa, xb, ya, yb: multitask_focal_loss(
                                  xa, ya, xb, yb, lambda_icd, lambda_ccs, impl=i, check_targets=False,
                                  **focal_kwargs))
    if impl == "reference":
        return reference.multitask_focal_loss(icd_logits, icd_targets, ccs_logits, ccs_targets, lambda_icd,
                                              lambda_ccs, **focal_kwargs)
    if (reduction == "none" or torch.compiler.is_compiling() or ccs_logits.device != icd_logits.device
            or ccs_logits.dtype != icd_logits.dtype):
        kw = dict(impl=impl, check_targets=False, **focal_kwargs)
        return (lambda_icd * focal_loss(icd_logits, icd_targets, names=("icd_logits", "icd_targets"), **kw)
                + lambda_ccs * focal_loss(ccs_logits, ccs_targets, names=("ccs_logits", "ccs_targets"), **kw))
    use_triton = _use_triton(impl, icd_logits, "multitask_focal_loss")
    scale_a = float(lambda_icd) * _scale(icd_logits, reduction)
    scale_b = float(lambda_ccs) * _scale(ccs_logits, reduction)
    params = (scale_a, scale_b, float(alpha), float(gamma), bool(balanced))
    if torch.is_grad_enabled() and (icd_logits.requires_grad or ccs_logits.requires_grad):
        return _MultitaskFocalLoss.apply(icd_logits, icd_targets, ccs_logits, ccs_targets, params + (use_triton,))
    return _multitask_run(icd_logits, icd_targets, ccs_logits, ccs_targets, *params, False, use_triton)[0]
