"""The GEMM-first implementation of the label-wise attention (impls "gemm" and "gemm_saved"):
vendor GEMMs (cuBLAS, oneDNN), one reduction and one elementwise pass between them.

Documents form one group cut at the longest document, or one group each when B ≤
PER_DOCUMENT_MAX_BATCH and lengths differ. Per group (D documents of T tokens) and chunk of Lc
labels (its [2·Lc, D·T] buffer within CHUNK_MAX_BYTES and CHUNK_FREE_FRACTION of free memory)
vendor GEMMs write S_c = Q_c·Kᵀ and P_c = W_c·Oᵀ label-major, [Lc, D·T] each with the batch folded
into the GEMM (the transpose of O·[Q_c; W_c]ᵀ when K = O: same FLOPs, and the token reductions
read contiguous memory; keys K [B, n, d_k] get a column space of their own), in the compute
dtype (the inputs' dtype: bf16 GEMMs for bf16, whose scores are rounded to bf16 as the eager
reference's; fp32 for fp16 on the CPU, said once); then one reduction over the valid tokens
(online softmax, fp32; fp64 for fp64) gives z and lse.
Backward recomputes S_c, P_c, turns them in place into dP = g·a and dS = g·a·(p − z) (zero on
padded tokens), then dO += dPᵀ·W_c (+ dSᵀ·Q_c when K = O, else dK += dSᵀ·Q_c), dW_c += dP·O,
dQ_c += dS·K (vendor GEMMs into fp32/fp64 accumulators).
"gemm_saved": when autograd will run and 2·L·B·n values of the compute dtype fit SAVED_MAX_BYTES
and SAVED_FREE_FRACTION of free memory, the forward also turns each block into [A; A∘(P − z)]
and keeps it; the backward scales it by g into a scratch chunk and runs only the gradient GEMMs,
4 GEMMs' FLOPs where "gemm" needs 6 (the CPU is GEMM-bound). Otherwise it is "gemm".

The reduction and the elementwise pass (`reductions`): Triton kernels
(`marn_fast.kernels.label_attention_gemm`) for fp16/bf16/fp32 on CUDA and on CPU tensors under
TRITON_INTERPRET=1; the C++ kernels of csrc/cpu/label_attention_blocks_cpu.cpp on the CPU
(fp32/fp64/bf16, extension built); PyTorch twins otherwise. The math and the registration are in
`marn_fast.ops.label_attention`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..kernels import interpreting
from ._backend import triton_available
from ._extension import cpu_extension_available
from .label_attention_chunked import chunks
from .memory import budget, itemsize
from .precision import accumulation_dtype, warn_once

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Label chunk: its score buffer SP [2·Lc, D·T] (compute dtype) is at most CHUNK_MAX_BYTES and at
# most CHUNK_FREE_FRACTION of the device's free memory (CUDA: free + cached-unused; CPU:
# MemAvailable; CHUNK_MAX_BYTES alone when that cannot be read).
CHUNK_MAX_BYTES = 512 << 20
CHUNK_FREE_FRACTION = 0.10
# "gemm_saved" keeps [A; A∘(P − z)] from the forward (2·L·B·n values of the compute dtype) when
# that is at most SAVED_MAX_BYTES and at most SAVED_FREE_FRACTION of free memory (under
# torch.compile SAVED_MAX_BYTES alone, decided at trace time); otherwise it runs as "gemm".
# 4 GiB holds the GPU benchmark's B=16, n=4,000, L=8,921 in bf16 (2.3 GB) and the CPU's full
# codes B=4, n=500, L=9,216 in fp32 (0.15 GB).
SAVED_MAX_BYTES = 4 << 30
SAVED_FREE_FRACTION = 0.25
# Batches of at most this many documents of unequal lengths run document by document (each
# GEMM stops at its document's length); larger batches run as one group, cut at the longest.
PER_DOCUMENT_MAX_BATCH = 4


def gemm_dtype(features: Tensor) -> torch.dtype:
    """The score buffer's (compute) dtype: the features' dtype, except fp16 on the CPU (fp32, said
    once: the CPU's fp16 GEMMs are emulated)."""
    if features.dtype == torch.float16 and not features.is_cuda:
        warn_once("label_attention-fp16-cpu", "label attention computes float16 inputs in float32 on the CPU")
        return torch.float32
    return features.dtype


def reductions(device: torch.device, dtype: torch.dtype) -> str:
    """Who runs the reduction and the elementwise pass on a `dtype` score buffer: "triton" on CUDA
    (or CPU tensors under the interpreter), "cpp" on the CPU with the extension built, else "torch"."""
    if triton_available() and dtype in TRITON_DTYPES and (
            device.type == "cuda" or (device.type == "cpu" and interpreting())):
        return "triton"
    if device.type == "cpu" and dtype in CPP_DTYPES and cpu_extension_available():
        return "cpp"
    return "torch"


def _token_splits(device: torch.device, docs: int, num_labels: int, tokens: int) -> int:
    """Token splits of the softmax reduction: on CUDA enough programs for 4 per SM (each split
    at least 4 token tiles); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    from ..kernels.label_attention_gemm import BLOCK_L, BLOCK_T

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = docs * -(-num_labels // BLOCK_L)
    return max(1, min(-(-4 * sms // programs), tokens // (4 * BLOCK_T)))


def _groups(ends: list, device: torch.device) -> list:
    """(d0, d1, T) per document group from the lengths (a list). On the CPU one group per
    document cut at its own length (no padded token is ever computed); elsewhere one per document
    when the batch is small and lengths differ, else one group of all documents cut at the longest
    (uniform groups for the GPU kernels)."""
    if device.type == "cpu":
        return [(d, d + 1, t) for d, t in enumerate(ends)]
    longest = max(ends)
    if len(ends) <= PER_DOCUMENT_MAX_BATCH and min(ends) < longest:
        return [(d, d + 1, t) for d, t in enumerate(ends)]
    return [(0, len(ends), longest)]


def _columns(features: Tensor, groups: list, dtype: torch.dtype) -> Tensor:
    """O (or K) as the GEMMs see it: [Σ_g D_g·T_g, C] in `dtype`, the groups' tokens side by side,
    group after group (a view of the features when one group covers them all)."""
    c = features.shape[2]
    parts = [features[d0:d1, :t].reshape(-1, c) for d0, d1, t in groups]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype).contiguous()


def _label_chunk(max_bytes: int, columns: int, num_labels: int, item_bytes: int) -> int:
    """Labels per chunk so that [2·Lc, columns] fits max_bytes, balanced over the chunks."""
    fit = max(1, max_bytes // (2 * columns * item_bytes))
    return -(-num_labels // -(-num_labels // fit))


class _Block:
    """The scores of labels [l0, l1) for the documents [d0, d1) of one group of T tokens: s and p
    are the group's [Lc, D·T] column slices of a label chunk's S and P (tokens contiguous, row
    stride: all groups' columns), lengths the group's lengths, pad its padded tokens [D, T] (None
    when there are none)."""

    def __init__(self, s, p, group, labels, lengths, pad):
        self.s, self.p, (self.d0, self.d1, self.tokens), (self.l0, self.l1) = s, p, group, labels
        self.lengths, self.pad = lengths, pad
        self.lc, self.docs = self.l1 - self.l0, self.d1 - self.d0

    def halves(self) -> Tuple[Tensor, Tensor]:
        """s and p as [Lc, D, T] views."""
        shape = (self.lc, self.docs, self.tokens)
        return self.s.view(shape), self.p.view(shape)

    def masked_halves(self) -> Tuple[Tensor, Tensor]:
        """`halves` with the padded tokens set in place: s to −inf, p to 0 (what the kernels skip)."""
        s, p = self.halves()
        if self.pad is not None:
            s.masked_fill_(self.pad, float("-inf"))
            p.masked_fill_(self.pad, 0.0)
        return s, p

    def rows(self, stat: Tensor) -> Tensor:
        """stat [B, L] → this block's [Lc, D, 1] (broadcast over tokens)."""
        return stat[self.d0:self.d1, self.l0:self.l1].t()[:, :, None]


def _blocks(s: Tensor, p: Tensor, groups: list, labels: Tuple[int, int], lengths: Tensor, ends: list):
    """The groups' _Blocks of a label chunk's S, P [Lc, Σcols]."""
    start = 0
    for group in groups:
        d0, d1, tokens = group
        width = (d1 - d0) * tokens
        pad = None
        if min(ends[d0:d1]) < tokens:
            pad = torch.arange(tokens, device=lengths.device)[None, :] >= lengths[d0:d1, None]
        yield _Block(s[:, start:start + width], p[:, start:start + width], group, labels, lengths[d0:d1], pad)
        start += width


def _stats_torch(block: _Block, z: Tensor, lse: Tensor, keep: bool) -> None:
    """PyTorch twin of the kernels: z, lse of the block; with keep the block becomes [A; A∘(P − z)]
    (zero on padded tokens), else it is left as scratch."""
    s, p = block.masked_halves()
    m = s.amax(2, keepdim=True)
    e = s.sub_(m).exp_()
    total = e.sum(2, keepdim=True, dtype=z.dtype)
    if keep:
        a = e.div_(total.to(e.dtype))
        block_z = p.mul_(a).sum(2, keepdim=True, dtype=z.dtype)
        p.addcmul_(a, block_z.to(p.dtype), value=-1.0)  # a·p − a·z
    else:
        block_z = p.mul_(e).sum(2, keepdim=True, dtype=z.dtype).div_(total)
    z[block.d0:block.d1, block.l0:block.l1] = block_z[:, :, 0].t()
    lse[block.d0:block.d1, block.l0:block.l1] = (m + total.log())[:, :, 0].t()


def _scores_to_grads_torch(block: _Block, z: Tensor, lse: Tensor, grad_z: Tensor) -> None:
    """PyTorch twin: recomputed S, P → dP = g·a, dS = g·a·(p − z), in place."""
    s, p = block.masked_halves()
    dp = s.sub_(block.rows(lse).to(s.dtype)).exp_().mul_(block.rows(grad_z).to(s.dtype))
    p.sub_(block.rows(z).to(p.dtype)).mul_(dp)


def _stats_triton(block: _Block, z: Tensor, lse: Tensor, keep: bool) -> None:
    """Triton: z, lse through `softmax_partials` (+ combine), then with keep `attention_transform`."""
    from ..kernels import label_attention_gemm as kernels

    splits = _token_splits(block.s.device, block.docs, block.lc, block.tokens)
    span = -(-block.tokens // (splits * kernels.BLOCK_T)) * kernels.BLOCK_T  # whole token tiles
    parts = block.s.new_empty((3, splits, block.docs, block.lc), dtype=torch.float32)
    grid = (-(-block.lc // kernels.BLOCK_L), block.docs, splits)
    kernels.softmax_partials[grid](block.s, block.p, block.lengths, parts[0], parts[1], parts[2],
                                   block.s.stride(0), block.tokens, block.lc, block.docs, span, BLOCK_L=kernels.BLOCK_L,
                                   BLOCK_T=kernels.BLOCK_T, num_warps=kernels.NUM_WARPS)
    m, total, acc = parts
    if splits > 1:
        m_all = m.amax(0)
        rescale = (m - m_all).exp_()
        m, total, acc = m_all, (total * rescale).sum(0), (acc * rescale).sum(0)
    else:
        m, total, acc = m[0], total[0], acc[0]
    z[block.d0:block.d1, block.l0:block.l1] = acc / total
    lse[block.d0:block.d1, block.l0:block.l1] = m + total.log()
    if keep:
        _transform_triton(block, z, lse, z, grad=False)


def _transform_triton(block: _Block, z: Tensor, lse: Tensor, grad_z: Tensor, grad: bool) -> None:
    from ..kernels import label_attention_gemm as kernels

    grid = (-(-block.tokens // kernels.BLOCK_T), -(-block.lc // kernels.BLOCK_L), block.docs)
    kernels.attention_transform[grid](block.s, block.p, block.lengths, z, lse, grad_z, block.s.stride(0),
                                      block.tokens, block.lc, z.shape[1], block.d0 * z.shape[1] + block.l0,
                                      GRAD=grad, BLOCK_L=kernels.BLOCK_L, BLOCK_T=kernels.BLOCK_T,
                                      num_warps=kernels.NUM_WARPS)


def _stats_cpp(block: _Block, z: Tensor, lse: Tensor, keep: bool) -> None:
    """C++ (csrc/cpu/label_attention_blocks_cpu.cpp): z, lse of the block; with keep the block
    becomes [A; A∘(P − z)] (zero on padded tokens)."""
    block_z, block_lse = torch.ops.marn_fast.label_attention_block_stats(block.s, block.p, block.lengths, keep)
    z[block.d0:block.d1, block.l0:block.l1] = block_z
    lse[block.d0:block.d1, block.l0:block.l1] = block_lse


def _scores_to_grads_cpp(block: _Block, z: Tensor, lse: Tensor, grad_z: Tensor) -> None:
    """C++: recomputed S, P → dP = g·a, dS = g·a·(p − z), in place (zero on padded tokens)."""
    rows = (slice(block.d0, block.d1), slice(block.l0, block.l1))
    torch.ops.marn_fast.label_attention_block_grads(block.s, block.p, block.lengths, z[rows].contiguous(),
                                                    lse[rows].contiguous(), grad_z[rows].contiguous())


_STATS = {"triton": _stats_triton, "cpp": _stats_cpp, "torch": _stats_torch}


def _scores_to_grads_triton(block: _Block, z: Tensor, lse: Tensor, grad_z: Tensor) -> None:
    _transform_triton(block, z, lse, grad_z, grad=True)


_SCORES_TO_GRADS = {"triton": _scores_to_grads_triton, "cpp": _scores_to_grads_cpp, "torch": _scores_to_grads_torch}


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc = a·b (first) or acc += a·b, accumulating in acc's dtype (fp32 for half a, b)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=0.0 if first else 1.0)
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


def _chunk_size(features: Tensor, columns: int, num_labels: int, dtype, scratch: bool = True):
    """Labels per chunk for `columns` token columns, and (scratch) one buffer for a chunk."""
    limit = budget(features.device, CHUNK_MAX_BYTES, CHUNK_FREE_FRACTION)
    size = _label_chunk(limit, columns, num_labels, itemsize(dtype))
    return size, (features.new_empty(2 * size * columns, dtype=dtype) if scratch else None)


def _halves(buffer: Tensor, labels: int, columns: int) -> Tuple[Tensor, Tensor]:
    """The first 2·labels·columns values of buffer as two [labels, columns] blocks."""
    first, second = buffer[:2 * labels * columns].view(2, labels, columns).unbind(0)
    return first, second


def _joined(s: Tensor) -> Tensor:
    """The [2·Lc, D·T] block made of s and the p block that directly follows it in memory."""
    return s.as_strided((2 * s.shape[0], s.shape[1]), s.stride())


def _scores(q: Tensor, w: Tensor, o: Tensor, k: Tensor, l0: int, l1: int, s: Tensor, p: Tensor) -> None:
    """s = Q[l0:l1]·Kᵀ and p = W[l0:l1]·Oᵀ (k is o without keys; two GEMMs: stacking [Q_c; W_c]
    would cost a copy of Q and W per call, the same time as the GEMMs lose by being two on the CPU)."""
    torch.mm(q[l0:l1], k.t(), out=s)
    torch.mm(w[l0:l1], o.t(), out=p)


def _interleaved(first: Tensor, second: Tensor, chunk: int) -> Tensor:
    """[first_0; second_0; first_1; second_1; …] over label chunks of `chunk` rows: chunk c's
    [first_c; second_c] are the rows 2·l0 … 2·l1 − 1."""
    ranges = chunks(first.shape[0], chunk)
    return torch.cat([t for l0, l1 in ranges for t in (first[l0:l1], second[l0:l1])])


def forward(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor, keys: Optional[Tensor] = None,
            saved: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(z, lse) [B, L] of the GEMM-first path, label chunk by label chunk: S_c = Q_c·Kᵀ (K = O
    without keys) and P_c = W_c·Oᵀ over every group's tokens (two vendor GEMMs), then one
    reduction per group. With
    `saved` (2·L·B·n values of the compute dtype) [A; A∘(P − z)] [2L, Σcols] is left at its start
    (the rest is zeroed); without, the chunks go through one scratch buffer."""
    features = features.contiguous()
    batch, num_labels = features.shape[0], queries.shape[0]
    dtype = gemm_dtype(features)
    q, w = queries.to(dtype), weights.to(dtype)
    z = features.new_empty((batch, num_labels), dtype=accumulation_dtype(features.dtype))
    lse = torch.empty_like(z)
    ends = lengths.tolist()  # one host sync per call
    groups = _groups(ends, features.device)
    o = _columns(features, groups, dtype)
    k = o if keys is None else _columns(keys, groups, dtype)
    columns = o.shape[0]
    lc, scratch = _chunk_size(features, columns, num_labels, dtype, scratch=saved is None)
    stats = _STATS[reductions(features.device, dtype)]
    kept = None if saved is None else saved[:2 * num_labels * columns].view(2 * num_labels, columns)
    for l0, l1 in chunks(num_labels, lc):
        if kept is None:
            s, p = _halves(scratch, l1 - l0, columns)
        else:
            s, p = kept[l0:l1], kept[num_labels + l0:num_labels + l1]
        _scores(q, w, o, k, l0, l1, s, p)
        for block in _blocks(s, p, groups, (l0, l1), lengths, ends):
            stats(block, z, lse, keep=kept is not None)
    if saved is not None:
        saved[2 * num_labels * columns:].zero_()
    return z, lse


def _scale_kept(kept: Tensor, block: _Block, num_labels: int, start: int, grad_z: Tensor) -> None:
    """block ← g·[A; A∘(P − z)] from the kept rows (block's columns start at `start`)."""
    g = block.rows(grad_z).to(block.s.dtype)
    width = block.docs * block.tokens
    for out, rows in zip(block.halves(), (kept[block.l0:block.l1], kept[num_labels + block.l0:num_labels + block.l1])):
        torch.mul(rows[:, start:start + width].view(out.shape), g, out=out)


def backward(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
             keys: Optional[Tensor], z: Tensor, lse: Tensor,
             saved: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dO, dK, dQ, dW) of the GEMM-first path (dK empty without keys): per label chunk dP = g·a,
    dS = g·a·(p − z) [Lc, Σcols] (recomputed from S, P, or g times the kept rows), then over all
    groups' tokens at once dO += dPᵀ·W_c + dSᵀ·Q_c (without keys; with keys dO += dPᵀ·W_c and
    dK += dSᵀ·Q_c), dW_c = dP·O, dQ_c = dS·K (vendor GEMMs into fp32/fp64 accumulators)."""
    features = features.contiguous()
    batch, n, c = features.shape
    num_labels = queries.shape[0]
    dtype, acc_dtype = gemm_dtype(features), accumulation_dtype(features.dtype)
    q, w = queries.to(dtype), weights.to(dtype)
    grad_z, z, lse = (t.to(acc_dtype).contiguous() for t in (grad_z, z, lse))
    ends = lengths.tolist()  # one host sync per call
    groups = _groups(ends, features.device)
    o = _columns(features, groups, dtype)
    k = o if keys is None else _columns(keys, groups, dtype)
    columns = o.shape[0]
    grad_o = o.new_empty((columns, c), dtype=acc_dtype)
    grad_k = grad_o if keys is None else k.new_empty(k.shape, dtype=acc_dtype)
    grad_q = queries.new_empty(queries.shape, dtype=acc_dtype)
    grad_w = weights.new_empty(weights.shape, dtype=acc_dtype)
    lc, scratch = _chunk_size(features, columns, num_labels, dtype)
    to_grads = _SCORES_TO_GRADS[reductions(features.device, dtype)]
    kept = None if saved is None else saved[:2 * num_labels * columns].view(2 * num_labels, columns)
    # Without keys dO accumulates in place (addmm_) when the compute dtype is the accumulator's;
    # otherwise (fp16/bf16) one GEMM per chunk with [W_c; Q_c] (stacked once) and one fp32 add.
    wq = None if dtype == acc_dtype or keys is not None else _interleaved(w, q, lc)
    for l0, l1 in chunks(num_labels, lc):
        s, p = _halves(scratch, l1 - l0, columns)
        if kept is None:
            _scores(q, w, o, k, l0, l1, s, p)
        start = 0
        for block in _blocks(s, p, groups, (l0, l1), lengths, ends):
            if kept is None:
                to_grads(block, z, lse, grad_z)
            else:
                _scale_kept(kept, block, num_labels, start, grad_z)
            start += block.docs * block.tokens
        if wq is None:  # s holds dP and p holds dS
            _add_matmul(grad_o, s.t(), w[l0:l1], first=l0 == 0)
            _add_matmul(grad_k, p.t(), q[l0:l1], first=keys is not None and l0 == 0)
        else:
            _add_matmul(grad_o, _joined(s).t(), wq[2 * l0:2 * l1], first=l0 == 0)
        _add_matmul(grad_w[l0:l1], s, o, first=True)
        _add_matmul(grad_q[l0:l1], p, k, first=True)
    grad_keys = features.new_empty(0) if keys is None else _scatter_columns(grad_k, groups, keys)
    return (_scatter_columns(grad_o, groups, features), grad_keys, grad_q.to(queries.dtype),
            grad_w.to(weights.dtype))


def _scatter_columns(grad_o: Tensor, groups: list, features: Tensor) -> Tensor:
    """dO [Σcols, C] → [B, n, C] in the features' dtype, zero on tokens no group covers (also dK
    with the keys as `features`)."""
    batch, n, c = features.shape
    start = 0
    if len(groups) == 1 and groups[0][2] == n:
        return grad_o.view(batch, n, c).to(features.dtype)
    grad = grad_o.new_zeros((batch, n, c), dtype=features.dtype)
    for d0, d1, tokens in groups:
        width = (d1 - d0) * tokens
        grad[d0:d1, :tokens] = grad_o[start:start + width].view(d1 - d0, tokens, c)
        start += width
    return grad


def saved_numel(features: Tensor, queries: Tensor) -> int:
    """Values "gemm_saved" keeps: [A; A∘(P − z)] for every label and token, 2·L·B·n."""
    return 2 * queries.shape[0] * features.shape[0] * features.shape[1]


def keeps_scores(features: Tensor, queries: Tensor, weights: Tensor, keys: Optional[Tensor] = None) -> bool:
    """Whether impl="gemm_saved" keeps the forward's scores for these inputs: autograd will need
    them and 2·L·B·n values of the compute dtype fit the saved-scores budget."""
    if not (torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (features, queries, weights, keys))):
        return False
    limit = SAVED_MAX_BYTES if torch.compiler.is_compiling() else budget(
        features.device, SAVED_MAX_BYTES, SAVED_FREE_FRACTION)
    return saved_numel(features, queries) * itemsize(gemm_dtype(features)) <= limit
