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


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.999, gamma: float = 2.0,
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
