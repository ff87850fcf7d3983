"""BiGRU over a padded batch with `nn.GRU(bidirectional=True)` semantics on packed sequences.

x [B, n, d_e], lengths [B] int64 (or None: all full), weights = the 8 tensors of a one-layer
bidirectional nn.GRU in its `_flat_weights` order (w_ih, w_hh, b_ih, b_hh, then *_reverse)
→ H [B, n, 2·d_r], zero at t ≥ lengths[b].

CPU path (exact, O(n) backward): torch's packed-sequence backward on the CPU is quadratic in n
(one slice-backward per step, each filling a zero tensor of the whole packed input). Instead the
forward direction runs as a unidirectional GRU on the padded batch (padding comes after each
document's tokens, so valid positions never see it) and the reverse direction as a second one on
each document reversed within its own length (gather with index lengths−1−t for t < lengths),
reversed back afterwards; padded outputs are zeroed. CUDA: cuDNN's packed path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..reference.checks import FLOAT_DTYPES, check_lengths, check_tensor

NUM_WEIGHTS = 8


def reverse_within_lengths_index(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] int64: lengths[b]−1−t for t < lengths[b], t otherwise (an involution)."""
    t = torch.arange(n, device=lengths.device)[None, :]
    rev = lengths[:, None] - 1 - t
    return torch.where(rev >= 0, rev, t)


def gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2]))


def _needs_grad(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """cuDNN's RNN backward exists only for a forward run in training mode (which also keeps its
    workspace): ask for it exactly when a gradient can flow, whatever the module's mode."""
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))


def packed_bigru(x: torch.Tensor, lengths: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """cuDNN-friendly path: the packed sequence through one bidirectional GRU call."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    hx = x.new_zeros(2, x.shape[0], weights[1].shape[1])
    out, _ = torch.gru(packed.data, packed.batch_sizes, hx, list(weights), True, 1, 0.0, _needs_grad(x, weights),
                       True)
    return pad_packed_sequence(packed._replace(data=out), batch_first=True, total_length=x.shape[1])[0]


IMPLS = ("auto", "persistent")


def bigru(x: torch.Tensor, lengths: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
          impl: str = "auto") -> torch.Tensor:
    """impl="auto": cuDNN's packed path on CUDA, the exact O(n) path on the CPU; "persistent": the
    persistent recurrence of `marn_fast.ops.bigru_persistent` (opt-in until a GPU run has tested
    and timed its CUDA kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "persistent":
        from .bigru_persistent import persistent_bigru
        return persistent_bigru(x, lengths, weights)
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, d_e] float")
    if len(weights) != NUM_WEIGHTS:
        raise ValueError(f"weights: expected the {NUM_WEIGHTS} tensors of a one-layer bidirectional nn.GRU, "
                         f"got {len(weights)}")
    batch, n, _ = x.shape
    check_lengths(lengths, batch, n, x.device)
    hidden = weights[1].shape[1]
    forward_w, reverse_w = list(weights[:4]), list(weights[4:])
    if lengths is None:
        return torch.gru(x, x.new_zeros(2, batch, hidden), list(weights), True, 1, 0.0, _needs_grad(x, weights),
                         True, True)[0]
    if x.is_cuda:
        return packed_bigru(x, lengths, weights)
    h0 = x.new_zeros(1, batch, hidden)
    valid = (torch.arange(n, device=x.device)[None, :] < lengths[:, None])[:, :, None]
    out_fwd = torch.gru(x, h0, forward_w, True, 1, 0.0, False, False, True)[0]
    index = reverse_within_lengths_index(lengths, n)
    out_rev = torch.gru(gather_time(x, index), h0, reverse_w, True, 1, 0.0, False, False, True)[0]
    out = torch.cat([out_fwd, gather_time(out_rev, index)], dim=2)
    return out * valid
