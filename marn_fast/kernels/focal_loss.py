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

`focal_loss_forward` is one launch, the reduction to the scalar loss included (the last program
to finish sums the per-block partials in a fixed order), for one head or for both heads of the
multitask loss at once.
"""
from __future__ import annotations

from typing import Optional

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
def _head(x_ptr, y_ptr, loss_ptr, grad_ptr, pid, n_elements, alpha, gamma, scale,
          BALANCED: tl.constexpr, REDUCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
          FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [pid·BLOCK, (pid+1)·BLOCK) of one head's flattened, contiguous inputs. Stores
    grad_ptr[k] = scale·dloss_k/dx_k (COMPUTE_GRAD) and, without REDUCE, loss_ptr[k] = loss_k;
    returns scale·Σ loss over the block (REDUCE; else 0)."""
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

    if COMPUTE_GRAD:
        tl.store(grad_ptr + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        part = tl.sum(tl.where(mask, loss, 0.0), axis=0) * scale
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
        part = 0.0
    return part


@triton.jit
def focal_loss_kernel(xa_ptr, ya_ptr, xb_ptr, yb_ptr, loss_ptr, grad_ptr, partial_ptr, ticket_ptr,
                      n_a, n_b, programs_a, alpha, gamma, scale_a, scale_b,
                      BALANCED: tl.constexpr, REDUCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                      TWO_HEADS: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Programs [0, programs_a) take head a, the rest head b (TWO_HEADS, REDUCE only); head b's
    gradient follows head a's in grad_ptr (one buffer of n_a + n_b elements).

    REDUCE: the total Σ_head scale_head·Σ loss is reduced in this launch: each program writes its
    block's partial sum, then takes a ticket (an integer atomic, after a barrier so that the
    partial is written first); the program that draws the last ticket sums the partials in index
    order, writes loss_ptr[0] and resets the ticket counter to 0 for the next launch. The order of
    the sum never depends on timing: results are deterministic."""
    pid = tl.program_id(0)
    if TWO_HEADS:
        if pid < programs_a:
            part = _head(xa_ptr, ya_ptr, loss_ptr, grad_ptr, pid, n_a, alpha, gamma, scale_a,
                         BALANCED, REDUCE, COMPUTE_GRAD, FP64, BLOCK)
        else:
            part = _head(xb_ptr, yb_ptr, loss_ptr, grad_ptr + n_a, pid - programs_a, n_b, alpha, gamma, scale_b,
                         BALANCED, REDUCE, COMPUTE_GRAD, FP64, BLOCK)
    else:
        part = _head(xa_ptr, ya_ptr, loss_ptr, grad_ptr, pid, n_a, alpha, gamma, scale_a,
                     BALANCED, REDUCE, COMPUTE_GRAD, FP64, BLOCK)
    if REDUCE:
        tl.store(partial_ptr + pid, part)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        programs = tl.num_programs(0)
        if ticket == programs - 1:
            acc = tl.zeros([BLOCK], dtype=part.dtype)
            for start in range(0, programs, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                acc += tl.load(partial_ptr + offs, mask=offs < programs, other=0.0, volatile=True)
            tl.store(loss_ptr, tl.sum(acc, axis=0))
            tl.atomic_xchg(ticket_ptr, 0)


# One ticket counter per (device, stream): zero between launches (the last program resets it), so
# a launch needs no memset; launches on one stream never overlap.
_TICKETS: dict = {}


def _ticket(device: torch.device) -> torch.Tensor:
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _as_read(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t  # bool targets read as bytes, no copy


def focal_loss_forward(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                       balanced: bool, reduce: bool, scale: float, compute_grad: bool,
                       logits_b: Optional[torch.Tensor] = None, targets_b: Optional[torch.Tensor] = None,
                       scale_b: float = 1.0):
    """One launch. Returns (loss, grad): loss the scalar scale·Σ loss (+ scale_b·Σ loss_b with a
    second head; fp32, fp64 for fp64 logits) when `reduce`, else [B, L] in the logits' dtype;
    grad = scale·dloss/dx in the logits' dtype, or None without `compute_grad`. With a second
    head (reduce only) grad is one flat buffer: head a's n_a elements, then head b's."""
    x, y = logits.contiguous(), _as_read(targets)
    two = logits_b is not None
    xb, yb = (logits_b.contiguous(), _as_read(targets_b)) if two else (x, y)
    n_a, n_b = x.numel(), (xb.numel() if two else 0)
    programs_a = triton.cdiv(n_a, BLOCK_SIZE)
    grid = (programs_a + triton.cdiv(n_b, BLOCK_SIZE),)
    fp64 = x.dtype == torch.float64
    if reduce:
        loss = torch.empty((), dtype=torch.float64 if fp64 else torch.float32, device=x.device)
        partial = torch.empty(grid[0], dtype=loss.dtype, device=x.device)
        ticket = _ticket(x.device)
    else:
        loss = partial = ticket = torch.empty_like(x)
    grad = torch.empty(n_a + n_b, dtype=x.dtype, device=x.device) if compute_grad else None
    focal_loss_kernel[grid](x, y, xb, yb, loss, loss if grad is None else grad, partial, ticket, n_a, n_b,
                            programs_a, float(alpha), float(gamma), float(scale), float(scale_b),
                            BALANCED=bool(balanced), REDUCE=bool(reduce), COMPUTE_GRAD=bool(compute_grad),
                            TWO_HEADS=two, FP64=fp64, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    if grad is not None and not two:
        grad = grad.view(x.shape)
    return loss, grad
