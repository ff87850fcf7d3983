"""The persistent BiGRU's algorithm, step by step in PyTorch: the CPU twin of the CUDA kernel.

Same contract as `marn_fast.ops.bigru`: x [B, n, d_e], lengths [B] int64 (None: all n), the 8
tensors of a one-layer bidirectional nn.GRU in `_flat_weights` order → H [B, n, 2·h], zero at
t ≥ lengths[b]; exactly nn.GRU(bidirectional=True) on packed sequences (the reverse direction of
document b starts at its own last token, lengths[b] − 1).

The algorithm (what the kernel does, and what this module runs on the CPU):
  1. Input projection outside the recurrence, both directions in one GEMM:
     G_x = X·[W_ih_fwd; W_ih_rev]ᵀ + b_ih → [B, n, 6h]. The reverse half is read in each
     document's reversed order (position lengths[b] − 1 − s at step s), so both directions run
     the same loop over steps s = 0 … max(lengths) − 1 with a per-document "active" mask s < len.
  2. Recurrence, per direction, with W_hh split over `num_slices` blocks: block k owns hidden
     units [k·h/K, (k+1)·h/K) and the three gate rows (r, z, n) of W_hh for them, so it computes
     its slice of G_h = h_{s−1}·W_hhᵀ + b_hh from the full previous state, updates its units
        r = σ(gx_r + gh_r), z = σ(gx_z + gh_z), c = tanh(gx_n + r ⊙ gh_n),
        h_s = (1 − z) ⊙ c + z ⊙ h_{s−1}
     and publishes them; the next step starts after every block has published (on Hopper: a
     thread-block cluster exchanging slices through distributed shared memory). State and
     accumulation are fp32 whatever the input dtype. A document past its length writes zeros
     (its state is never read again: steps only move forward).
  3. Backward by reverse-time recurrence. All h_{s−1} are the saved outputs, so
     G_h = H_prev·W_hhᵀ + b_hh for every step is one GEMM before the loop (no per-step product
     with W_hh forward); the loop carries dh:
        g = dH_s + dh,  dc = g(1 − z),  dz = g(h_{s−1} − c),  da_n = dc(1 − c²),
        da_r = (da_n ⊙ gh_n) r(1 − r),  da_z = dz z(1 − z),
        dG_x,s = [da_r, da_z, da_n],  dG_h,s = [da_r, da_z, da_n ⊙ r],
        dh ← g z + dG_h,s·W_hh   (block k adds dG_h's slice times its rows of W_hh)
     and after it dW_hh = Σ dG_hᵀ·H_prev, db_hh = Σ dG_h, dX = dG_x·W_ih, dW_ih = dG_xᵀ·X,
     db_ih = Σ dG_x — each one GEMM or reduction over all steps. Forward saves only H (and X).

`persistent_bigru_reference` runs this in PyTorch (a Python loop over steps: a test oracle and
the statement of the kernel's logic, not a fast path).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference.checks import FLOAT_DTYPES, check_lengths, check_tensor
from .bigru import NUM_WEIGHTS, reverse_within_lengths_index

DEFAULT_SLICES = 4


def _slices(hidden: int, num_slices: int) -> list[torch.Tensor]:
    """Per block, the W_hh rows it owns: its hidden units in each of the three gates."""
    bounds = [round(k * hidden / num_slices) for k in range(num_slices + 1)]
    return [torch.cat([torch.arange(lo, hi) + gate * hidden for gate in range(3)])
            for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _sliced_matmul(a: torch.Tensor, w: torch.Tensor, slices, transpose: bool) -> torch.Tensor:
    """a·wᵀ computed block by block over w's row slices (transpose=True: the forward G_h), or
    a·w summed over blocks (transpose=False: the backward dh contribution), in slice order."""
    if transpose:
        out = a.new_empty(a.shape[0], w.shape[0])
        for rows in slices:
            out[:, rows] = a @ w[rows].t()
        return out
    total = None
    for rows in slices:
        part = a[:, rows] @ w[rows]
        total = part if total is None else total + part
    return total


def _gates(gx: torch.Tensor, gh: torch.Tensor, hidden: int):
    xr, xz, xn = gx.split(hidden, dim=-1)
    hr, hz, hn = gh.split(hidden, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    c = torch.tanh(xn + r * hn)
    return r, z, c, hn


def _recurrence(gx: torch.Tensor, lengths: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                slices) -> torch.Tensor:
    """One direction's steps in processing order: gx [B, T, 3h] → outputs [B, T, h]."""
    batch, steps, _ = gx.shape
    hidden = w_hh.shape[1]
    h = gx.new_zeros(batch, hidden)
    out = gx.new_zeros(batch, steps, hidden)
    for s in range(int(lengths.max()) if batch else 0):
        active = (s < lengths)[:, None]
        gh = _sliced_matmul(h, w_hh, slices, transpose=True) + b_hh
        _, z, c, _ = _gates(gx[:, s], gh, hidden)
        h = (1 - z) * c + z * h  # a finished document's state is never read again
        out[:, s] = torch.where(active, h, torch.zeros_like(h))
    return out


def _recurrence_backward(d_out: torch.Tensor, out: torch.Tensor, gx: torch.Tensor, lengths: torch.Tensor,
                         w_hh: torch.Tensor, b_hh: torch.Tensor, slices):
    """Reverse-time pass of one direction → (dG_x [B, T, 3h], dW_hh, db_hh)."""
    batch, steps, hidden = out.shape
    h_prev = torch.cat([out.new_zeros(batch, 1, hidden), out[:, :-1]], dim=1)
    gh_all = h_prev @ w_hh.t() + b_hh  # one GEMM for every step
    r, z, c, hn = _gates(gx, gh_all, hidden)
    d_gx = gx.new_zeros(batch, steps, 3 * hidden)
    d_gh = gx.new_zeros(batch, steps, 3 * hidden)
    dh = out.new_zeros(batch, hidden)
    for s in reversed(range(int(lengths.max()) if batch else 0)):
        active = (s < lengths)[:, None]
        g = torch.where(active, d_out[:, s] + dh, torch.zeros_like(dh))
        zs, cs, rs = z[:, s], c[:, s], r[:, s]
        da_n = g * (1 - zs) * (1 - cs * cs)
        da_z = g * (h_prev[:, s] - cs) * zs * (1 - zs)
        da_r = da_n * hn[:, s] * rs * (1 - rs)
        d_gx[:, s] = torch.cat([da_r, da_z, da_n], dim=1)
        d_gh[:, s] = torch.cat([da_r, da_z, da_n * rs], dim=1)
        dh = g * zs + _sliced_matmul(d_gh[:, s], w_hh, slices, transpose=False)
    d_w_hh = d_gh.reshape(-1, 3 * hidden).t() @ h_prev.reshape(-1, hidden)
    return d_gx, d_w_hh, d_gh.sum(dim=(0, 1))


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2]))


class _PersistentBiGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lengths, num_slices, *weights):
        hidden = weights[1].shape[1]
        slices = _slices(hidden, num_slices)
        w_ih = torch.cat([weights[0], weights[4]])
        b_ih = torch.cat([weights[2], weights[6]])
        gx = x @ w_ih.t() + b_ih  # step 1: both directions' input projection in one GEMM
        index = reverse_within_lengths_index(lengths, x.shape[1])
        gx_fwd, gx_rev = gx[..., :3 * hidden], _gather_time(gx[..., 3 * hidden:], index)
        out_fwd = _recurrence(gx_fwd, lengths, weights[1], weights[3], slices)
        out_rev = _recurrence(gx_rev, lengths, weights[5], weights[7], slices)
        ctx.save_for_backward(x, lengths, out_fwd, out_rev, *weights)
        ctx.num_slices = num_slices
        return torch.cat([out_fwd, _gather_time(out_rev, index)], dim=2)

    @staticmethod
    def backward(ctx, grad):
        x, lengths, out_fwd, out_rev, *weights = ctx.saved_tensors
        hidden = weights[1].shape[1]
        slices = _slices(hidden, ctx.num_slices)
        index = reverse_within_lengths_index(lengths, x.shape[1])
        x_rev = _gather_time(x, index)
        grads = [None] * NUM_WEIGHTS
        dx = torch.zeros_like(x)
        for direction, (xs, out, d_out) in enumerate(((x, out_fwd, grad[..., :hidden]),
                                                      (x_rev, out_rev, _gather_time(grad[..., hidden:], index)))):
            w_ih, w_hh, b_ih, b_hh = weights[4 * direction:4 * direction + 4]
            gx = xs @ w_ih.t() + b_ih  # recomputed rather than saved
            d_gx, d_w_hh, d_b_hh = _recurrence_backward(d_out, out, gx, lengths, w_hh, b_hh, slices)
            d_x = d_gx @ w_ih
            dx += d_x if direction == 0 else _gather_time(d_x, index)
            grads[4 * direction:4 * direction + 4] = [d_gx.reshape(-1, 3 * hidden).t() @ xs.reshape(-1, xs.shape[2]),
                                                      d_w_hh, d_gx.sum(dim=(0, 1)), d_b_hh]
        return (dx, None, None, *grads)


def persistent_bigru_reference(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
                               num_slices: int = DEFAULT_SLICES) -> torch.Tensor:
    """The persistent kernel's algorithm in PyTorch (see the module docstring); differentiable
    through its own reverse-time backward. Computes in fp32 (fp64 for fp64 inputs)."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, d_e] float")
    if len(weights) != NUM_WEIGHTS:
        raise ValueError(f"weights: expected the {NUM_WEIGHTS} tensors of a one-layer bidirectional nn.GRU, "
                         f"got {len(weights)}")
    if num_slices < 1:
        raise ValueError(f"num_slices: expected >= 1, got {num_slices}")
    batch, n, _ = x.shape
    check_lengths(lengths, batch, n, x.device)
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = _PersistentBiGRU.apply(x.to(compute), lengths, num_slices, *(w.to(compute) for w in weights))
    return out.to(x.dtype)
