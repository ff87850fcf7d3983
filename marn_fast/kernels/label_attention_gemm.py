"""Triton kernels of the GEMM-first label attention (impls "gemm" and "gemm_saved" of
`marn_fast.ops.label_attention`, which holds the math). A vendor GEMM has already written the
scores of one block of labels for a group of documents, label-major:

    S, P [Lc, D·T] (row stride D·T):  s_lt = q_l·o_t and p_lt = w_l·o_t; document d of the
        group owns the columns d·T … d·T + T − 1 (T = the group's token count), of which only
        the first lengths[d] are valid.

Tokens are contiguous in memory, so every load below is coalesced along tokens. These kernels
never touch O, Q or W; the caller runs the GEMMs before and after them.

* `softmax_partials` — one program per (label tile, document, token split): an online softmax
  over the split's valid tokens gives the running max m, Σ e and Σ e·p (e = exp(s − m)), fp32,
  into [SPLITS, D, Lc] buffers that the caller combines (z = Σe·p / Σe, lse = m + log Σe).
  Several splits keep the GPU busy when D·Lc is small and T large.
* `attention_transform` — elementwise and in place, one program per (token tile, label tile,
  document), with a = exp(s − lse) on valid tokens and 0 on padded ones:
      GRAD = False:  s ← a,    p ← a·(p − z)             (what backward needs, kept from forward)
      GRAD = True:   s ← g·a,  p ← g·a·(p − z)  = [dP; dS]   (the backward's recompute path)
  Math in fp32 whatever the buffer's dtype; results are stored in the buffer's dtype. Not
  autotuned: a rerun of an in-place kernel would apply it twice.
Offsets that can pass 2^31 (label rows × D·T) are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpreting

# Tile sizes: [BLOCK_L labels, BLOCK_T tokens], tokens contiguous. The interpreter's cost grows
# with the number of programs, so it gets small tiles (still >= 16, the GPU minimum).
if interpreting():
    BLOCK_L, BLOCK_T, NUM_WARPS = 16, 32, 4
else:
    BLOCK_L, BLOCK_T, NUM_WARPS = 16, 256, 4


@triton.jit
def softmax_partials(S_IN, P_IN, LENGTHS, M, S, A, row_stride, n_tokens, num_labels, num_docs, span,
                     BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid (cdiv(Lc, BLOCK_L), D, SPLITS). Split k covers tokens [k·span, (k+1)·span) ∩
    [0, lengths[d]); M, S, A [SPLITS, D, Lc] fp32 (a split without valid tokens writes −inf, 0, 0)."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    doc = tl.program_id(1)
    split = tl.program_id(2)
    mask_l = offs_l < num_labels
    length = tl.load(LENGTHS + doc).to(tl.int32)
    t_begin = split * span
    t_end = tl.minimum(length, t_begin + span)
    rows = offs_l.to(tl.int64) * row_stride + doc.to(tl.int64) * n_tokens
    m_i = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for start in range(t_begin, t_end, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        mask = mask_l[:, None] & (offs_t < t_end)[None, :]
        offs = rows[:, None] + offs_t[None, :]
        s = tl.load(S_IN + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.load(P_IN + offs, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # label rows past Lc: all −inf
        rescale = tl.exp(m_i - m_safe)
        e = tl.exp(s - m_safe[:, None])
        l_i = l_i * rescale + tl.sum(e, axis=1)
        # where(): a padded or huge p (inf in half precision) must not turn 0·p into NaN
        acc = acc * rescale + tl.sum(tl.where(mask, e * p, 0.0), axis=1)
        m_i = m_new
    out = (split.to(tl.int64) * num_docs + doc) * num_labels + offs_l
    tl.store(M + out, m_i, mask=mask_l)
    tl.store(S + out, l_i, mask=mask_l)
    tl.store(A + out, acc, mask=mask_l)


@triton.jit
def attention_transform(S_IN, P_IN, LENGTHS, Z, LSE, G, row_stride, n_tokens, num_labels, label_stride,
                        label_offset, GRAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), cdiv(Lc, BLOCK_L), D). Z, LSE, G: fp32 [·, label_stride]; document
    d's values for label l are at (d·label_stride + label_offset + l). In place on S and P."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    doc = tl.program_id(2)
    mask_l = offs_l < num_labels
    length = tl.load(LENGTHS + doc).to(tl.int32)
    mask = mask_l[:, None] & (offs_t < n_tokens)[None, :]
    valid = mask_l[:, None] & (offs_t < length)[None, :]
    offs = (offs_l.to(tl.int64) * row_stride + doc.to(tl.int64) * n_tokens)[:, None] + offs_t[None, :]
    s = tl.load(S_IN + offs, mask=valid, other=0.0).to(tl.float32)
    p = tl.load(P_IN + offs, mask=valid, other=0.0).to(tl.float32)
    stats = doc.to(tl.int64) * label_stride + label_offset + offs_l
    lse = tl.load(LSE + stats, mask=mask_l, other=0.0)
    z = tl.load(Z + stats, mask=mask_l, other=0.0)
    a = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    if GRAD:
        a = a * tl.load(G + stats, mask=mask_l, other=0.0)[:, None]
    b = tl.where(valid, a * (p - z[:, None]), 0.0)
    tl.store(S_IN + offs, a.to(S_IN.dtype.element_ty), mask=mask)
    tl.store(P_IN + offs, b.to(P_IN.dtype.element_ty), mask=mask)
