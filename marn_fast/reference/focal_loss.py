"""Focal loss, plain PyTorch (the oracle of `marn_fast.ops.focal_loss`).

Per element, with x the logit, y ∈ [0, 1] the target and p = σ(x):
  official MARN form (balanced=False):  α·(1 − p_t)^γ·BCE(x, y),  p_t = exp(−BCE(x, y))
  paper eq. 16 (balanced=True):         −y·α·(1−p)^γ·log p − (1−y)·(1−α)·p^γ·log(1−p)
reduction "mean" averages over all B×L elements (as the official code), "sum" adds them,
"none" returns [B, L]. Written as the official code writes it: the transcription, not the
numerically careful fused form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean")
ALPHA, GAMMA = 0.999, 2.0  # the official code's α and γ: the defaults of every focal-loss function


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = ALPHA, gamma: float = GAMMA,
               balanced: bool = False, reduction: str = "mean") -> torch.Tensor:
    y = targets.to(logits.dtype)
    if balanced:
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)
        log_1mp = F.logsigmoid(-logits)
        loss = -y * alpha * (1 - p) ** gamma * log_p - (1 - y) * (1 - alpha) * p ** gamma * log_1mp
    else:
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        pt = torch.exp(-bce)
        loss = alpha * (1 - pt) ** gamma * bce
    return _reduce(loss, reduction)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction=reduction)


def multitask_focal_loss(icd_logits: torch.Tensor, icd_targets: torch.Tensor,
                         ccs_logits: torch.Tensor, ccs_targets: torch.Tensor,
                         lambda_icd: float = 0.7, lambda_ccs: float = 0.3, **focal_kwargs) -> torch.Tensor:
    """λ_d·FL_icd + λ_s·FL_ccs (eq. 17)."""
    return (lambda_icd * focal_loss(icd_logits, icd_targets, **focal_kwargs)
            + lambda_ccs * focal_loss(ccs_logits, ccs_targets, **focal_kwargs))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(−|x|)), exact to rounding for every finite x."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def focal_loss_elementwise(logits: torch.Tensor, targets: torch.Tensor, alpha: float = ALPHA,
                           gamma: float = GAMMA, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element loss [B, L] and its analytic derivative d loss/d x [B, L], in log space.

    The same two forms as `focal_loss`, written so that they stay finite and accurate for any
    finite logit and γ ≥ 0 (the transcription above returns NaN gradients where 1 − p_t rounds
    to 0 and γ < 1). With sp = softplus, log p = −sp(−x), log(1 − p) = −sp(x):
      official:  b = BCE = y·sp(−x) + (1−y)·sp(x),  q = 1 − p_t = −expm1(−b),
                 loss = α·q^γ·b,  d/dx = α·(σ(x) − y)·(q^γ + γ·q^γ·p_t·b/q)   (b/q → 1 as q → 0)
      eq. 16:    w₊ = α·y·exp(−γ·sp(x)),  w₋ = (1−α)(1−y)·exp(−γ·sp(−x)),
                 loss = w₊·sp(−x) + w₋·sp(x),
                 d/dx = w₋·(γ·σ(−x)·sp(x) + σ(x)) − w₊·(γ·σ(x)·sp(−x) + σ(−x))
    Run it in float64 for an oracle at extreme logits.
    """
    x = logits
    y = targets.to(x.dtype)
    sp_pos, sp_neg = _softplus(x), _softplus(-x)
    p, pm = torch.sigmoid(x), torch.sigmoid(-x)
    if balanced:
        w_pos = alpha * y * torch.exp(-gamma * sp_pos)
        w_neg = (1 - alpha) * (1 - y) * torch.exp(-gamma * sp_neg)
        loss = w_pos * sp_neg + w_neg * sp_pos
        grad = w_neg * (gamma * pm * sp_pos + p) - w_pos * (gamma * p * sp_neg + pm)
    else:
        bce = y * sp_neg + (1 - y) * sp_pos
        pt = torch.exp(-bce)
        q = -torch.expm1(-bce)
        q_gamma = q.pow(gamma)  # torch: 0^0 = 1, 0^γ = 0 for γ > 0
        ratio = torch.where(q > 0, bce / torch.where(q > 0, q, torch.ones_like(q)), torch.ones_like(q))
        loss = alpha * q_gamma * bce
        grad = alpha * ((1 - y) * p - y * pm) * q_gamma * (1 + gamma * pt * ratio)
    return loss, grad
