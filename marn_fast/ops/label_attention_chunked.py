"""The chunked implementation of the label-wise attention (impl "torch"): memory bounded whatever
n and L, any device and float dtype.

Forward: on CPU tensors (fp32, fp64, bf16) with the extension built, the C++ kernel
`marn_fast::label_attention_forward` (csrc/cpu/label_attention_cpu.cpp): per (document, 256
labels) it walks 256-token tiles, one GEMM per tile and one vectorised online-softmax pass while
the tile is in cache (1.12–1.43× the eager forward in fp32 where the PyTorch chunks reach
0.95–1.17×: B=4, n=2,000, C=600, L=2,000 and 9,000, 1 and 2 threads). Elsewhere plain-PyTorch
chunks: per chunk of DOC_CHUNK documents × LABEL_CHUNK labels × TOKEN_CHUNK tokens one batched
GEMM [Q; W]·Oᵀ gives S and P (with keys K: S = Q·Kᵀ and P = W·Oᵀ, two GEMMs), so the largest
intermediate is [DOC_CHUNK, 2·LABEL_CHUNK, TOKEN_CHUNK] whatever n and L, and an online softmax
carries the running max, Σe and Σe·p.
Backward: the same chunks, recomputing a = exp(s − lse): dp = g·a, ds = g·a·(p − z),
dO += [dp; ds]ᵀ·[W; Q], [dW; dQ] += [dp; ds]·O (with keys: dO += dpᵀ·W, dK += dsᵀ·Q,
dW += dp·O, dQ += ds·K). Tokens past the longest document of a chunk are never read.
Precision: the GEMMs run in the inputs' dtype (bf16 GEMMs for bf16: their scores are rounded to
bf16, as the eager reference's), everything else in the accumulation dtype (fp32; fp64 for fp64),
and fp16 on the CPU in fp32 (said once). The math and the registration are in
`marn_fast.ops.label_attention`.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ._extension import cpu_extension_available
from .precision import accumulation_dtype, warn_once

# Documents, labels and tokens per chunk. The largest intermediate is the score chunk
# [DOC_CHUNK, 2·LABEL_CHUNK, TOKEN_CHUNK] in the compute dtype (16 MiB in fp32).
# Measured on 2 CPU cores at B=4, n=2000, C=600, L=9000 (forward, vs the eager reference): one
# document per chunk (skips each document's padding) 1.37×; 2 × 512 labels 1.12–1.26×; 4 × 256
# labels 1.05–1.19×. Time is GEMM-bound; smaller chunks mean more, smaller ops.
DOC_CHUNK = 1
LABEL_CHUNK = 1024
TOKEN_CHUNK = 2048
CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def chunks(length: int, size: int) -> Iterator[Tuple[int, int]]:
    """[start, end) ranges of `size` covering [0, length)."""
    return ((start, min(start + size, length)) for start in range(0, length, size))


def gemm_dtype(features: Tensor) -> torch.dtype:
    """The dtype of the chunks' GEMMs: the features' dtype; fp32 for fp16 on the CPU (said once)."""
    if features.dtype == torch.float16 and not features.is_cuda:
        warn_once("label_attention-fp16-cpu", "label attention computes float16 inputs in float32 on the CPU")
        return torch.float32
    return features.dtype


def _chunk_grid(lengths: Tensor, num_labels: int):
    """(d0, d1, l0, l1, t0, t1) per chunk of documents × labels × tokens; token chunks stop at the
    longest document of the document chunk."""
    token_ends = lengths.tolist()
    for d0, d1 in chunks(len(token_ends), DOC_CHUNK):
        for l0, l1 in chunks(num_labels, LABEL_CHUNK):
            for t0, t1 in chunks(max(token_ends[d0:d1]), TOKEN_CHUNK):
                yield d0, d1, l0, l1, t0, t1


def _score_chunk(features, queries, weights, lengths, keys, chunk, dtype, acc) -> Tuple[Tensor, Tensor, Tensor]:
    """o = features[d0:d1, t0:t1] and k = keys[d0:d1, t0:t1] (k is o without keys) in `dtype`,
    and sp = [Q·kᵀ; W·oᵀ] [docs, 2·labels, tokens] (S then P: one GEMM [Q; W]·oᵀ without keys,
    two with; in `dtype`, then in `acc`) with S = −∞ on padded tokens. Callers keep sp local to
    one chunk's function so that only one chunk is alive at a time."""
    d0, d1, l0, l1, t0, t1 = chunk
    o = features[d0:d1, t0:t1].to(dtype)
    if keys is None:
        k = o
        qw = torch.cat([queries[l0:l1], weights[l0:l1]]).to(dtype)
        sp = torch.bmm(qw.expand(d1 - d0, -1, -1), o.transpose(1, 2)).to(acc)
    else:
        k = keys[d0:d1, t0:t1].to(dtype)
        s = torch.matmul(queries[l0:l1].to(dtype), k.transpose(1, 2))
        sp = torch.cat([s, torch.matmul(weights[l0:l1].to(dtype), o.transpose(1, 2))], dim=1).to(acc)
    padded = torch.arange(t0, t1, device=features.device) >= lengths[d0:d1, None, None]
    sp[:, :l1 - l0].masked_fill_(padded, float("-inf"))
    return o, k, sp


def _forward_chunk(features, queries, weights, lengths, keys, chunk, dtype, m, total, acc) -> None:
    """Online-softmax update of the running max m, Σe and Σe·p [B, L] for one chunk."""
    d0, d1, l0, l1, t0, _ = chunk
    _, _, sp = _score_chunk(features, queries, weights, lengths, keys, chunk, dtype, m.dtype)
    s, p = sp[:, :l1 - l0], sp[:, l1 - l0:]
    m_chunk = s.amax(2)
    rows = (slice(d0, d1), slice(l0, l1))
    if t0 == 0:  # first token chunk: nothing to rescale
        e = s.sub_(m_chunk[:, :, None]).exp_()
        m[rows], total[rows], acc[rows] = m_chunk, e.sum(2), e.mul_(p).sum(2)
        return
    m_new = torch.maximum(m[rows], m_chunk)
    rescale = (m[rows] - m_new).exp_()
    e = s.sub_(m_new[:, :, None]).exp_()
    total[rows] = total[rows] * rescale + e.sum(2)
    acc[rows] = acc[rows] * rescale + e.mul_(p).sum(2)
    m[rows] = m_new


def forward_torch(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                  keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(z, lse) through plain-PyTorch chunks (any device and float dtype); keys None: K = O."""
    shape = (features.shape[0], queries.shape[0])
    dtype = gemm_dtype(features)
    m, total, acc = (features.new_empty(shape, dtype=accumulation_dtype(dtype)) for _ in range(3))
    for chunk in _chunk_grid(lengths, queries.shape[0]):
        _forward_chunk(features, queries, weights, lengths, keys, chunk, dtype, m, total, acc)
    return acc / total, m + total.log()


def cpu_kernel_applies(features: Tensor) -> bool:
    """Whether the forward runs the C++ kernel: CPU tensors of CPU_KERNEL_DTYPES, extension built."""
    return features.device.type == "cpu" and features.dtype in CPU_KERNEL_DTYPES and cpu_extension_available()


def forward(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
            keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(z, lse) [B, L]: the C++ kernel where it applies, else the PyTorch chunks; keys None: K = O."""
    if cpu_kernel_applies(features):
        return torch.ops.marn_fast.label_attention_forward(features, queries, weights, lengths, keys)
    return forward_torch(features, queries, weights, lengths, keys)


def _backward_chunk(features, queries, weights, lengths, keys, chunk, dtype, grad_z, z, lse,
                    grad_features, grad_keys, grad_q, grad_w) -> None:
    """Adds one chunk's share of dO, dK (with keys), dQ, dW (a recomputed from lse)."""
    d0, d1, l0, l1, t0, t1 = chunk
    o, k, sp = _score_chunk(features, queries, weights, lengths, keys, chunk, dtype, grad_features.dtype)
    lc = l1 - l0
    s, p = sp[:, :lc], sp[:, lc:]  # overwritten in place by dp, then ds
    dp = s.sub_(lse[d0:d1, l0:l1, None]).exp_().mul_(grad_z[d0:d1, l0:l1, None])  # g·a
    p.sub_(z[d0:d1, l0:l1, None]).mul_(dp)  # ds = g·a·(p − z)
    sp = sp.to(dtype)
    if keys is None:
        wq = torch.cat([weights[l0:l1], queries[l0:l1]]).to(dtype)  # pairs with [dp; ds]
        grad_features[d0:d1, t0:t1] += torch.matmul(sp.transpose(1, 2), wq)
        grad_wq = torch.bmm(sp, o).sum(0)  # [dW; dQ] rows of the label chunk
        grad_w[l0:l1] += grad_wq[:lc]
        grad_q[l0:l1] += grad_wq[lc:]
        return
    dp, ds = sp[:, :lc], sp[:, lc:]
    grad_features[d0:d1, t0:t1] += torch.matmul(dp.transpose(1, 2), weights[l0:l1].to(dtype))
    grad_keys[d0:d1, t0:t1] += torch.matmul(ds.transpose(1, 2), queries[l0:l1].to(dtype))
    grad_w[l0:l1] += torch.bmm(dp, o).sum(0)
    grad_q[l0:l1] += torch.bmm(ds, k).sum(0)


def backward(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
             keys: Optional[Tensor], z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dO, dK, dQ, dW) in the inputs' dtypes (dK empty without keys), accumulated in the
    accumulation dtype."""
    dtype = gemm_dtype(features)
    acc = accumulation_dtype(dtype)
    grad_features = torch.zeros_like(features, dtype=acc)
    grad_keys = grad_features if keys is None else torch.zeros_like(keys, dtype=acc)  # unused without keys
    grad_q = torch.zeros_like(queries, dtype=acc)
    grad_w = torch.zeros_like(weights, dtype=acc)
    grad_z, z, lse = grad_z.to(acc), z.to(acc), lse.to(acc)
    for chunk in _chunk_grid(lengths, queries.shape[0]):
        _backward_chunk(features, queries, weights, lengths, keys, chunk, dtype, grad_z, z, lse,
                        grad_features, grad_keys, grad_q, grad_w)
    grad_k = features.new_empty(0) if keys is None else grad_keys.to(keys.dtype)
    return grad_features.to(features.dtype), grad_k, grad_q.to(queries.dtype), grad_w.to(weights.dtype)
