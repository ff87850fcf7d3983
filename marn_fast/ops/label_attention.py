"""Label-wise attention logits (paper eqs. 12–15), entry point.

features O [B, n, C], queries Q [L, C], weights W [L, C], bias b [L], lengths [B] int64 →
logits [B, L]:  logit_l = w_l · Σ_t softmax_t(q_l·o_t) o_t + b_l over the valid tokens t < lengths[b].
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.label_attention import label_attention as reference_label_attention
from ..reference.checks import FLOAT_DTYPES, check_lengths, check_same_device, check_shape, check_tensor


def check_label_attention_args(features, queries, weights, bias, lengths) -> None:
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, C] float")
    b, n, c = features.shape
    check_tensor("queries", queries, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L, C={c}] float")
    num_labels = queries.shape[0]
    if queries.shape[1] != c:
        raise ValueError(f"queries: expected [L, C={c}] (C of features {tuple(features.shape)}), "
                         f"got shape {tuple(queries.shape)}")
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L={num_labels}, C={c}]")
    check_shape("weights", weights, (num_labels, c), f"[L, C] (L of queries, C of features)")
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, expected=f"[L={num_labels}]")
    check_shape("bias", bias, (num_labels,), "[L] (L of queries)")
    if n == 0 or num_labels == 0 or c == 0:
        raise ValueError(f"features/queries: n, L and C must be >= 1, got n={n}, L={num_labels}, C={c}")
    check_same_device(features=features, queries=queries, weights=weights, bias=bias, lengths=lengths)
    check_lengths(lengths, b, n, features.device)


def label_attention(features: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
                    bias: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_label_attention_args(features, queries, weights, bias, lengths)
    return reference_label_attention(features, queries, weights, bias, lengths)
