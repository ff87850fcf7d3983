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
     and publishes them; the next step starts after every block of its direction has published
     (the CUDA kernel: one block per SM, the state exchanged through L2, one barrier per direction
     and step; the directions never wait for each other). State and
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
     db_ih = Σ dG_x — each one GEMM or reduction over all steps. Forward saves H and G_x (and X).

Precision (`marn_fast.ops.precision`): the GEMMs outside the recurrence run in the compute dtype
`compute_dtype(x)` — the autocast dtype for fp32 inputs under `torch.autocast`, else x's dtype —
with fp32 results (cuBLAS's fp32-output form on CUDA; on the CPU, where torch has no bf16×bf16→fp32
product, the vendor GEMM's bf16 result upcast): G_x in the forward; the all-steps G_h, dX, dW_ih and
dW_hh in the backward. The recurrences (state, gates, the product with W_hh, dh) and the bias
sums are fp32 (fp64 for fp64 inputs on the CPU). The op casts its operands itself and runs with
autocast off, so nothing inside is cast again. The output has x's dtype (fp32 under autocast, as
nn.GRU under CPU autocast), the gradients their inputs' and weights' dtypes.

`persistent_bigru` runs it: the recurrences are the CUDA kernels of csrc/cuda/gru_cuda.cu on CUDA
tensors and the C++ kernels of csrc/cpu/gru_cpu.cpp on CPU tensors (the two directions on two
threads, the step's product with W_hh by the vendor GEMM on the still-active documents, one
vectorised gate pass); `_recurrence_forward` and `_recurrence_backward` (a Python loop over steps)
are their step-exact oracle, and the CPU path when the extension is not built. Everything around
them (the input GEMM, the processing-order gathers, the all-steps G_h GEMM, the weight gradients)
is the same code on both devices. The CUDA kernels' grid barriers are bounded in time
(`barrier_timeout_s`): a launch whose blocks are not all running at once fails with a RuntimeError
naming the cause instead of hanging (the measured dispatcher then rejects the candidate), and the
CUDA context stays usable; each launch waits for its own end to read that status. Where the CUDA
kernels cannot launch (see `fallback_reason`), `persistent_bigru` returns cuDNN's packed result,
with a one-time warning.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, cast

import torch

from ..reference.checks import FLOAT_DTYPES, check_lengths, check_tensor
from ._extension import cpu_extension_available, cuda_extension_available
from .bigru import NUM_WEIGHTS, needs_grad, packed_bigru, reverse_within_lengths_index
from .precision import compute_dtype

DEFAULT_SLICES = 4
# Overrides the ops' own bound on each wait of the CUDA kernels at a grid barrier (the schema's
# default, csrc/ops.cpp), e.g. under compute-sanitizer, which slows the kernels by orders of magnitude.
TIMEOUT_ENV = "MARN_FAST_PERSISTENT_TIMEOUT_S"
# cuBLAS's bf16/fp16 GEMMs with fp32 output (torch >= 2.8 on CUDA: the `out_dtype` overloads).
_FP32_OUTPUT_GEMM = "dtype" in torch.ops.aten.bmm.overloads()


def _slices(hidden: int, num_slices: int) -> list[range]:
    """The hidden units each block owns: num_slices contiguous, near-equal ranges."""
    bounds = [round(k * hidden / num_slices) for k in range(num_slices + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _gate_rows(units: range, hidden: int) -> torch.Tensor:
    """W_hh rows of these units in the three gates (r, z, n)."""
    return torch.cat([torch.arange(units.start, units.stop) + gate * hidden for gate in range(3)])


def _gates(gx: torch.Tensor, gh: torch.Tensor, hidden: int):
    xr, xz, xn = gx.split(hidden, dim=-1)
    hr, hz, hn = gh.split(hidden, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    c = torch.tanh(xn + r * hn)
    return r, z, c, hn


# ----------------------------------------------------------------- the two kernels' CPU twins
def _recurrence_forward(gx: torch.Tensor, lengths: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                        steps: int, num_slices: int) -> torch.Tensor:
    """gx [2, B, T, 3h] (processing order) → states [2, B, T, h], zero at s ≥ lengths[b]: block by
    block, each block's gate rows of W_hh against the full previous state (the CUDA kernel's
    gru_forward_kernel)."""
    _, batch, steps_total, three_h = gx.shape
    hidden = three_h // 3
    hproc = gx.new_zeros(2, batch, steps_total, hidden)
    blocks = [(units, _gate_rows(units, hidden)) for units in _slices(hidden, num_slices)]
    for d in range(2):
        h = gx.new_zeros(batch, hidden)
        for s in range(steps):
            active = (s < lengths)[:, None]
            gh = gx.new_empty(batch, three_h)
            for _, rows in blocks:
                gh[:, rows] = h @ w_hh[d, rows].t() + b_hh[d, rows]
            _, z, c, _ = _gates(gx[d, :, s], gh, hidden)
            h = (1 - z) * c + z * h  # a finished document's state is never read again
            hproc[d, :, s] = torch.where(active, h, torch.zeros_like(h))
    return hproc


def _recurrence_backward(dout: torch.Tensor, hprev: torch.Tensor, gx: torch.Tensor, gh: torch.Tensor,
                         lengths: torch.Tensor, w_hh: torch.Tensor, steps: int, num_slices: int):
    """Reverse-time pass → (dG_x, dG_h) [2, B, T, 3h], zero at s ≥ lengths[b]: each block holds
    its units' columns of W_hh and turns the full dG_h of step s + 1 into its units' dh (the CUDA
    kernel's gru_backward_kernel)."""
    _, batch, _, hidden = dout.shape
    d_gx, d_gh = torch.zeros_like(gx), torch.zeros_like(gx)
    r, z, c, hn = _gates(gx, gh, hidden)
    blocks = _slices(hidden, num_slices)
    for d in range(2):
        carry = dout.new_zeros(batch, hidden)  # g·z of step s + 1
        for s in reversed(range(steps)):
            active = (s < lengths)[:, None]
            dh = carry.clone()
            if s + 1 < steps:
                for units in blocks:
                    cols = slice(units.start, units.stop)
                    dh[:, cols] += d_gh[d, :, s + 1] @ w_hh[d, :, cols]
            g = torch.where(active, dout[d, :, s] + dh, torch.zeros_like(dh))
            zs, cs, rs = z[d, :, s], c[d, :, s], r[d, :, s]
            da_n = g * (1 - zs) * (1 - cs * cs)
            da_z = g * (hprev[d, :, s] - cs) * zs * (1 - zs)
            da_r = da_n * hn[d, :, s] * rs * (1 - rs)
            d_gx[d, :, s] = torch.cat([da_r, da_z, da_n], dim=1)
            d_gh[d, :, s] = torch.cat([da_r, da_z, da_n * rs], dim=1)
            carry = g * zs
    return d_gx, d_gh


def barrier_timeout_s() -> float:
    """Seconds each wait of the CUDA kernels at a grid barrier may last: MARN_FAST_PERSISTENT_TIMEOUT_S,
    else the ops' default (needs the compiled extension)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        schema = torch.ops.marn_fast.bigru_persistent_forward.default._schema
        return cast(float, next(a.default_value for a in schema.arguments if a.name == "timeout_s"))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise ValueError(f"{TIMEOUT_ENV}: expected seconds in (0, 3600], got {text!r}")
    return value


def _kernels(device: torch.device, num_slices: int):
    """(forward, backward) recurrence kernels for the device: the compiled ops (CUDA kernels of
    csrc/cuda/gru_cuda.cu, C++ kernels of csrc/cpu/gru_cpu.cpp), or on a CPU without the compiled
    extension their step-by-step twins above (num_slices applies to these only)."""
    if device.type == "cuda":
        _require_cuda_extension()
    elif not cpu_extension_available():
        return (functools.partial(_recurrence_forward, num_slices=num_slices),
                functools.partial(_recurrence_backward, num_slices=num_slices))
    timeout = barrier_timeout_s()
    return (functools.partial(torch.ops.marn_fast.bigru_persistent_forward, timeout_s=timeout),
            functools.partial(torch.ops.marn_fast.bigru_persistent_backward, timeout_s=timeout))


def _require_cuda_extension() -> None:
    if not cuda_extension_available():
        raise ValueError("persistent BiGRU on CUDA needs the compiled extension marn_fast._C_cuda; "
                         "reinstall with `pip install --no-build-isolation .` on a CUDA build of torch")


# ----------------------------------------------------------------- host side (both devices)
def _reverse_rows(index: torch.Tensor) -> torch.Tensor:
    """[B·n] int64: the row b·n + index[b, t] of a flattened [B·n, ·] tensor that the reverse
    direction reads at (b, t) — a permutation and an involution, like the index."""
    batch, n = index.shape
    return (index + torch.arange(0, batch * n, n, device=index.device)[:, None]).reshape(-1)


def _processing_order(x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """[B, n, ·] → [2, B·n, ·] (one gather): as is for the forward direction, reversed within each
    document's length for the reverse one (rev = _reverse_rows(index))."""
    rows = torch.cat([torch.arange(rev.numel(), device=rev.device), rev])
    return x.reshape(rev.numel(), x.shape[-1]).index_select(0, rows).view(2, rev.numel(), x.shape[-1])


def _natural_order(hproc: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """States [2, B, n, h] in processing order → H [B, n, 2h] (one gather): row (b, t) is
    [forward state at t, reverse state at index[b, t]]."""
    _, batch, n, hidden = hproc.shape
    rows = torch.stack([torch.arange(rev.numel(), device=rev.device), rev + rev.numel()], dim=1).reshape(-1)
    return hproc.reshape(-1, hidden).index_select(0, rows).view(batch, n, 2 * hidden)


def _grad_processing_order(grad: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """dH [B, n, 2h] → [2, B, n, h] in processing order (one gather; the inverse of _natural_order)."""
    batch, n, two_h = grad.shape
    rows = torch.cat([torch.arange(0, 2 * rev.numel(), 2, device=rev.device), 2 * rev + 1])
    return grad.reshape(-1, two_h // 2).index_select(0, rows).view(2, batch, n, two_h // 2)


def _state_dtype(compute: torch.dtype) -> torch.dtype:
    """The recurrence's dtype: fp64 for fp64, else fp32."""
    return torch.float64 if compute == torch.float64 else torch.float32


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """a·b (batched; a, b in the compute dtype) in dtype `out`: one GEMM with fp32 output from bf16/fp16
    operands on CUDA where torch has it, else the GEMM in the operands' dtype, upcast."""
    if a.dtype != out and a.is_cuda and _FP32_OUTPUT_GEMM:
        return torch.bmm(a, b, out_dtype=out)
    return torch.bmm(a, b).to(out)


def _affine(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bias + a·b in the bias's dtype (fp32/fp64), a·b as in _product."""
    if a.dtype == bias.dtype:
        return torch.baddbmm(bias, a, b)
    if a.is_cuda and _FP32_OUTPUT_GEMM:
        return _product(a, b, bias.dtype).add_(bias)
    return torch.add(torch.bmm(a, b), bias)  # the low-precision product, summed with the bias in fp32


class _PersistentBiGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lengths, num_slices, compute, *weights):
        with torch.autocast(x.device.type, enabled=False):  # the op casts its operands itself
            batch, n, _ = x.shape
            state = _state_dtype(compute)
            steps = int(lengths.max()) if lengths.numel() else 0
            forward_kernel, _ = _kernels(x.device, num_slices)
            rev = _reverse_rows(reverse_within_lengths_index(lengths, n))
            x_c = x.to(compute)
            w_ih = torch.stack([weights[0], weights[4]]).to(compute)
            w_hh = torch.stack([weights[1], weights[5]]).to(state)
            b_ih = torch.stack([weights[2], weights[6]]).to(state)
            b_hh = torch.stack([weights[3], weights[7]]).to(state)
            # Both directions' input GEMM: G_x = X_proc·W_ihᵀ + b_ih → [2, B, n, 3h] in the state dtype.
            gx = _affine(b_ih[:, None], _processing_order(x_c, rev), w_ih.transpose(1, 2)).view(2, batch, n, -1)
            hproc = forward_kernel(gx, lengths, w_hh, b_hh, steps)
            # G_x is kept for the backward (3× the states' memory) rather than recomputed: one GEMM less.
            ctx.save_for_backward(x_c, lengths, rev, hproc, gx, w_ih, w_hh, b_hh)
            ctx.num_slices, ctx.steps = num_slices, steps
            ctx.dtypes = (x.dtype, *(w.dtype for w in weights))
            return _natural_order(hproc, rev).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_c, lengths, rev, hproc, gx, w_ih, w_hh, b_hh = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
            _, batch, n, hidden = hproc.shape
            compute, state = w_ih.dtype, hproc.dtype
            _, backward_kernel = _kernels(grad.device, ctx.num_slices)
            dout = _grad_processing_order(grad.to(state), rev)
            hprev = torch.cat([hproc.new_zeros(2, batch, 1, hidden), hproc[:, :, :-1]], dim=2)  # h_{s−1}, 0 at s = 0
            flat = lambda t: t.view(2, batch * n, t.shape[-1])  # noqa: E731
            hprev_c = flat(hprev).to(compute)
            # G_h of every step, one GEMM (the recurrence's own G_h never left the kernel).
            gh = _affine(b_hh[:, None], hprev_c, w_hh.to(compute).transpose(1, 2)).view_as(gx)
            d_gx, d_gh = backward_kernel(dout, hprev, gx, gh, lengths, w_hh, ctx.steps)
            d_gx_c = flat(d_gx).to(compute)
            dx = None
            grads: Optional[List[Optional[torch.Tensor]]] = None
            if need_x:
                d_x_proc = _product(d_gx_c, w_ih, state)  # [2, B·n, d_e]
                dx = (d_x_proc[0] + d_x_proc[1].index_select(0, rev)).view(batch, n, -1).to(ctx.dtypes[0])
            if need_w:
                d_w_ih = _product(d_gx_c.transpose(1, 2), _processing_order(x_c, rev), state)
                d_w_hh = _product(flat(d_gh).to(compute).transpose(1, 2), hprev_c, state)
                d_b_ih = flat(d_gx).sum(1)
                # dG_h equals dG_x on the r and z gates: only the n gate's bias gradient needs a sum of its own.
                d_b_hh = torch.cat([d_b_ih[:, :2 * hidden], flat(d_gh)[..., 2 * hidden:].sum(1)], dim=1)
                grads = [g.to(dtype) for d in range(2) for g, dtype in
                         zip((d_w_ih[d], d_w_hh[d], d_b_ih[d], d_b_hh[d]), ctx.dtypes[1 + 4 * d:5 + 4 * d])]
        return (dx, None, None, None, *(grads or [None] * NUM_WEIGHTS))


# ----------------------------------------------------------------- fall-back to cuDNN (CUDA)
# Where the CUDA kernels cannot launch, persistent_bigru runs cuDNN's packed path instead (same
# contract) and warns once per reason. The kernels run one block per SM, both directions' 2·K blocks
# resident at once (a cooperative launch; each direction synchronises its K blocks every step):
# K = ⌈h / units⌉ with units = ⌈h / ⌊SMs / 2⌋⌉, and each kernel's shared memory for that many units
# must fit one block. launch_plan mirrors csrc/cuda/gru_cuda.cu (forward_smem, backward_smem,
# register_weights, plan), whose checks remain the backstop; registers never limit
# (__launch_bounds__(512, 1): ≤ 128 per thread). The kernels compute in fp32: float64 inputs run
# cuDNN's packed path in float64 instead (with the warning) rather than silently in fp32.
LIMITS_ENV = "MARN_FAST_PERSISTENT_LIMITS"  # e.g. "sms=8,smem=40000,cooperative=1": forces limits (tests)
FLOAT_BYTES = 4
BACKWARD_INPUTS = 8  # per-unit inputs the backward kernel prefetches: dout, hprev, gx (r, z, n), gh (r, z, n)
WARPS = 16  # per block (512 threads)
REGISTER_COLUMNS = 12  # forward: a warp holds one row of W_hh's slice in registers when h ≤ 32·this


@dataclass(frozen=True)
class DeviceLimits:
    sms: int  # streaming multiprocessors
    smem: int  # bytes of shared memory one block may opt in to
    cooperative: bool = True


@dataclass(frozen=True)
class LaunchPlan:
    units: int  # hidden units per block (the last block may have fewer)
    blocks_per_dir: int
    forward_smem: int  # bytes
    backward_smem: int
    register_weights: bool  # the forward kernel holds W_hh's rows in registers (else in shared memory)


def launch_plan(batch: int, hidden: int, sms: int) -> LaunchPlan:
    """The CUDA kernels' launch for B=batch, h=hidden on a GPU with `sms` SMs (sms ≥ 2)."""
    units = -(-hidden // (sms // 2))
    forward = FLOAT_BYTES * (3 * units * hidden + batch * hidden + 3 * batch * units + 2 * 3 * batch * units)
    # The backward's W_hh columns have an odd row stride (units | 1): no shared-memory bank conflicts.
    backward = FLOAT_BYTES * (3 * hidden * (units | 1) + 3 * batch * hidden + 2 * batch * units
                              + 2 * BACKWARD_INPUTS * batch * units)
    registers = 3 * units <= WARPS and hidden <= 32 * REGISTER_COLUMNS
    return LaunchPlan(units, -(-hidden // units), forward, backward, registers)


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    """The GPU's own limits, asked of the device by the extension (cudaDeviceGetAttribute)."""
    sms, smem, cooperative = torch.ops.marn_fast.bigru_persistent_device_limits(
        torch.empty(0, device=torch.device("cuda", index)))
    return DeviceLimits(sms, smem, bool(cooperative))


def device_limits(device: torch.device) -> Optional[DeviceLimits]:
    """The limits the CUDA kernels launch under: MARN_FAST_PERSISTENT_LIMITS when set (on any
    device, so that tests can force them on the CPU), the GPU's own on CUDA (SMs, opt-in shared
    memory per block and cooperative-launch support, from the device), None on the CPU (its twin
    has none)."""
    forced = os.environ.get(LIMITS_ENV, "").strip()
    if forced:
        try:
            fields = dict(item.split("=", 1) for item in forced.split(","))
            return DeviceLimits(int(fields["sms"]), int(fields["smem"]), fields.get("cooperative", "1") != "0")
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{LIMITS_ENV}: expected 'sms=N,smem=BYTES[,cooperative=0|1]', got {forced!r}") from exc
    if device.type != "cuda":
        return None
    _require_cuda_extension()
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


def _fallback(x: torch.Tensor, weights: Sequence[torch.Tensor], backward: bool) -> Optional[tuple[str, str]]:
    """(kind, reason with its numbers) when the CUDA kernels cannot run on these inputs, else None."""
    limits = device_limits(x.device)
    if limits is None:
        return None
    batch, hidden = x.shape[0], weights[1].shape[1]
    if x.is_cuda and x.dtype == torch.float64:
        return "float64", "its CUDA kernels compute in float32; float64 inputs run cuDNN's packed path in float64"
    if not limits.cooperative:
        return "cooperative", "this GPU does not support cooperative launches"
    if limits.sms < 2:
        return "sms", f"it needs at least 2 SMs (one block per direction), this GPU has {limits.sms}"
    plan = launch_plan(batch, hidden, limits.sms)
    for kernel, need in (("forward", plan.forward_smem), ("backward", plan.backward_smem))[:2 if backward else 1]:
        if need > limits.smem:
            return kernel, (f"its {kernel} kernel needs {need:,} bytes of shared memory per block at B={batch}, "
                            f"h={hidden} ({plan.units} units per block, {2 * plan.blocks_per_dir} blocks on "
                            f"{limits.sms} SMs), more than the {limits.smem:,} this GPU allows")
    return None


def fallback_reason(x: torch.Tensor, weights: Sequence[torch.Tensor], backward: bool) -> Optional[str]:
    """Why the CUDA kernels cannot run on these inputs (None: they can), numbers included.
    backward: whether the backward kernel must fit too (a gradient can flow)."""
    found = _fallback(x, weights, backward)
    return None if found is None else found[1]


_WARNED: set = set()  # the kinds of fall-back already warned about


def persistent_fallback(x: torch.Tensor, lengths: torch.Tensor,
                        weights: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """cuDNN's packed result where the CUDA kernels cannot launch (with a RuntimeWarning, once per
    kind of reason), else None. Runs before anything is launched."""
    found = _fallback(x, weights, needs_grad(x, weights))
    if found is None:
        return None
    kind, reason = found
    if kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(f"marn_fast: the persistent BiGRU falls back to cuDNN's packed path: {reason}",
                      RuntimeWarning, stacklevel=3)
    return packed_bigru(x, lengths, weights)


def persistent_bigru(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
                     num_slices: int = DEFAULT_SLICES) -> torch.Tensor:
    """The persistent BiGRU (see the module docstring); differentiable through its own
    reverse-time backward. GEMMs in `compute_dtype(x)` (bf16 under bf16 autocast), recurrence in
    fp32 (fp64 for fp64 inputs on the CPU); returns x's dtype. num_slices: blocks per direction of
    the Python twin (the compiled kernels size their own). Where the CUDA kernels cannot launch
    (shared memory, SMs, cooperative launch, float64: see fallback_reason) it returns cuDNN's packed
    result instead, with a one-time warning; where a launch fails (a grid barrier timed out) it
    raises a RuntimeError naming the cause."""
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
    fallback = persistent_fallback(x, lengths, weights)
    if fallback is not None:
        return fallback
    return _PersistentBiGRU.apply(x, lengths, num_slices, compute_dtype(x), *weights)
