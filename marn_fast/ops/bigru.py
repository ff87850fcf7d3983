"""BiGRU over a padded batch with `nn.GRU(bidirectional=True)` semantics on packed sequences.

x [B, n, d_e], lengths [B] int64 (or None: all full), weights = the 8 tensors of a one-layer
bidirectional nn.GRU in its `_flat_weights` order (w_ih, w_hh, b_ih, b_hh, then *_reverse)
→ H [B, n, 2·d_r], zero at t ≥ lengths[b]. Per direction and step, with h_0 = 0:
    r = σ(W_ir x_t + b_ir + W_hr h + b_hr),  z = σ(W_iz x_t + b_iz + W_hz h + b_hz),
    c = tanh(W_in x_t + b_in + r ⊙ (W_hn h + b_hn)),  h ← (1 − z) ⊙ c + z ⊙ h;
the reverse direction of document b starts at its own last token, lengths[b] − 1.

Implementations (`bigru(..., impl=...)`, `available_impls(x, lengths, weights)`):
- "reference": torch's GRU on the packed sequence (exactly `nn.GRU` on a PackedSequence).
- "packed": the same call, the production path on CUDA (cuDNN's packed RNN); CUDA only.
- "split": exact and O(n) in backward on the CPU, where torch's packed-sequence backward is
  quadratic in n (one slice-backward per step, each filling a zero tensor of the whole packed
  input). The forward direction runs as a unidirectional GRU on the padded batch (padding comes
  after each document's tokens, so valid positions never see it) and the reverse direction as a
  second one on each document reversed within its own length (gather with index lengths−1−t for
  t < lengths), reversed back afterwards; padded outputs are zeroed.
- "cudnn_persistent": "split" shaped for cuDNN's persistent recurrence (CUDNN_RNN_ALGO_PERSIST_STATIC,
  which PyTorch considers only for one-layer unidirectional unpacked fp16 GRUs with hidden and input
  sizes multiples of 128): hidden and input sizes zero-padded to multiples of 128 (zero weights,
  biases and inputs keep the padded units at exactly 0 from h_0 = 0 and leave the real units'
  results unchanged; their outputs are dropped, and autograd maps the gradients back to the real
  weights), fp16 on CUDA (said once, by a warning, where the call asked for another dtype). On the
  CPU it computes as "split": a test of the padding and reversal only. Note: PyTorch's cuDNN
  heuristic (aten/src/ATen/native/cudnn/RNN.cpp, use_persist_device_heuristics) does not grant the
  persistent algorithm to GRUs on sm80+ GPUs with ≥ 98 SMs (A100, H100, H200), so there this runs
  cuDNN's standard algorithm on fp16, unpacked — still a candidate for the dispatcher to time
  (benchmarks/bench_bigru.py reports which kernels ran).
- "persistent": the persistent recurrence of `marn_fast.ops.bigru_persistent` (CUDA kernels; on the
  CPU their C++ twins). Listed on CUDA only where its launch fits (fallback_reason).
- "auto": the measured dispatcher's choice for the call's key (ops/dispatch.py) among
  `dispatch_candidates`: the available impls except "cudnn_persistent" on the CPU (there only a
  test of its padding, never faster than "split") and, when training on the CPU beyond
  QUADRATIC_MAX_N steps, "reference" (its backward is quadratic in n). The dispatcher's first-use
  check against the reference rejects a candidate that differs or raises (the persistent kernels
  raise when a grid barrier times out). Where nothing is measured, the static `default_impl`:
  without lengths one bidirectional GRU call on the batch ("reference"); with them "packed" on
  CUDA and "split" on the CPU.

Precision: every impl follows autocast as torch's GRU does (`marn_fast.ops.precision`), and the
dispatcher keys a call by its compute dtype (`compute_dtype(x)`: bf16 under bf16 autocast), so
bf16 has candidates and choices of its own. "reference", "packed" and "split" run torch's GRU
under the caller's autocast (on the CPU its GEMMs in bf16 with an fp32 state, returning fp32; on
CUDA cuDNN in the autocast dtype); "persistent" runs its GEMMs in the compute dtype and its
recurrence in fp32 and returns x's dtype; "cudnn_persistent" computes in fp16 on CUDA.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..reference.checks import FLOAT_DTYPES, check_lengths, check_same_device, check_tensor
from . import dispatch
from ._extension import cuda_extension_available
from .precision import compute_dtype, warn_once

NUM_WEIGHTS = 8
IMPLS = ("auto", "reference", "split", "packed", "persistent", "cudnn_persistent")
# "auto" does not time the packed reference when training on the CPU beyond this many steps:
# its backward is quadratic in n (toolchain note: 17 s at B=16, n=1,000, h=300).
QUADRATIC_MAX_N = 512
PERSIST_MULTIPLE = 128  # cuDNN's persistent GRU wants hidden and input sizes that are multiples of this


def reverse_within_lengths_index(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] int64: lengths[b]−1−t for t < lengths[b], t otherwise (an involution)."""
    t = torch.arange(n, device=lengths.device)[None, :]
    rev = lengths[:, None] - 1 - t
    return torch.where(rev >= 0, rev, t)


def gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2]))


def needs_grad(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """cuDNN's RNN backward exists only for a forward run in training mode (which also keeps its
    workspace): ask for it exactly when a gradient can flow, whatever the module's mode."""
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))


def _full_lengths(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)


def packed_bigru(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed sequence through one bidirectional GRU call ("reference"; "packed" on CUDA)."""
    hx = x.new_zeros(2, x.shape[0], weights[1].shape[1])
    if lengths is None:
        return torch.gru(x, hx, list(weights), True, 1, 0.0, needs_grad(x, weights), True, True)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = torch.gru(packed.data, packed.batch_sizes, hx, list(weights), True, 1, 0.0, needs_grad(x, weights),
                       True)
    return pad_packed_sequence(packed._replace(data=out), batch_first=True, total_length=x.shape[1])[0]


def _pad_gates(w: torch.Tensor, hidden: int, padded_hidden: int, padded_cols: Optional[int] = None) -> torch.Tensor:
    """A GRU weight [3h, c] → [3h', c'] (bias [3h] → [3h']): each gate's block zero-padded."""
    gates = w.reshape(3, hidden, *w.shape[1:])
    if w.dim() == 1:
        return F.pad(gates, [0, padded_hidden - hidden]).reshape(3 * padded_hidden)
    cols = w.shape[1] if padded_cols is None else padded_cols
    return F.pad(gates, [0, cols - w.shape[1], 0, padded_hidden - hidden]).reshape(3 * padded_hidden, cols)


def split_bigru(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
                multiple: int = 1, compute: Optional[torch.dtype] = None) -> torch.Tensor:
    """The two directions as unidirectional GRUs on the padded batch (module docstring, "split").
    multiple > 1: hidden and input sizes zero-padded to multiples of it. compute: the GRUs' dtype,
    with autocast off (the output then has x's dtype); None: torch's GRU under the caller's
    autocast, which decides the dtypes as for nn.GRU."""
    batch, n, d_in = x.shape
    hidden = weights[1].shape[1]
    lengths = _full_lengths(x) if lengths is None else lengths
    padded_hidden, padded_in = -(-hidden // multiple) * multiple, -(-d_in // multiple) * multiple
    padded = (padded_hidden, padded_in) != (hidden, d_in)
    index = reverse_within_lengths_index(lengths, n)
    xc = F.pad(x, (0, padded_in - d_in)) if padded else x
    xc = xc if compute is None else xc.to(compute)
    h0 = xc.new_zeros(1, batch, padded_hidden)
    train = needs_grad(x, weights)
    outs = []
    # With an explicit compute dtype, autocast would recast the GRU to its own dtype.
    with contextlib.nullcontext() if compute is None else torch.autocast(x.device.type, enabled=False):
        for direction, inputs in ((0, xc), (1, gather_time(xc, index))):
            params = list(weights[4 * direction:4 * direction + 4])
            if padded:
                cols = (padded_in, padded_hidden, None, None)
                params = [_pad_gates(p, hidden, padded_hidden, c) for p, c in zip(params, cols)]
            if compute is not None:
                params = [p.to(compute) for p in params]
            out = torch.gru(inputs, h0, params, True, 1, 0.0, train, False, True)[0]
            outs.append(out[..., :hidden])
    out = torch.cat([outs[0], gather_time(outs[1], index)], dim=2)
    out = out if compute is None else out.to(x.dtype)
    valid = (torch.arange(n, device=x.device)[None, :] < lengths[:, None])[:, :, None]
    return out * valid


def cudnn_persistent_bigru(x: torch.Tensor, lengths: Optional[torch.Tensor],
                           weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """"split" with sizes padded to multiples of 128, in fp16 on CUDA (module docstring); on the
    CPU as "split" (the caller's autocast decides)."""
    if not x.is_cuda:
        return split_bigru(x, lengths, weights, multiple=PERSIST_MULTIPLE)
    asked = compute_dtype(x)
    if asked != torch.float16:
        warn_once(f"bigru.cudnn_persistent.{asked}",
                  f"the BiGRU's impl 'cudnn_persistent' computes in float16 on CUDA (cuDNN's persistent RNN "
                  f"algorithm), not in {str(asked).replace('torch.', '')}")
    return split_bigru(x, lengths, weights, multiple=PERSIST_MULTIPLE, compute=torch.float16)


def _persistent(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    from .bigru_persistent import persistent_bigru
    return persistent_bigru(x, lengths, weights)


_FUNCTIONS = {"reference": packed_bigru, "packed": packed_bigru, "split": split_bigru,
              "cudnn_persistent": cudnn_persistent_bigru, "persistent": _persistent}


def _check(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor]) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, d_e] float")
    if x.shape[1] == 0:
        raise ValueError(f"x: expected at least one token (n >= 1), got shape {tuple(x.shape)}")
    if len(weights) != NUM_WEIGHTS:
        raise ValueError(f"weights: expected the {NUM_WEIGHTS} tensors of a one-layer bidirectional nn.GRU, "
                         f"got {len(weights)}")
    if weights[0].dim() != 2 or weights[0].shape[1] != x.shape[2]:
        raise ValueError(f"x: expected [B, n, d_e={weights[0].shape[-1]}] (the GRU's input size, from w_ih "
                         f"{tuple(weights[0].shape)}), got shape {tuple(x.shape)}")
    check_same_device(x=x, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    check_lengths(lengths, x.shape[0], x.shape[1], x.device)


def _unavailable(impl: str, x: torch.Tensor) -> Optional[str]:
    """Why `impl` cannot run on x's device and dtype (None: it can)."""
    if impl == "packed" and not x.is_cuda:
        return f"it is cuDNN's packed RNN and needs CUDA tensors, got device {x.device}"
    if impl == "cudnn_persistent" and x.is_cuda and x.dtype == torch.float64:
        return "it computes in fp16 on CUDA, pointless for float64 inputs"
    if impl == "persistent" and x.device.type == "meta":
        return "its processing order is computed from the lengths' values, which meta tensors do not have"
    if impl == "persistent" and x.is_cuda and not cuda_extension_available():
        return "its CUDA kernels need the compiled extension marn_fast._C_cuda (pip install --no-build-isolation .)"
    return None


def available_impls(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor]) -> tuple:
    """The implementations that can run on these inputs now ("reference" included, "auto" not).
    "persistent" on CUDA only where its kernels' launch fits (else it would fall back to cuDNN)."""
    _check(x, lengths, weights)
    found = [impl for impl in IMPLS[1:] if _unavailable(impl, x) is None]
    if x.is_cuda and "persistent" in found:
        from .bigru_persistent import fallback_reason
        if fallback_reason(x, weights, needs_grad(x, weights)) is not None:
            found.remove("persistent")
    return tuple(found)


def default_impl(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> str:
    """The static choice: "reference" without lengths (one call on the batch); with them "packed"
    on CUDA, "split" on the CPU."""
    return "reference" if lengths is None else ("packed" if x.is_cuda else "split")


def dispatch_candidates(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
                        train: bool) -> tuple:
    """The impls "auto" measures (see the module docstring)."""
    excluded = set() if x.is_cuda else {"cudnn_persistent"}
    if train and not x.is_cuda and x.shape[1] > QUADRATIC_MAX_N:
        excluded.add("reference")
    return tuple(impl for impl in available_impls(x, lengths, weights) if impl not in excluded)


# Values per (document, step) each implementation holds at its peak beyond x, as (a, b, c):
# a·d_e + b·h (+ c·h more when training), estimated from the code. reference/packed: the packed
# input copy, the input gates of both directions (6h), the packed and padded outputs (4h);
# training keeps every step's gates and states (~12h). split: the reversed input copy, the input
# gates (6h), both directions' outputs, their reversal and concatenation (6h). persistent: gx
# (6h) and the states (2h); training adds gh and the gate gradients (12h) and dG (6h).
# cudnn_persistent: "split" with d_e and h padded to multiples of PERSIST_MULTIPLE.
PEAK_VALUES = {"reference": (1, 10, 12), "packed": (1, 10, 12), "split": (1, 12, 12),
               "cudnn_persistent": (1, 12, 12), "persistent": (0, 8, 18)}


def peak_bytes(impl: str, x: torch.Tensor, weights: Sequence[torch.Tensor], train: bool, dtype: torch.dtype) -> int:
    """Estimated extra peak bytes of one call of `impl` (forward, and backward when `train`) on x
    [B, n, d_e] with hidden size h computing in `dtype`: B·n·(a·d_e + b·h [+ c·h]) values, (a, b, c)
    = PEAK_VALUES[impl] (the measured dispatcher's memory estimate)."""
    batch, n, embed = x.shape
    hidden = weights[1].shape[1]
    if impl == "cudnn_persistent":
        embed, hidden = (-(-v // PERSIST_MULTIPLE) * PERSIST_MULTIPLE for v in (embed, hidden))
    a, b, c = PEAK_VALUES[impl]
    return batch * n * (a * embed + (b + (c if train else 0)) * hidden) * torch.finfo(dtype).bits // 8


def _measured_impl(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor]) -> str:
    train = dispatch.grad_flows(x, *weights)
    batch, n, embed = x.shape
    return dispatch.choose(
        "bigru", device=x.device, dtype=compute_dtype(x), train=train,
        sizes={"B": batch, "n": n, "d_e": embed, "h": weights[1].shape[1]},
        candidates=lambda: dispatch_candidates(x, lengths, weights, train), default=default_impl(x, lengths),
        trial=lambda: dispatch.autograd_trial(lambda impl, t, lens, *w: bigru(t, lens, w, impl), [x, lengths, *weights],
                                              train),
        memory=lambda impl, dtype: peak_bytes(impl, x, weights, train, dtype))


def bigru(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
          impl: str = "auto") -> torch.Tensor:
    """The BiGRU (module docstring) through implementation `impl`; a ValueError names why an impl
    cannot run here. impl="persistent" falls back to cuDNN (with a warning) where its CUDA
    kernels cannot launch, and raises a RuntimeError naming the cause where a launch fails."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _check(x, lengths, weights)
    if impl == "auto":
        impl = _measured_impl(x, lengths, weights)
    reason = _unavailable(impl, x)
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run here: {reason}")
    return _FUNCTIONS[impl](x, lengths, weights)
