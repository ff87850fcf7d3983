"""Focal loss (official MARN form and the paper's eq. 16), entry point.

logits [B, L], targets [B, L] (float in [0, 1], bool or uint8) → scalar ("mean" over all B×L
elements, "sum") or [B, L] ("none").
"""
from __future__ import annotations

import torch

from ..reference.focal_loss import REDUCTIONS
from ..reference.focal_loss import focal_loss as reference_focal_loss
from ..reference.checks import FLOAT_DTYPES, check_targets, check_tensor


def check_focal_args(logits, targets, alpha, gamma, reduction, name="logits", target_name="targets") -> None:
    check_tensor(name, logits, ndim=2, dtypes=FLOAT_DTYPES, expected="[B, L] float")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [B, L] tensor, got shape {tuple(logits.shape)}")
    check_targets(target_name, targets, logits.shape)
    if targets.device != logits.device:
        raise ValueError(f"{target_name}: expected device {logits.device} ({name}' device), got {targets.device}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if not float(gamma) >= 0.0:
        raise ValueError(f"gamma: expected a value >= 0, got {gamma}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.999, gamma: float = 2.0,
               balanced: bool = False, reduction: str = "mean") -> torch.Tensor:
    check_focal_args(logits, targets, alpha, gamma, reduction)
    return reference_focal_loss(logits, targets, alpha=alpha, gamma=gamma, balanced=balanced,
                                 reduction=reduction)


def multitask_focal_loss(icd_logits, icd_targets, ccs_logits, ccs_targets, lambda_icd: float = 0.7,
                         lambda_ccs: float = 0.3, **focal_kwargs) -> torch.Tensor:
    return (lambda_icd * focal_loss(icd_logits, icd_targets, **focal_kwargs)
            + lambda_ccs * focal_loss(ccs_logits, ccs_targets, **focal_kwargs))
