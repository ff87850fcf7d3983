"""Label-wise attention, plain PyTorch (the oracle of `marn_fast.ops.label_attention`).

The label-wise attention of MARN (paper eqs. 12–15), CAML, LAAT/JointLAAT and PLM-ICD, with
per-document masks. Per document b with values O = features[b] [n, C], keys K = keys[b]
[n, d_k] (keys=None: K = O, MARN's and CAML's form), Q = queries [L, d_k], W = weights [L, C],
b = bias [L]:
    S = K·Qᵀ                          [n, L]   (mask=True: tokens t ≥ lengths[b] get −∞)
    A = softmax over tokens of S      [n, L]
    V = Aᵀ·O                          [L, C]
    logit_l = w_l·v_l + b_l           [L]
LAAT, JointLAAT and PLM-ICD pass K = tanh(O·W_aᵀ) ([n, d_a], W_a [d_a, C]). mask=False
attends over all n tokens whatever the lengths, as the official LAAT and PLM-ICD code do (they
do not mask padding). This materialises S, A and V; it is the specification, not the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch


def token_mask(lengths: Optional[torch.Tensor], n: int, device: torch.device) -> Optional[torch.Tensor]:
    """Bool [B, n], True on valid tokens (t < lengths[b]); None when every token is valid."""
    if lengths is None:
        return None
    return torch.arange(n, device=device)[None, :] < lengths[:, None]


def attention_weights(features: torch.Tensor, queries: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                      *, keys: Optional[torch.Tensor] = None, mask: bool = True) -> torch.Tensor:
    """A: [B, L, n] softmax over tokens of Q·Kᵀ (K = keys, or the features when None); with
    mask=True only over valid tokens (zero on padded ones), with mask=False over all n."""
    keys = features if keys is None else keys
    scores = torch.matmul(queries, keys.transpose(1, 2))  # [B, L, n]
    valid = token_mask(lengths, keys.shape[1], keys.device) if mask else None
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=2)


def label_attention(features: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
                    bias: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                    keys: Optional[torch.Tensor] = None, mask: bool = True) -> torch.Tensor:
    """Logits [B, L] from features O [B, n, C], Q [L, d_k], W [L, C], b [L], lengths [B], and
    keys K [B, n, d_k] (None: K = O, so d_k = C); mask=False ignores lengths (module docstring)."""
    alpha = attention_weights(features, queries, lengths, keys=keys, mask=mask)  # [B, L, n]
    v = torch.matmul(alpha, features)  # [B, L, C]
    return (weights * v).sum(dim=2) + bias


def topk_evidence(features: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int,
                  lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens by attention weight for chosen labels: labels [B, K] (or [K]) int64 →
    (indices [B, K, k], weights [B, K, k]) from the full A; index −1 / weight 0 past a length.
    For keyed attention pass the keys as `features`: A depends on the keys and queries only."""
    alpha = attention_weights(features, queries, lengths)  # [B, L, n]
    if labels.dim() == 1:
        labels = labels.expand(features.shape[0], -1)
    chosen = torch.gather(alpha, 1, labels[:, :, None].expand(-1, -1, alpha.shape[2]))  # [B, K, n]
    weights, indices = chosen.topk(k, dim=2)
    if lengths is not None:
        padded = indices >= lengths[:, None, None]
        indices, weights = indices.masked_fill(padded, -1), weights.masked_fill(padded, 0.0)
    return indices, weights
