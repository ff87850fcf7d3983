"""Triton kernels of the RAM's passes between the vendor convolutions (`marn_fast.ops.ram_vendor`).

Every tensor is a row-major matrix [R, C]: R = B·n positions (channels-last activations), C
channels; per-channel vectors are [C]. One block half is
    u = (z − μ)·rstd·γ + β      (NORM: BatchNorm on batch statistics μ, rstd = 1/sqrt(σ² + eps))
    u = z + b                   (not NORM: the eval BatchNorm folded into the conv, b its bias)
    v = u ⊙ other or u + other  (HAS_OTHER, MUL or add), else v = u
    out = tanh(v) (TANH), else v.
Forward: `batch_stats` (two launches: per-(row strip, channel tile) mean and M2, then Chan's
parallel combination per channel, which also updates the running statistics exactly as
nn.BatchNorm1d: momentum·x + (1 − momentum)·running, the variance unbiased), then
`affine_epilogue` (one elementwise launch).
Backward, with g = dL/dout: `affine_epilogue_backward` forms gu = dL/du (tanh: g·(1 − out²);
MUL: dother = g'·u, gu = g'·other; add: gu = g, dother = g), stores gu (and dother) and the
per-channel sums Σgu and Σgu·x̂ (x̂ = (z − μ)·rstd) as per-strip partials summed by the caller in
a fixed order; then, NORM only, `batch_norm_backward_apply`:
    dz = γ·rstd·(gu − Σgu/R − x̂·Σgu·x̂/R),  dγ = Σgu·x̂,  dβ = Σgu   (not NORM: dz = gu, db = Σgu).
Statistics and sums accumulate in fp32 (fp64 for fp64 tensors); stored tensors keep z's dtype.
No atomics: every result is deterministic. Offsets are int64 (R·C can pass 2^31).
tanh is computed from exp and log (`_tanh`, a few ulps): libdevice's tanh is not available in
the CPU interpreter, where these kernels are tested.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import interpreting

BLOCK_R = 32 if interpreting() else 64   # rows per tile
MAX_BLOCK_C = 64                          # channels per tile
BLOCK_P = 32                              # partials combined per step
# Reductions give each program a strip of rows (a multiple of BLOCK_R) so that about this many
# programs run in all: enough to fill a GPU, few enough partials to combine.
TARGET_PROGRAMS = 16 if interpreting() else 1024
NUM_WARPS = 4


@triton.jit
def _tanh(x):
    """tanh(x) to a few ulps: with b = 2|x|, q = 1 − exp(−b) (Kahan's (1 − u)·b/(−log u) where
    u = exp(−b) > 1/2, which cancels u's rounding), tanh|x| = q/(2 − q)."""
    b = 2.0 * tl.abs(x)
    u = tl.exp(-b)
    d = 1.0 - u
    near = (u > 0.5) & (d > 0.0)
    neg_log = tl.where(near, -tl.log(tl.where(near, u, 0.5)), 1.0)
    q = tl.where(u > 0.5, tl.where(d == 0.0, b, d * (b / neg_log)), d)
    t = q / (2.0 - q)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _tile(C, row0, row_end, pid_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets [BLOCK_R, BLOCK_C] (int64) and mask of rows [row0, row_end) (≤ R), channel tile pid_c."""
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < row_end)[:, None] & (cols < C)[None, :]
    return rows.to(tl.int64)[:, None] * C + cols[None, :], mask


@triton.jit
def _stats_partial_kernel(z_ptr, pmean_ptr, pm2_ptr, R, C, rows_per_prog,
                          FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (p, j): mean and M2 = Σ(z − mean)² of rows [p·rows_per_prog, …) of channel tile j,
    tile by tile, merged with Chan's formula; written to pmean/pm2 [P, C]."""
    acc_t = tl.float64 if FP64 else tl.float32
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row0 = pid_r * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, R)
    mean = tl.zeros([BLOCK_C], dtype=acc_t)
    m2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for start in range(row0, row_end, BLOCK_R):
        offs, mask = _tile(C, start, row_end, pid_c, BLOCK_R, BLOCK_C)
        x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_t)
        n_a = (start - row0).to(acc_t)
        n_b = tl.minimum(row_end - start, BLOCK_R).to(acc_t)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        n = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (n_a * n_b / n)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    out = pid_r.to(tl.int64) * C + cols
    tl.store(pmean_ptr + out, mean, mask=cols < C)
    tl.store(pm2_ptr + out, m2, mask=cols < C)


@triton.jit
def _stats_combine_kernel(pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, R, C, P, rows_per_prog,
                          eps_hi, eps_lo, mom_hi, mom_lo, UPDATE: tl.constexpr, FP64: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program j: combines the P partials of channel tile j (Chan: BLOCK_P partials at a time),
    writes mean and rstd = 1/sqrt(M2/R + eps); UPDATE: running_mean/var (their dtype) ←
    momentum·(mean, M2/(R − 1)) + (1 − momentum)·running. eps and momentum arrive as fp32
    hi + lo pairs, exact in fp64."""
    acc_t = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros([BLOCK_C], dtype=acc_t)
    m2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        # Rows of each partial (the last strip may be short; partials past P hold none).
        cnt = tl.minimum(tl.maximum(R - ps * rows_per_prog, 0), rows_per_prog).to(acc_t)
        mask = (ps < P)[:, None] & cmask[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        pm = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
        d = tl.where(mask, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(q, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
        n_a = tl.minimum(p0 * rows_per_prog, R).to(acc_t)
        n = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n)
    eps = tl.cast(eps_hi, acc_t) + tl.cast(eps_lo, acc_t)
    if FP64:
        rstd = 1.0 / tl.sqrt(m2 / R + eps)
    else:
        rstd = 1.0 / tl.sqrt_rn(m2 / R + eps)  # IEEE square root (tl.sqrt may be approximate)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, rstd, mask=cmask)
    if UPDATE:
        momentum = tl.cast(mom_hi, acc_t) + tl.cast(mom_lo, acc_t)
        rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(acc_t)
        rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(acc_t)
        new_m = momentum * mean + (1.0 - momentum) * rm
        new_v = momentum * (m2 / (R - 1)) + (1.0 - momentum) * rv
        tl.store(rmean_ptr + cols, new_m.to(rmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rvar_ptr + cols, new_v.to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _affine(z, cols, cmask, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, NORM: tl.constexpr):
    """u for a [BLOCK_R, BLOCK_C] tile z (accumulation dtype) and, NORM, x̂ = (z − μ)·rstd."""
    beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(z.dtype)
    if NORM:
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(z.dtype)
        rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(z.dtype)
        gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(z.dtype)
        xhat = (z - mean[None, :]) * rstd[None, :]
        return xhat * gamma[None, :] + beta[None, :], xhat
    return z + beta[None, :], z


@triton.jit
def _affine_epilogue_kernel(z_ptr, other_ptr, out_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, R, C,
                            NORM: tl.constexpr, HAS_OTHER: tl.constexpr, MUL: tl.constexpr,
                            TANH: tl.constexpr, FP64: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    acc_t = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_R
    offs, mask = _tile(C, row0, R, pid_c, BLOCK_R, BLOCK_C)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_t)
    v, _ = _affine(z, cols, cols < C, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, NORM)
    if HAS_OTHER:
        o = tl.load(other_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if MUL:
            v = v * o
        else:
            v = v + o
    if TANH:
        v = _tanh(v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_epilogue_backward_kernel(g_ptr, z_ptr, out_ptr, other_ptr, gu_ptr, dother_ptr, partial_ptr,
                                     mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, R, C, rows_per_prog,
                                     NORM: tl.constexpr, MUL_OTHER: tl.constexpr, NEED_U: tl.constexpr,
                                     TANH: tl.constexpr, FP64: tl.constexpr,
                                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (p, j) over its row strip: gu (and dother for MUL_OTHER) stored tile by tile; the
    strip's Σgu and Σgu·x̂ to partial[p, 0, :] and partial[p, 1, :] ([P, 2, C]). NEED_U: NORM or
    MUL_OTHER (u, x̂ recomputed from z). An added other passes g through: not this kernel's."""
    acc_t = tl.float64 if FP64 else tl.float32
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row0 = pid_r * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, R)
    sum_gu = tl.zeros([BLOCK_C], dtype=acc_t)
    sum_gx = tl.zeros([BLOCK_C], dtype=acc_t)
    for start in range(row0, row_end, BLOCK_R):
        offs, mask = _tile(C, start, row_end, pid_c, BLOCK_R, BLOCK_C)
        gu = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if TANH:
            y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_t)
            gu = gu * (1.0 - y * y)
        if NEED_U:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_t)
            u, xhat = _affine(z, cols, cmask, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, NORM)
            if MUL_OTHER:
                o = tl.load(other_ptr + offs, mask=mask, other=0.0).to(acc_t)
                tl.store(dother_ptr + offs, (gu * u).to(dother_ptr.dtype.element_ty), mask=mask)
                gu = gu * o
            if NORM:
                sum_gx += tl.sum(tl.where(mask, gu * xhat, 0.0), axis=0)
        gu = tl.where(mask, gu, 0.0)
        tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=mask)
        sum_gu += tl.sum(gu, axis=0)
    out = pid_r.to(tl.int64) * 2 * C + cols
    tl.store(partial_ptr + out, sum_gu, mask=cmask)
    tl.store(partial_ptr + out + C, sum_gx, mask=cmask)


@triton.jit
def _batch_norm_backward_apply_kernel(gu_ptr, z_ptr, dz_ptr, sums_ptr, mean_ptr, rstd_ptr, gamma_ptr, R, C,
                                      FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = γ·rstd·(gu − Σgu/R − x̂·Σgu·x̂/R); sums [2, C]; dz may alias gu."""
    acc_t = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(1)
    offs, mask = _tile(C, tl.program_id(0) * BLOCK_R, R, pid_c, BLOCK_R, BLOCK_C)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(acc_t)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(acc_t)
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(acc_t)
    mean_gu = tl.load(sums_ptr + cols, mask=cmask, other=0.0).to(acc_t) / R
    mean_gx = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0).to(acc_t) / R
    gu = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(acc_t)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_t)
    xhat = (z - mean[None, :]) * rstd[None, :]
    dz = (gamma * rstd)[None, :] * (gu - mean_gu[None, :] - xhat * mean_gx[None, :])
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launchers
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _block_c(c: int) -> int:
    return max(16, min(MAX_BLOCK_C, triton.next_power_of_2(c)))


def _strips(r: int, c: int) -> tuple[int, int]:
    """(rows per reduction program, a multiple of BLOCK_R; number of strips P)."""
    col_tiles = triton.cdiv(c, _block_c(c))
    target = max(1, TARGET_PROGRAMS // col_tiles)
    rows = BLOCK_R * triton.cdiv(triton.cdiv(r, target), BLOCK_R)
    return rows, triton.cdiv(r, rows)


def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo representable in fp32 (the kernel's scalar arguments are fp32)."""
    hi = _fp32(x)
    return hi, _fp32(x - hi)


def batch_stats(z: torch.Tensor, eps: float, running_mean=None, running_var=None, momentum: float = 0.0):
    """(mean, rstd) [C] of z [R, C] over its rows, in the accumulation dtype; with running_mean/var
    given, updates them in place (momentum; unbiased variance). Two launches."""
    r, c = z.shape
    acc = _acc_dtype(z)
    rows, p = _strips(r, c)
    block_c = _block_c(c)
    pmean = torch.empty(p, c, dtype=acc, device=z.device)
    pm2 = torch.empty(p, c, dtype=acc, device=z.device)
    fp64 = acc == torch.float64
    _stats_partial_kernel[(p, triton.cdiv(c, block_c))](
        z, pmean, pm2, r, c, rows, FP64=fp64, BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=NUM_WARPS)
    mean = torch.empty(c, dtype=acc, device=z.device)
    rstd = torch.empty(c, dtype=acc, device=z.device)
    update = running_mean is not None
    _stats_combine_kernel[(triton.cdiv(c, block_c),)](
        pmean, pm2, mean, rstd, running_mean if update else mean, running_var if update else rstd,
        r, c, p, rows, *_split(eps), *_split(momentum), UPDATE=update, FP64=fp64,
        BLOCK_P=BLOCK_P, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return mean, rstd


def affine_epilogue(z: torch.Tensor, beta: torch.Tensor, other=None, mean=None, rstd=None, gamma=None,
                    mul: bool = False, tanh: bool = False) -> torch.Tensor:
    """out [R, C] in z's dtype (see the module docstring); NORM when mean is given. One launch."""
    r, c = z.shape
    out = torch.empty_like(z)
    norm = mean is not None
    block_c = _block_c(c)
    _affine_epilogue_kernel[(triton.cdiv(r, BLOCK_R), triton.cdiv(c, block_c))](
        z, z if other is None else other, out, mean if norm else beta, rstd if norm else beta,
        gamma if norm else beta, beta, r, c, NORM=norm, HAS_OTHER=other is not None, MUL=mul, TANH=tanh,
        FP64=_acc_dtype(z) == torch.float64, BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return out


def affine_epilogue_backward(g: torch.Tensor, z: torch.Tensor, beta: torch.Tensor, out=None, other=None,
                             mean=None, rstd=None, gamma=None, mul: bool = False, tanh: bool = False):
    """(gu [R, C] in z's dtype, dother for MUL else None, sums [2, C]: Σgu, Σgu·x̂) for g [R, C].

    out: the forward output (read when tanh); other: read for MUL only (dother of an added other
    is g itself). One launch plus a fixed-order sum of [P, 2, C]."""
    r, c = z.shape
    norm = mean is not None
    rows, p = _strips(r, c)
    block_c = _block_c(c)
    gu = torch.empty_like(z)
    mul_other = other is not None and mul
    dother = torch.empty_like(z) if mul_other else None
    partial = torch.empty(p, 2, c, dtype=_acc_dtype(z), device=z.device)
    _affine_epilogue_backward_kernel[(p, triton.cdiv(c, block_c))](
        g, z, z if out is None else out, other if mul_other else z, gu, dother if mul_other else gu,
        partial, mean if norm else beta, rstd if norm else beta, gamma if norm else beta, beta, r, c, rows,
        NORM=norm, MUL_OTHER=mul_other, NEED_U=norm or mul_other, TANH=tanh, FP64=_acc_dtype(z) == torch.float64,
        BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return gu, dother, partial.sum(0)


def batch_norm_backward_apply(gu: torch.Tensor, z: torch.Tensor, sums: torch.Tensor, mean: torch.Tensor,
                              rstd: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """dz [R, C], written over gu. One launch."""
    r, c = z.shape
    block_c = _block_c(c)
    _batch_norm_backward_apply_kernel[(triton.cdiv(r, BLOCK_R), triton.cdiv(c, block_c))](
        gu, z, gu, sums, mean, rstd, gamma, r, c, FP64=_acc_dtype(z) == torch.float64,
        BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return gu
