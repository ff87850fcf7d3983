"""Triton kernel of the focal loss: the loss (per element, or per-block partial sums) and its
gradient dL/dx in one pass over logits and targets.

Math in log space, per element with x the logit, y ∈ [0, 1] the target, e = exp(−|x|):
  sp(x) = max(x, 0) + log1p(e) = −log(1 − p),  sp(−x) = −log p,  p = σ(x)
  official (BALANCED=False):  b = y·sp(−x) + (1−y)·sp(x) (BCE),  p_t = exp(−b),  q = 1 − p_t,
      loss = α·q^γ·b,   dloss/dx = α·(p − y)·q^γ·(1 + γ·p_t·b/q)        (b/q → 1 as q → 0)
  eq. 16 (BALANCED=True):  w₊ = α·y·(1−p)^γ,  w₋ = (1−α)(1−y)·p^γ  (powers as exp(−γ·sp)),
      loss = w₊·sp(−x) + w₋·sp(x),
      dloss/dx = w₋·(γ·(1−p)·sp(x) + p) − w₊·(γ·p·sp(−x) + (1−p))
Both are finite for any finite x and γ ≥ 0 (0^γ is taken as 1 for γ = 0, 0 otherwise; no
q^(γ−1) is ever formed). Math runs in fp32 (fp64 for fp64 logits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements per program; also the length summed into one partial sum
NUM_WARPS = 4


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e ∈ [0, 1], accurate to a few ulps: log(u)·e/(u − 1) with u = 1 + e."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _one_minus_exp_neg(b, u):
    """q = 1 − exp(−b) = −expm1(−b) for b ≥ 0 given u = exp(−b): 1 − u where that is exact
    enough (u ≤ 1/2), else Kahan's (1 − u)·b/(−log u), which cancels the rounding of u."""
    d = 1.0 - u
    near = (u > 0.5) & (d > 0.0)
    neg_log = tl.where(near, -tl.log(tl.where(near, u, 0.5)), 1.0)
    return tl.where(u > 0.5, tl.where(d == 0.0, b, d * (b / neg_log)), d)


@triton.jit
def focal_loss_kernel(x_ptr, y_ptr, loss_ptr, grad_ptr, n_elements, alpha, gamma, scale,
                      BALANCED: tl.constexpr, REDUCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                      FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Program i handles elements [i·BLOCK, (i+1)·BLOCK) of the flattened, contiguous inputs.

    REDUCE: loss_ptr[i] = scale·Σ loss over the block (the host sums these in a fixed order);
    else loss_ptr[k] = loss_k in loss_ptr's dtype. COMPUTE_GRAD: grad_ptr[k] = scale·dloss_k/dx_k.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(x.dtype)

    e = tl.exp(-tl.abs(x))
    l1 = _log1p_unit(e)
    sp_pos = tl.maximum(x, 0.0) + l1   # softplus(x)  = −log(1 − p)
    sp_neg = tl.maximum(-x, 0.0) + l1  # softplus(−x) = −log p
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0.0, inv, e * inv)   # σ(x)
    pm = tl.where(x >= 0.0, e * inv, inv)  # σ(−x) = 1 − p
    if BALANCED:
        w_pos = alpha * y * tl.exp(-gamma * sp_pos)                 # α·y·(1 − p)^γ
        w_neg = (1.0 - alpha) * (1.0 - y) * tl.exp(-gamma * sp_neg)  # (1 − α)(1 − y)·p^γ
        loss = w_pos * sp_neg + w_neg * sp_pos
        grad = w_neg * (gamma * pm * sp_pos + p) - w_pos * (gamma * p * sp_neg + pm)
    else:
        bce = y * sp_neg + (1.0 - y) * sp_pos
        pt = tl.exp(-bce)
        q = _one_minus_exp_neg(bce, pt)
        q_pos = q > 0.0
        q_safe = tl.where(q_pos, q, 1.0)
        q_gamma = tl.where(q_pos, tl.exp(gamma * tl.log(q_safe)), tl.where(gamma == 0.0, 1.0, 0.0))
        loss = alpha * q_gamma * bce
        ratio = tl.where(q_pos, bce / q_safe, 1.0)  # b/q ∈ [1, b + 1]
        s = (1.0 - y) * p - y * pm                  # σ(x) − y without cancellation for hard y
        grad = alpha * s * q_gamma * (1.0 + gamma * pt * ratio)

    if REDUCE:
        tl.store(loss_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0) * scale)
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_GRAD:
        tl.store(grad_ptr + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def focal_loss_forward(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                       balanced: bool, reduce: bool, scale: float, compute_grad: bool):
    """One launch. Returns (loss, grad): loss the scalar scale·Σ loss (fp32; fp64 for fp64 logits)
    when `reduce`, else [B, L] in the logits' dtype; grad = scale·dloss/dx in the logits' dtype,
    or None without `compute_grad`. bool targets are read as bytes (a view, no conversion)."""
    x = logits.contiguous()
    y = targets.contiguous()
    if y.dtype == torch.bool:
        y = y.view(torch.uint8)
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    fp64 = x.dtype == torch.float64
    if reduce:
        out = torch.empty(grid[0], dtype=torch.float64 if fp64 else torch.float32, device=x.device)
    else:
        out = torch.empty_like(x)
    grad = torch.empty_like(x) if compute_grad else None
    focal_loss_kernel[grid](x, y, out, out if grad is None else grad, n, float(alpha), float(gamma),
                            float(scale), BALANCED=bool(balanced), REDUCE=bool(reduce),
                            COMPUTE_GRAD=bool(compute_grad), FP64=fp64, BLOCK=BLOCK_SIZE,
                            num_warps=NUM_WARPS)
    # Deterministic: a fixed-size sum over the per-block partials, no float atomics.
    return (out.sum() if reduce else out), grad
