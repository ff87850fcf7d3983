"""The fused Triton implementation of the label-wise attention (impl "triton"): launches the kernels
of `marn_fast.kernels.label_attention` (one pass over token tiles with an online softmax forward;
a recompute-from-lse backward split into a token-major pass for dO (and dK with keys) and a
label-major pass for dQ, dW). fp16/bf16/fp32 on CUDA, or on CPU tensors under
TRITON_INTERPRET=1. Inputs in one dtype (the entry point casts them); z, lse and the gradient
accumulators fp32. The math and the
registration are in `marn_fast.ops.label_attention`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..kernels import interpreting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_flags(dtype: torch.dtype) -> dict:
    """UPCAST: bf16 tl.dot is wrong under the interpreter; fp32 dots in IEEE precision (no TF32)."""
    return {"UPCAST": interpreting() and dtype == torch.bfloat16,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def label_splits(device: torch.device, batch: int, num_labels: int) -> int:
    """Document groups of the dQ/dW kernel: on CUDA enough (label tile, group) programs for two
    per SM when L is small (at most B); 1 on the CPU interpreter."""
    if device.type != "cuda":
        return 1
    from ..kernels.label_attention import NOMINAL_BLOCK_L

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    label_tiles = -(-num_labels // NOMINAL_BLOCK_L)
    return max(1, min(batch, -(-2 * sms // label_tiles)))


def forward(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
            keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(z, lse) [B, L] fp32; keys None: K = O (the kernels compile without the keyed loads)."""
    import triton

    from ..kernels import label_attention as kernels

    features, queries, weights, lengths = (t.contiguous() for t in (features, queries, weights, lengths))
    keyed = keys is not None
    k = features if keys is None else keys.contiguous()
    batch, n, c = features.shape
    num_labels = queries.shape[0]
    z = features.new_empty((batch, num_labels), dtype=torch.float32)
    lse = torch.empty_like(z)
    grid = lambda meta: (batch, triton.cdiv(num_labels, meta["BLOCK_L"]))  # noqa: E731
    kernels.label_attention_fwd[grid](features, k, queries, weights, lengths, z, lse, n, num_labels, c, k.shape[2],
                                      KEYED=keyed, **_kernel_flags(features.dtype))
    return z, lse


def backward(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
             keys: Optional[Tensor], z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dO, dK, dQ, dW) in the inputs' dtypes (fp32 accumulators; dK empty without keys)."""
    import triton

    from ..kernels import label_attention as kernels

    grad_z, features, queries, weights, lengths, z, lse = (
        t.contiguous() for t in (grad_z.float(), features, queries, weights, lengths, z, lse))
    keyed = keys is not None
    k = features if keys is None else keys.contiguous()
    batch, n, c = features.shape
    d_k = k.shape[2]
    num_labels = queries.shape[0]
    flags = dict(KEYED=keyed, **_kernel_flags(features.dtype))
    grad_features = features.new_zeros((batch, n, c), dtype=torch.float32)
    grad_k = features.new_zeros((batch, n, d_k), dtype=torch.float32) if keyed else grad_features
    grid_a = lambda meta: (batch, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernels.label_attention_bwd_features[grid_a](features, k, queries, weights, lengths, z, lse, grad_z,
                                                 grad_features, grad_k, n, num_labels, c, d_k, **flags)
    splits = label_splits(features.device, batch, num_labels)
    grad_q = features.new_empty((splits, num_labels, d_k), dtype=torch.float32)
    grad_w = features.new_empty((splits, num_labels, c), dtype=torch.float32)
    grid_b = lambda meta: (triton.cdiv(num_labels, meta["BLOCK_L"]), splits)  # noqa: E731
    kernels.label_attention_bwd_labels[grid_b](features, k, queries, weights, lengths, z, lse, grad_z, grad_q,
                                               grad_w, batch, n, num_labels, c, d_k, splits, **flags)
    grad_keys = features.new_empty(0) if keys is None else grad_k.to(keys.dtype)
    return (grad_features.to(features.dtype), grad_keys, grad_q.sum(0).to(queries.dtype),
            grad_w.sum(0).to(weights.dtype))
