"""Triton kernels of the fused label-wise attention (math in `marn_fast.ops.label_attention`).

Per document b and label l, with O = features[b] [n, C], K = keys[b] [n, D] (KEYED; else K = O
and D = C), q_l a row of Q [L, D], w_l a row of W [L, C]:
    s_lt = q_l·k_t,  p_lt = w_l·o_t,  a_lt = softmax_t(s_lt) over t < lengths[b]
    z_l  = Σ_t a_lt p_lt            (the logit without bias)
    lse_l = log Σ_t exp(s_lt)

Forward `label_attention_fwd`: one program per (document, label tile). It loops over the
document's token tiles only up to its length (padding is never read), computes S = Q·Kᵀ and
P = W·Oᵀ for the tile (without keys from the same loads of O, C looped in BLOCK_C chunks; with
keys K over D, then O over C), and keeps an online softmax (running max m, running sum l,
running Σ e·p). Writes z and lse, fp32 [B, L].

Backward, with g = dz, a_lt = exp(s_lt − lse_l) recomputed tile by tile from the saved lse:
    ds = g·a·(p − z),  dp = g·a,  dO = dp·W (+ ds·Q without keys),  dK = ds·Q,
    dQ = Σ_b dsᵀ·K,  dW = Σ_b dpᵀ·O.
It is split in two kernels so that no output is written by two programs (no atomics, results
are deterministic), at the price of recomputing S and P twice (16·B·n·C·L FLOPs instead of 12):
  * `label_attention_bwd_features` — one program per (document, token tile); loops over label
    tiles and accumulates its own dO rows (and, KEYED, its dK rows in a second [B, n, D]
    buffer). C can be far larger than a register tile (C = 600), so the [BLOCK_N, C]
    accumulator lives in an fp32 buffer that only this program touches,
    updated chunk by chunk (it stays in L2); the first label tile overwrites instead of adding,
    so autotuning reruns and uninitialised memory are harmless.
  * `label_attention_bwd_labels` — one program per (label tile, split); split s handles the
    documents s, s + SPLITS, … and writes its partial dQ [L, D], dW [L, C] (fp32) to slice s of
    [SPLITS, L, D] and [SPLITS, L, C] buffers, summed afterwards by the caller. SPLITS > 1 keeps the GPU busy when
    L is small; it is 1 under the interpreter.
Offsets that can pass 2^31 (b·n·C, t·C, l·C, b·L, and the same with D) are computed in int64.
KEYED is a constexpr: without keys the kernels compile to MARN's form alone (K and DK unused).
Dot products accumulate in fp32; fp32 inputs use input_precision="ieee" (no TF32). Under the
CPU interpreter bf16 `tl.dot` is wrong, so UPCAST=True converts bf16 tiles to fp32 there.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpreting

# Block sizes: the interpreter's cost grows with the number of programs and loop steps, so it
# gets one small config (autotune with more than one config crashes without a GPU).
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_L": 32, "BLOCK_C": 16}, num_warps=4)]
_GPU_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_L": 64, "BLOCK_C": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_L": 128, "BLOCK_C": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_L": 64, "BLOCK_C": 32}, num_warps=8, num_stages=3),
]
_GPU_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_L": 64, "BLOCK_C": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_L": 64, "BLOCK_C": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_L": 64, "BLOCK_C": 32}, num_warps=8, num_stages=2),
]
FWD_CONFIGS = _INTERPRETER_CONFIGS if interpreting() else _GPU_FWD_CONFIGS
BWD_CONFIGS = _INTERPRETER_CONFIGS if interpreting() else _GPU_BWD_CONFIGS
# Label tile used to size the dQ/dW split count (the grid's actual tile comes from autotuning).
NOMINAL_BLOCK_L = 64


@triton.jit
def _dots(X_b, Y, offs_n, mask_n, offs_l, mask_l, D,
          BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Y·X_bᵀ for one [BLOCK_L, BLOCK_N] tile (X_b [n, D] rows offs_n, Y [L, D] rows offs_l),
    looping over D (rows of padded tokens and of out-of-range labels load as zero)."""
    acc = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    offs_c0 = tl.arange(0, BLOCK_C)
    row_n = offs_n.to(tl.int64) * D
    row_l = offs_l.to(tl.int64) * D
    for start_c in range(0, D, BLOCK_C):
        offs_c = start_c + offs_c0
        mask_c = offs_c < D
        x = tl.load(X_b + row_n[:, None] + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        y = tl.load(Y + row_l[:, None] + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(y, tl.trans(x), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _scores(O_b, K_b, Q, W, offs_n, mask_n, offs_l, mask_l, C, D,
            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
            KEYED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """S = Q·Kᵀ and P = W·Oᵀ for one [BLOCK_L, BLOCK_N] tile: KEYED, over D then over C; else
    (K = O) from the same loads of O, looping over C (O rows of padded tokens and rows of
    out-of-range labels load as zero)."""
    if KEYED:
        s = _dots(K_b, Q, offs_n, mask_n, offs_l, mask_l, D, BLOCK_N, BLOCK_L, BLOCK_C, UPCAST, DOT_PRECISION)
        p = _dots(O_b, W, offs_n, mask_n, offs_l, mask_l, C, BLOCK_N, BLOCK_L, BLOCK_C, UPCAST, DOT_PRECISION)
    else:
        s = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
        p = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
        offs_c0 = tl.arange(0, BLOCK_C)
        row_n = offs_n.to(tl.int64) * C
        row_l = offs_l.to(tl.int64) * C
        for start_c in range(0, C, BLOCK_C):
            offs_c = start_c + offs_c0
            mask_c = offs_c < C
            o = tl.load(O_b + row_n[:, None] + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            q = tl.load(Q + row_l[:, None] + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0)
            w = tl.load(W + row_l[:, None] + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0)
            if UPCAST:
                o = o.to(tl.float32)
                q = q.to(tl.float32)
                w = w.to(tl.float32)
            ot = tl.trans(o)
            s = tl.dot(q, ot, s, input_precision=DOT_PRECISION)
            p = tl.dot(w, ot, p, input_precision=DOT_PRECISION)
    return s, p


@triton.autotune(configs=FWD_CONFIGS, key=["C", "L", "D", "KEYED"])
@triton.jit
def label_attention_fwd(O, K, Q, W, LENGTHS, Z, LSE, n, L, C, D,
                        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                        KEYED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (B, cdiv(L, BLOCK_L)). O [B, n, C], K [B, n, D] (KEYED; else O again, D = C), Q [L, D],
    W [L, C], LENGTHS [B] int64 → Z, LSE [B, L] fp32."""
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    length = tl.load(LENGTHS + b).to(tl.int32)
    O_b = O + b * n * C
    K_b = K + b * n * D
    m_i = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        s, p = _scores(O_b, K_b, Q, W, offs_n, mask_n, offs_l, mask_l, C, D,
                       BLOCK_N, BLOCK_L, BLOCK_C, KEYED, UPCAST, DOT_PRECISION)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Token 0 is always valid (lengths >= 1), so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        rescale = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        l_i = l_i * rescale + tl.sum(e, axis=1)
        acc = acc * rescale + tl.sum(e * p, axis=1)
        m_i = m_new
    out = b * L + offs_l
    tl.store(Z + out, acc / l_i, mask=mask_l)
    tl.store(LSE + out, m_i + tl.log(l_i), mask=mask_l)


@triton.jit
def _grad_scores(s, p, mask_n_lt, lse, z, g):
    """ds = g·a·(p − z), dp = g·a with a = exp(s − lse) (zero off the valid tile); s, p [BLOCK_L, BLOCK_N]."""
    a = tl.where(mask_n_lt, tl.exp(s - lse[:, None]), 0.0)
    dp = a * g[:, None]
    ds = dp * (p - z[:, None])
    return ds, dp


@triton.jit
def _add_rows(DX_b, row_n, offs_n, n, dst, Y, row_l, mask_l, D, accumulate,
              BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """DX_b[rows offs_n] (+)= dst·Y[rows offs_l] over D (row_n, row_l: the row offsets for stride
    D); adds only when `accumulate`, else overwrites."""
    offs_c0 = tl.arange(0, BLOCK_C)
    for start_c in range(0, D, BLOCK_C):
        offs_c = start_c + offs_c0
        mask_c = offs_c < D
        y = tl.load(Y + row_l[:, None] + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            y = y.to(tl.float32)
        ptrs = DX_b + row_n[:, None] + offs_c[None, :]
        mask_nc = (offs_n[:, None] < n) & mask_c[None, :]
        d = tl.load(ptrs, mask=mask_nc & accumulate, other=0.0)
        d = tl.dot(dst, y, d, input_precision=DOT_PRECISION)
        tl.store(ptrs, d, mask=mask_nc)


@triton.autotune(configs=BWD_CONFIGS, key=["C", "L", "D", "KEYED"])
@triton.jit
def label_attention_bwd_features(O, K, Q, W, LENGTHS, Z, LSE, G, DO, DK, n, L, C, D,
                                 BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                                 KEYED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (B, cdiv(n, BLOCK_N)). DO [B, n, C] (and KEYED, DK [B, n, D]) fp32, zero-filled by the
    caller: tiles past a document's length are left untouched, every other row is overwritten."""
    b = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    length = tl.load(LENGTHS + b).to(tl.int32)
    mask_n = offs_n < length
    O_b = O + b * n * C
    K_b = K + b * n * D
    DO_b = DO + b * n * C
    row_n = offs_n.to(tl.int64) * C
    offs_c0 = tl.arange(0, BLOCK_C)
    label_end = tl.where(start_n < length, L, 0)
    for start_l in range(0, label_end, BLOCK_L):
        offs_l = start_l + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        s, p = _scores(O_b, K_b, Q, W, offs_n, mask_n, offs_l, mask_l, C, D,
                       BLOCK_N, BLOCK_L, BLOCK_C, KEYED, UPCAST, DOT_PRECISION)
        lse = tl.load(LSE + b * L + offs_l, mask=mask_l, other=0.0)
        z = tl.load(Z + b * L + offs_l, mask=mask_l, other=0.0)
        g = tl.load(G + b * L + offs_l, mask=mask_l, other=0.0)
        ds, dp = _grad_scores(s, p, mask_n[None, :] & mask_l[:, None], lse, z, g)
        dst = tl.trans(ds)  # [BLOCK_N, BLOCK_L]
        dpt = tl.trans(dp)
        if not UPCAST:
            dst = dst.to(Q.dtype.element_ty)
            dpt = dpt.to(Q.dtype.element_ty)
        if KEYED:  # dO = dp·W over C, dK = ds·Q over D
            _add_rows(DO_b, row_n, offs_n, n, dpt, W, offs_l.to(tl.int64) * C, mask_l, C, start_l > 0,
                      BLOCK_C, UPCAST, DOT_PRECISION)
            _add_rows(DK + b * n * D, offs_n.to(tl.int64) * D, offs_n, n, dst, Q, offs_l.to(tl.int64) * D, mask_l, D,
                      start_l > 0, BLOCK_C, UPCAST, DOT_PRECISION)
        else:
            row_l = offs_l.to(tl.int64) * C
            for start_c in range(0, C, BLOCK_C):
                offs_c = start_c + offs_c0
                mask_c = offs_c < C
                q = tl.load(Q + row_l[:, None] + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0)
                w = tl.load(W + row_l[:, None] + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    w = w.to(tl.float32)
                ptrs = DO_b + row_n[:, None] + offs_c[None, :]
                mask_nc = (offs_n[:, None] < n) & mask_c[None, :]
                d = tl.load(ptrs, mask=mask_nc & (start_l > 0), other=0.0)
                d = tl.dot(dst, q, d, input_precision=DOT_PRECISION)
                d = tl.dot(dpt, w, d, input_precision=DOT_PRECISION)
                tl.store(ptrs, d, mask=mask_nc)


@triton.jit
def _add_labels(DX, part, row_l, mask_l, d, X_b, offs_n, mask_n, D, accumulate,
                BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """DX[part + rows offs_l] (+)= d·X_b[rows offs_n] over D (row_l: label row offsets for stride
    D); adds only when `accumulate`, else overwrites."""
    offs_c0 = tl.arange(0, BLOCK_C)
    row_n = offs_n.to(tl.int64) * D
    for start_c in range(0, D, BLOCK_C):
        offs_c = start_c + offs_c0
        mask_c = offs_c < D
        x = tl.load(X_b + row_n[:, None] + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        mask_lc = mask_l[:, None] & mask_c[None, :]
        ptrs = DX + part + row_l[:, None] + offs_c[None, :]
        acc = tl.load(ptrs, mask=mask_lc & accumulate, other=0.0)
        acc = tl.dot(d, x, acc, input_precision=DOT_PRECISION)
        tl.store(ptrs, acc, mask=mask_lc)


@triton.autotune(configs=BWD_CONFIGS, key=["C", "L", "D", "KEYED"])
@triton.jit
def label_attention_bwd_labels(O, K, Q, W, LENGTHS, Z, LSE, G, DQ, DW, B, n, L, C, D, SPLITS,
                               BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                               KEYED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(L, BLOCK_L), SPLITS) with SPLITS <= B. DQ [SPLITS, L, D], DW [SPLITS, L, C] fp32:
    slice s gets Σ over documents b ≡ s (mod SPLITS) of dsᵀ·K and dpᵀ·O (fully overwritten)."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    split = tl.program_id(1)
    row_l = offs_l.to(tl.int64) * C
    part = split.to(tl.int64) * L * C
    offs_c0 = tl.arange(0, BLOCK_C)
    for i in range(0, tl.cdiv(B - split, SPLITS)):
        b = split.to(tl.int64) + i * SPLITS
        length = tl.load(LENGTHS + b).to(tl.int32)
        O_b = O + b * n * C
        K_b = K + b * n * D
        lse = tl.load(LSE + b * L + offs_l, mask=mask_l, other=0.0)
        z = tl.load(Z + b * L + offs_l, mask=mask_l, other=0.0)
        g = tl.load(G + b * L + offs_l, mask=mask_l, other=0.0)
        for start_n in range(0, length, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < length
            s, p = _scores(O_b, K_b, Q, W, offs_n, mask_n, offs_l, mask_l, C, D,
                           BLOCK_N, BLOCK_L, BLOCK_C, KEYED, UPCAST, DOT_PRECISION)
            ds, dp = _grad_scores(s, p, mask_n[None, :] & mask_l[:, None], lse, z, g)
            if not UPCAST:
                ds = ds.to(Q.dtype.element_ty)
                dp = dp.to(Q.dtype.element_ty)
            accumulate = (i > 0) | (start_n > 0)
            if KEYED:  # dQ = ds·K over D, dW = dp·O over C
                _add_labels(DQ, split.to(tl.int64) * L * D, offs_l.to(tl.int64) * D, mask_l, ds, K_b, offs_n,
                            mask_n, D, accumulate, BLOCK_C, UPCAST, DOT_PRECISION)
                _add_labels(DW, part, row_l, mask_l, dp, O_b, offs_n, mask_n, C, accumulate,
                            BLOCK_C, UPCAST, DOT_PRECISION)
            else:
                row_n = offs_n.to(tl.int64) * C
                for start_c in range(0, C, BLOCK_C):
                    offs_c = start_c + offs_c0
                    mask_c = offs_c < C
                    o = tl.load(O_b + row_n[:, None] + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                                other=0.0)
                    if UPCAST:
                        o = o.to(tl.float32)
                    mask_lc = mask_l[:, None] & mask_c[None, :]
                    dq_ptrs = DQ + part + row_l[:, None] + offs_c[None, :]
                    dw_ptrs = DW + part + row_l[:, None] + offs_c[None, :]
                    dq = tl.load(dq_ptrs, mask=mask_lc & accumulate, other=0.0)
                    dw = tl.load(dw_ptrs, mask=mask_lc & accumulate, other=0.0)
                    dq = tl.dot(ds, o, dq, input_precision=DOT_PRECISION)
                    dw = tl.dot(dp, o, dw, input_precision=DOT_PRECISION)
                    tl.store(dq_ptrs, dq, mask=mask_lc)
                    tl.store(dw_ptrs, dw, mask=mask_lc)
