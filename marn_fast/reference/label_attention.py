"""Label-wise attention, plain PyTorch (the oracle of `marn_fast.ops.label_attention`).

CAML-style attention of the MARN paper (eqs. 12–15) with per-document masks. Per document b
with O = features[b] [n, C], Q = queries [L, C], W = weights [L, C], b = bias [L]:
    S = O·Qᵀ                          [n, L]   (tokens t ≥ lengths[b] get −∞)
    A = softmax over tokens of S      [n, L]
    V = Aᵀ·O                          [L, C]
    logit_l = w_l·v_l + b_l           [L]
This materialises S, A and V; it is the specification, not the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch


def token_mask(lengths: Optional[torch.Tensor], n: int, device: torch.device) -> Optional[torch.Tensor]:
    """Bool [B, n], True on valid tokens (t < lengths[b]); None when every token is valid."""
    if lengths is None:
        return None
    return torch.arange(n, device=device)[None, :] < lengths[:, None]


def attention_weights(features: torch.Tensor, queries: torch.Tensor,
                      lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A: [B, L, n] softmax over valid tokens of Q·Oᵀ (zero on padded tokens)."""
    scores = torch.matmul(queries, features.transpose(1, 2))  # [B, L, n]
    mask = token_mask(lengths, features.shape[1], features.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=2)


def label_attention(features: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
                    bias: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits [B, L] from features O [B, n, C], Q [L, C], W [L, C], b [L], lengths [B]."""
    alpha = attention_weights(features, queries, lengths)  # [B, L, n]
    v = torch.matmul(alpha, features)  # [B, L, C]
    return (weights * v).sum(dim=2) + bias


def topk_evidence(features: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int,
                  lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens by attention weight for chosen labels: labels [B, K] (or [K]) int64 →
    (indices [B, K, k], weights [B, K, k]) from the full A; index −1 / weight 0 past a length."""
    alpha = attention_weights(features, queries, lengths)  # [B, L, n]
    if labels.dim() == 1:
        labels = labels.expand(features.shape[0], -1)
    chosen = torch.gather(alpha, 1, labels[:, :, None].expand(-1, -1, alpha.shape[2]))  # [B, K, n]
    weights, indices = chosen.topk(k, dim=2)
    if lengths is not None:
        padded = indices >= lengths[:, None, None]
        indices, weights = indices.masked_fill(padded, -1), weights.masked_fill(padded, 0.0)
    return indices, weights
