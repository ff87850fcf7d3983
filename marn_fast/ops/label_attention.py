"""Label-wise attention logits (paper eqs. 12–15), fused: memory linear in n + L.

features O [B, n, C], queries Q [L, C] (U in the paper), weights W [L, C], bias b [L],
lengths [B] int64 (tokens t ≥ lengths[b] are ignored; None = all n) → logits [B, L]:
    s_lt = q_l·o_t,  p_lt = w_l·o_t,  a_lt = softmax_t(s_lt) over t < lengths[b]
    z_l = Σ_t a_lt p_lt,  logit_l = z_l + b_l          (= w_l·Σ_t a_lt o_t + b_l)
Neither A [B, L, n] nor V = Aᵀ·O [B, L, C] is ever materialised: an online softmax over token
tiles keeps a running max, sum and Σ a·p, and writes z and lse = log Σ_t exp(s_lt) (fp32, or
fp64 for fp64 inputs). Backward recomputes a = exp(s − lse) chunk by chunk; with g = dz:
    ds = g·a·(p − z),  dp = g·a,  dO = ds·Q + dp·W,  dQ = Σ_b dsᵀ·O,  dW = Σ_b dpᵀ·O,
and db = Σ_b dlogit comes from the plain `z + bias` outside the op.

Paths (`impl`, see `_backend.resolve_impl`):
  "triton": Triton kernels (`marn_fast.kernels.label_attention`), ops
            `marn_fast::label_attention_fwd/_bwd`; fp16/bf16/fp32 on CUDA, or on CPU tensors
            under TRITON_INTERPRET=1.
  "torch":  plain PyTorch, chunked (ops `marn_fast::label_attention_chunked_fwd/_bwd`): per
            chunk of DOC_CHUNK documents × LABEL_CHUNK labels × TOKEN_CHUNK tokens one batched
            GEMM [Q; W]·Oᵀ gives S and P, so the largest intermediate is
            [DOC_CHUNK, 2·LABEL_CHUNK, TOKEN_CHUNK] whatever n and L, forward and backward
            alike (the backward recomputes it from lse). Tokens past the longest document of a
            chunk are never read. Any device, any float dtype (half inputs computed in fp32).
            On CPU tensors (fp32, fp64) with the C++ extension built, the forward is instead
            the C++ kernel `marn_fast::label_attention_forward` (csrc/cpu/label_attention_cpu.cpp):
            per (document, 256 labels) it walks 256-token tiles, one GEMM per tile and one
            vectorised online-softmax pass while the tile is in cache: 1.12–1.43× the eager
            forward where the PyTorch chunks reach 0.95–1.17× (B=4, n=2,000, C=600, L=2,000 and
            9,000, 1 and 2 threads; benchmarks/bench_label_attention.py, impl "fused-pytorch").
            The backward stays the PyTorch chunks (GEMM-bound: its recompute costs two more
            GEMMs than eager's backward, so C++ could not make it faster here).
  "gemm":   GEMM-first, every device (ops `marn_fast::label_attention_gemm_fwd/_bwd`). Documents
            form one group cut at the longest document, or one group each when B ≤
            PER_DOCUMENT_MAX_BATCH and lengths differ. Per group (D documents of T tokens) and
            chunk of Lc labels (its [2·Lc, D·T] buffer within CHUNK_MAX_BYTES and
            CHUNK_FREE_FRACTION of free memory) vendor GEMMs write S_c = Q_c·Oᵀ and P_c = W_c·Oᵀ
            label-major, [Lc, D·T] each with the batch folded into the GEMM (the transpose of
            O·[Q_c; W_c]ᵀ: same FLOPs, and the token reductions read contiguous memory), in the
            compute dtype (the input dtype; fp32 for fp16/bf16 off CUDA); then one reduction
            over the valid tokens (online softmax, fp32; fp64 for fp64) gives z and lse.
            Backward recomputes S_c, P_c, turns them in place into dP = g·a and dS = g·a·(p − z)
            (zero on padded tokens), then dO += dPᵀ·W_c + dSᵀ·Q_c, dW_c += dP·O, dQ_c += dS·O
            (vendor GEMMs into fp32/fp64 accumulators). The reduction and the elementwise pass
            are Triton kernels (`marn_fast.kernels.label_attention_gemm`) for fp16/bf16/fp32 on
            CUDA and on CPU tensors under TRITON_INTERPRET=1, PyTorch ops otherwise. With
            fp16/bf16 on CUDA, S and P are rounded to the input dtype before the softmax, as in
            the eager reference ("triton" keeps them in fp32).
  "gemm_saved": "gemm" that keeps what the backward needs: when autograd will run and 2·L·B·n
            values of the compute dtype fit SAVED_MAX_BYTES and SAVED_FREE_FRACTION of free
            memory, the forward also turns each block into [A; A∘(P − z)] and keeps it (ops
            `marn_fast::label_attention_gemm_saved_fwd/_bwd`); the backward scales it by g into
            a scratch chunk and runs only the gradient GEMMs, 4 GEMMs' FLOPs where "gemm" needs
            6 (the CPU is GEMM-bound). Otherwise, and always without grad, it is "gemm".
  "reference": `marn_fast.reference.label_attention` (queries and weights cast to the features'
            dtype, logits returned as fp32, fp64 for fp64, like the other paths).
  "auto":   the measured dispatcher's choice among `available_impls` for this call's key
            (ops/dispatch.py); where nothing is measured, the static `default_impl`: "triton" on
            CUDA when triton is installed and the dtype is not fp64, else "torch".
`available_impls(...)` lists the names that can run on given inputs.
Queries and weights are cast to the features' dtype (as autocast would), so the kernels see
one dtype. Ops are registered with torch.library.custom_op + register_fake + register_autograd
(passes opcheck and torch.compile(fullgraph=True), also under the Triton interpreter).

`label_attention_topk` returns the k tokens with the largest attention weight for chosen
labels per document (the evidence that predict/explain shows), computing A only for those.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference.checks import FLOAT_DTYPES, check_lengths, check_same_device, check_shape, check_tensor
from ..reference.label_attention import label_attention as reference_label_attention
from ..reference.label_attention import token_mask
from . import dispatch
from ._backend import interpreting, resolve_impl, triton_available
from ._extension import cpu_extension_available
from .memory import free_memory_bytes

# Chunked PyTorch path: documents, labels and tokens per chunk. Its largest intermediate is the
# score chunk [DOC_CHUNK, 2·LABEL_CHUNK, TOKEN_CHUNK] in the compute dtype (16 MiB in fp32).
# Measured on 2 CPU cores at B=4, n=2000, C=600, L=9000 (forward, vs the eager reference): one
# document per chunk (skips each document's padding) 1.37×; 2 × 512 labels 1.12–1.26×; 4 × 256
# labels 1.05–1.19×. Time is GEMM-bound; smaller chunks mean more, smaller ops.
DOC_CHUNK = 1
LABEL_CHUNK = 1024
TOKEN_CHUNK = 2048
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def check_label_attention_args(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                               lengths: Optional[Tensor]) -> None:
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, C] float")
    b, n, c = features.shape
    check_tensor("queries", queries, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L, C={c}] float")
    num_labels = queries.shape[0]
    if queries.shape[1] != c:
        raise ValueError(f"queries: expected [L, C={c}] (C of features {tuple(features.shape)}), "
                         f"got shape {tuple(queries.shape)}")
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L={num_labels}, C={c}]")
    check_shape("weights", weights, (num_labels, c), "[L, C] (L of queries, C of features)")
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, expected=f"[L={num_labels}]")
    check_shape("bias", bias, (num_labels,), "[L] (L of queries)")
    if n == 0 or num_labels == 0 or c == 0:
        raise ValueError(f"features/queries: n, L and C must be >= 1, got n={n}, L={num_labels}, C={c}")
    check_same_device(features=features, queries=queries, weights=weights, bias=bias, lengths=lengths)
    check_lengths(lengths, b, n, features.device)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------
def _kernel_flags(dtype: torch.dtype) -> dict:
    """UPCAST: bf16 tl.dot is wrong under the interpreter; fp32 dots in IEEE precision (no TF32)."""
    return {"UPCAST": interpreting() and dtype == torch.bfloat16,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _label_splits(device: torch.device, batch: int, num_labels: int) -> int:
    """Document groups of the dQ/dW kernel: on CUDA enough (label tile, group) programs for two
    per SM when L is small (at most B); 1 on the CPU interpreter."""
    if device.type != "cuda":
        return 1
    from ..kernels.label_attention import NOMINAL_BLOCK_L

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    label_tiles = -(-num_labels // NOMINAL_BLOCK_L)
    return max(1, min(batch, -(-2 * sms // label_tiles)))


@torch.library.custom_op("marn_fast::label_attention_fwd", mutates_args=())
def _triton_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    import triton

    from ..kernels import label_attention as kernels

    features, queries, weights, lengths = (t.contiguous() for t in (features, queries, weights, lengths))
    batch, n, c = features.shape
    num_labels = queries.shape[0]
    z = features.new_empty((batch, num_labels), dtype=torch.float32)
    lse = torch.empty_like(z)
    grid = lambda meta: (batch, triton.cdiv(num_labels, meta["BLOCK_L"]))  # noqa: E731
    kernels.label_attention_fwd[grid](features, queries, weights, lengths, z, lse, n, num_labels, c,
                                      **_kernel_flags(features.dtype))
    return z, lse


@torch.library.custom_op("marn_fast::label_attention_bwd", mutates_args=())
def _triton_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    import triton

    from ..kernels import label_attention as kernels

    grad_z, features, queries, weights, lengths, z, lse = (
        t.contiguous() for t in (grad_z.float(), features, queries, weights, lengths, z, lse))
    batch, n, c = features.shape
    num_labels = queries.shape[0]
    flags = _kernel_flags(features.dtype)
    grad_features = features.new_zeros((batch, n, c), dtype=torch.float32)
    grid_a = lambda meta: (batch, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernels.label_attention_bwd_features[grid_a](features, queries, weights, lengths, z, lse, grad_z,
                                                 grad_features, n, num_labels, c, **flags)
    splits = _label_splits(features.device, batch, num_labels)
    grad_q = features.new_empty((splits, num_labels, c), dtype=torch.float32)
    grad_w = torch.empty_like(grad_q)
    grid_b = lambda meta: (triton.cdiv(num_labels, meta["BLOCK_L"]), splits)  # noqa: E731
    kernels.label_attention_bwd_labels[grid_b](features, queries, weights, lengths, z, lse, grad_z, grad_q,
                                               grad_w, batch, n, num_labels, c, splits, **flags)
    return (grad_features.to(features.dtype), grad_q.sum(0).to(queries.dtype),
            grad_w.sum(0).to(weights.dtype))


# ---------------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU, or any device with impl="torch")
# ---------------------------------------------------------------------------------------------
def _chunks(length: int, size: int):
    return ((start, min(start + size, length)) for start in range(0, length, size))


def _chunk_grid(lengths: Tensor, num_labels: int):
    """(d0, d1, l0, l1, t0, t1) per chunk of documents × labels × tokens; token chunks stop at the
    longest document of the document chunk."""
    token_ends = lengths.tolist()
    for d0, d1 in _chunks(len(token_ends), DOC_CHUNK):
        for l0, l1 in _chunks(num_labels, LABEL_CHUNK):
            for t0, t1 in _chunks(max(token_ends[d0:d1]), TOKEN_CHUNK):
                yield d0, d1, l0, l1, t0, t1


def _score_chunk(features, queries, weights, lengths, chunk, dtype) -> Tuple[Tensor, Tensor]:
    """o = features[d0:d1, t0:t1] in `dtype` and sp = [Q; W]·oᵀ [docs, 2·labels, tokens] (S then
    P) with S = −∞ on padded tokens. Callers keep sp local to one chunk's function so that only
    one chunk is alive at a time."""
    d0, d1, l0, l1, t0, t1 = chunk
    o = features[d0:d1, t0:t1].to(dtype)
    qw = torch.cat([queries[l0:l1], weights[l0:l1]]).to(dtype)
    sp = torch.bmm(qw.expand(d1 - d0, -1, -1), o.transpose(1, 2))
    padded = torch.arange(t0, t1, device=features.device) >= lengths[d0:d1, None, None]
    sp[:, :l1 - l0].masked_fill_(padded, float("-inf"))
    return o, sp


def _forward_chunk(features, queries, weights, lengths, chunk, m, total, acc) -> None:
    """Online-softmax update of the running max m, Σe and Σe·p [B, L] for one chunk."""
    d0, d1, l0, l1, t0, _ = chunk
    _, sp = _score_chunk(features, queries, weights, lengths, chunk, m.dtype)
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


def chunked_forward_torch(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """(z, lse) through plain-PyTorch chunks (any device and float dtype); the "torch" path's
    forward wherever the C++ kernel does not apply."""
    shape = (features.shape[0], queries.shape[0])
    dtype = _accumulation_dtype(features.dtype)
    m, total, acc = (features.new_empty(shape, dtype=dtype) for _ in range(3))
    for chunk in _chunk_grid(lengths, queries.shape[0]):
        _forward_chunk(features, queries, weights, lengths, chunk, m, total, acc)
    return acc / total, m + total.log()


def _cpu_kernel_applies(features: Tensor) -> bool:
    return features.device.type == "cpu" and features.dtype in CPU_KERNEL_DTYPES and cpu_extension_available()


@torch.library.custom_op("marn_fast::label_attention_chunked_fwd", mutates_args=())
def _chunked_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    if _cpu_kernel_applies(features):
        return torch.ops.marn_fast.label_attention_forward(features, queries, weights, lengths)
    return chunked_forward_torch(features, queries, weights, lengths)


def _backward_chunk(features, queries, weights, lengths, chunk, grad_z, z, lse,
                    grad_features, grad_q, grad_w) -> None:
    """Adds one chunk's share of dO, dQ, dW (a recomputed from lse)."""
    d0, d1, l0, l1, t0, t1 = chunk
    o, sp = _score_chunk(features, queries, weights, lengths, chunk, grad_features.dtype)
    lc = l1 - l0
    s, p = sp[:, :lc], sp[:, lc:]  # overwritten in place by dp, then ds
    dp = s.sub_(lse[d0:d1, l0:l1, None]).exp_().mul_(grad_z[d0:d1, l0:l1, None])  # g·a
    p.sub_(z[d0:d1, l0:l1, None]).mul_(dp)  # ds = g·a·(p − z)
    wq = torch.cat([weights[l0:l1], queries[l0:l1]]).to(sp.dtype)  # pairs with [dp; ds]
    grad_features[d0:d1, t0:t1] += torch.matmul(sp.transpose(1, 2), wq)
    grad_wq = torch.bmm(sp, o).sum(0)  # [dW; dQ] rows of the label chunk
    grad_w[l0:l1] += grad_wq[:lc]
    grad_q[l0:l1] += grad_wq[lc:]


@torch.library.custom_op("marn_fast::label_attention_chunked_bwd", mutates_args=())
def _chunked_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                 z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = _accumulation_dtype(features.dtype)
    grad_features = torch.zeros_like(features, dtype=dtype)
    grad_q = torch.zeros_like(queries, dtype=dtype)
    grad_w = torch.zeros_like(weights, dtype=dtype)
    grad_z = grad_z.to(dtype)
    for chunk in _chunk_grid(lengths, queries.shape[0]):
        _backward_chunk(features, queries, weights, lengths, chunk, grad_z, z, lse,
                        grad_features, grad_q, grad_w)
    return grad_features.to(features.dtype), grad_q.to(queries.dtype), grad_w.to(weights.dtype)


# ---------------------------------------------------------------------------------------------
# GEMM-first path ("gemm", "gemm_saved"): vendor GEMMs, one reduction, one elementwise pass
# ---------------------------------------------------------------------------------------------
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


def _budget(device: torch.device, max_bytes: int, fraction: float) -> int:
    free = free_memory_bytes(device)
    return max_bytes if free is None else min(max_bytes, int(fraction * free))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _gemm_dtype(features: Tensor) -> torch.dtype:
    """The score buffer's (compute) dtype: the input dtype, except fp16/bf16 off CUDA (fp32)."""
    if features.dtype in (torch.float16, torch.bfloat16) and not features.is_cuda:
        return torch.float32
    return features.dtype


def _use_triton_reductions(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton reduction/elementwise kernels on CUDA (or CPU tensors under the interpreter) for
    fp16/bf16/fp32 score buffers; the PyTorch twin otherwise (CPU, fp64)."""
    return (triton_available() and dtype in TRITON_DTYPES
            and (device.type == "cuda" or (device.type == "cpu" and interpreting())))


def _token_splits(device: torch.device, docs: int, num_labels: int, tokens: int) -> int:
    """Token splits of the softmax reduction: on CUDA enough programs for 4 per SM (each split
    at least 4 token tiles); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    from ..kernels.label_attention_gemm import BLOCK_L, BLOCK_T

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = docs * -(-num_labels // BLOCK_L)
    return max(1, min(-(-4 * sms // programs), tokens // (4 * BLOCK_T)))


def _groups(ends: list) -> list:
    """(d0, d1, T) per document group from the lengths (a list): one per document when the batch
    is small and lengths differ, else one group of all documents cut at the longest (T = its
    token count)."""
    longest = max(ends)
    if len(ends) <= PER_DOCUMENT_MAX_BATCH and min(ends) < longest:
        return [(d, d + 1, t) for d, t in enumerate(ends)]
    return [(0, len(ends), longest)]


def _label_chunk(budget: int, columns: int, num_labels: int, itemsize: int) -> int:
    """Labels per chunk so that [2·Lc, columns] fits the budget, balanced over the chunks."""
    fit = max(1, budget // (2 * columns * itemsize))
    return -(-num_labels // -(-num_labels // fit))


class _Block:
    """The scores of labels [l0, l1) for documents [d0, d1) of a group of T tokens: s and p are
    [Lc, D·T] token-contiguous row blocks, lengths the group's lengths, pad its padded tokens
    [D, T] (None when there are none)."""

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

    columns = block.docs * block.tokens
    splits = _token_splits(block.s.device, block.docs, block.lc, block.tokens)
    span = -(-block.tokens // (splits * kernels.BLOCK_T)) * kernels.BLOCK_T  # whole token tiles
    parts = block.s.new_empty((3, splits, block.docs, block.lc), dtype=torch.float32)
    grid = (-(-block.lc // kernels.BLOCK_L), block.docs, splits)
    kernels.softmax_partials[grid](block.s, block.p, block.lengths, parts[0], parts[1], parts[2], columns,
                                   block.tokens, block.lc, block.docs, span, BLOCK_L=kernels.BLOCK_L,
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
    kernels.attention_transform[grid](block.s, block.p, block.lengths, z, lse, grad_z, block.docs * block.tokens,
                                      block.tokens, block.lc, z.shape[1], block.d0 * z.shape[1] + block.l0,
                                      GRAD=grad, BLOCK_L=kernels.BLOCK_L, BLOCK_T=kernels.BLOCK_T,
                                      num_warps=kernels.NUM_WARPS)


def _group_inputs(features: Tensor, lengths: Tensor, ends: list, group, dtype):
    """(O of the group as [D·T, C] in dtype, the group's lengths, its padding mask or None)."""
    d0, d1, tokens = group
    o = features[d0:d1, :tokens].reshape(-1, features.shape[2]).to(dtype)
    group_lengths = lengths[d0:d1]
    pad = None
    if min(ends[d0:d1]) < tokens:
        pad = torch.arange(tokens, device=features.device)[None, :] >= group_lengths[:, None]
    return o, group_lengths, pad


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc = a·b (first) or acc += a·b, accumulating in acc's dtype (fp32 for half a, b)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=0.0 if first else 1.0)
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


def _chunk_size(features: Tensor, groups, num_labels: int, dtype, scratch: bool = True):
    """Labels per chunk (the same for every group, sized for the widest), and (scratch) one
    buffer for a chunk of the widest group."""
    budget = _budget(features.device, CHUNK_MAX_BYTES, CHUNK_FREE_FRACTION)
    columns = max((d1 - d0) * t for d0, d1, t in groups)
    size = _label_chunk(budget, columns, num_labels, _itemsize(dtype))
    return size, (features.new_empty(2 * size * columns, dtype=dtype) if scratch else None)


def _halves(buffer: Tensor, labels: int, columns: int) -> Tuple[Tensor, Tensor]:
    """The first 2·labels·columns values of buffer as two [labels, columns] blocks."""
    first, second = buffer[:2 * labels * columns].view(2, labels, columns).unbind(0)
    return first, second


def _joined(s: Tensor) -> Tensor:
    """The [2·Lc, D·T] block made of s and the p block that directly follows it in memory."""
    return s.as_strided((2 * s.shape[0], s.shape[1]), s.stride())


def _scores(q: Tensor, w: Tensor, o: Tensor, l0: int, l1: int, s: Tensor, p: Tensor) -> None:
    """s = Q[l0:l1]·Oᵀ and p = W[l0:l1]·Oᵀ (two GEMMs: stacking [Q_c; W_c] would cost a copy of
    Q and W per call, the same time as the GEMMs lose by being two on the CPU)."""
    torch.mm(q[l0:l1], o.t(), out=s)
    torch.mm(w[l0:l1], o.t(), out=p)


def _interleaved(first: Tensor, second: Tensor, chunk: int) -> Tensor:
    """[first_0; second_0; first_1; second_1; …] over label chunks of `chunk` rows: chunk c's
    [first_c; second_c] are the rows 2·l0 … 2·l1 − 1."""
    ranges = _chunks(first.shape[0], chunk)
    return torch.cat([t for l0, l1 in ranges for t in (first[l0:l1], second[l0:l1])])


def gemm_forward(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                 saved: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(z, lse) [B, L] of the GEMM-first path, label chunk by label chunk: S_c = Q_c·Oᵀ and
    P_c = W_c·Oᵀ (vendor GEMMs), then one reduction. With `saved` (2·L·B·n values of the
    compute dtype) each group's [A; A∘(P − z)] [2L, D·T] is left in it, group after group (the
    rest is zeroed); without, the chunks go through one scratch buffer."""
    features = features.contiguous()
    batch, num_labels = features.shape[0], queries.shape[0]
    dtype = _gemm_dtype(features)
    q, w = queries.to(dtype), weights.to(dtype)
    z = features.new_empty((batch, num_labels), dtype=_accumulation_dtype(features.dtype))
    lse = torch.empty_like(z)
    ends = lengths.tolist()  # one host sync per call
    groups = _groups(ends)
    lc, scratch = _chunk_size(features, groups, num_labels, dtype, scratch=saved is None)
    stats = _stats_triton if _use_triton_reductions(features.device, dtype) else _stats_torch
    offset = 0
    for group in groups:
        o, group_lengths, pad = _group_inputs(features, lengths, ends, group, dtype)
        columns = o.shape[0]
        if saved is not None:
            region = saved[offset:offset + 2 * num_labels * columns].view(2 * num_labels, columns)
            offset += region.numel()
        for l0, l1 in _chunks(num_labels, lc):
            if saved is None:
                s, p = _halves(scratch, l1 - l0, columns)
            else:
                s, p = region[l0:l1], region[num_labels + l0:num_labels + l1]
            _scores(q, w, o, l0, l1, s, p)
            stats(_Block(s, p, group, (l0, l1), group_lengths, pad), z, lse, keep=saved is not None)
    if saved is not None:
        saved[offset:].zero_()
    return z, lse


def gemm_backward(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                  z: Tensor, lse: Tensor, saved: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dO, dQ, dW) of the GEMM-first path: per label chunk dP = g·a, dS = g·a·(p − z) [Lc, D·T]
    (recomputed from S, P, or g times the kept rows), then dO += dPᵀ·W_c + dSᵀ·Q_c,
    dW_c += dP·O, dQ_c += dS·O (vendor GEMMs)."""
    features = features.contiguous()
    batch, n, c = features.shape
    num_labels = queries.shape[0]
    dtype, acc_dtype = _gemm_dtype(features), _accumulation_dtype(features.dtype)
    q, w = queries.to(dtype), weights.to(dtype)
    grad_z, z, lse = (t.to(acc_dtype).contiguous() for t in (grad_z, z, lse))
    grad_features = features.new_empty((batch, n, c), dtype=acc_dtype)
    grad_q = queries.new_empty(queries.shape, dtype=acc_dtype)
    grad_w = torch.empty_like(grad_q)
    ends = lengths.tolist()  # one host sync per call
    groups = _groups(ends)
    lc, scratch = _chunk_size(features, groups, num_labels, dtype)
    triton = _use_triton_reductions(features.device, dtype)
    # dO accumulates in place (addmm_) when the compute dtype is the accumulator's; otherwise
    # (fp16/bf16 on CUDA) one GEMM per chunk with [W_c; Q_c] (stacked once) and one fp32 add.
    wq = None if dtype == acc_dtype else _interleaved(w, q, lc)
    offset = 0
    for index, group in enumerate(groups):
        d0, d1, tokens = group
        o, group_lengths, pad = _group_inputs(features, lengths, ends, group, dtype)
        columns = o.shape[0]
        grad_features[d0:d1, tokens:].zero_()
        grad_o = grad_features[d0:d1, :tokens]
        flat = grad_o.view(columns, c) if grad_o.is_contiguous() else grad_o.new_empty((columns, c))
        if saved is not None:
            kept = saved[offset:offset + 2 * num_labels * columns].view(2 * num_labels, columns)
            offset += kept.numel()
        for l0, l1 in _chunks(num_labels, lc):
            block = _Block(*_halves(scratch, l1 - l0, columns), group, (l0, l1), group_lengths, pad)
            if saved is None:
                _scores(q, w, o, l0, l1, block.s, block.p)
                if triton:
                    _transform_triton(block, z, lse, grad_z, grad=True)
                else:
                    _scores_to_grads_torch(block, z, lse, grad_z)
            else:
                g = block.rows(grad_z).to(dtype)
                for out, rows in zip(block.halves(), (kept[l0:l1], kept[num_labels + l0:num_labels + l1])):
                    torch.mul(rows.view(out.shape), g, out=out)
            if wq is None:  # s holds dP and p holds dS
                _add_matmul(flat, block.s.t(), w[l0:l1], first=l0 == 0)
                _add_matmul(flat, block.p.t(), q[l0:l1], first=False)
            else:
                _add_matmul(flat, _joined(block.s).t(), wq[2 * l0:2 * l1], first=l0 == 0)
            _add_matmul(grad_w[l0:l1], block.s, o, first=index == 0)
            _add_matmul(grad_q[l0:l1], block.p, o, first=index == 0)
        if flat.data_ptr() != grad_o.data_ptr():
            grad_o.copy_(flat.view(grad_o.shape))
    return grad_features.to(features.dtype), grad_q.to(queries.dtype), grad_w.to(weights.dtype)


def _saved_numel(features: Tensor, queries: Tensor) -> int:
    return 2 * queries.shape[0] * features.shape[0] * features.shape[1]


@torch.library.custom_op("marn_fast::label_attention_gemm_fwd", mutates_args=())
def _gemm_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    return gemm_forward(features, queries, weights, lengths)


@torch.library.custom_op("marn_fast::label_attention_gemm_bwd", mutates_args=())
def _gemm_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
              z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return gemm_backward(grad_z, features, queries, weights, lengths, z, lse)


@torch.library.custom_op("marn_fast::label_attention_gemm_saved_fwd", mutates_args=())
def _gemm_saved_fwd(features: Tensor, queries: Tensor, weights: Tensor,
                    lengths: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    saved = features.new_empty(_saved_numel(features, queries), dtype=_gemm_dtype(features))
    z, lse = gemm_forward(features, queries, weights, lengths, saved)
    return z, lse, saved


@torch.library.custom_op("marn_fast::label_attention_gemm_saved_bwd", mutates_args=())
def _gemm_saved_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                    z: Tensor, lse: Tensor, saved: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return gemm_backward(grad_z, features, queries, weights, lengths, z, lse, saved)


def keeps_scores(features: Tensor, queries: Tensor, weights: Tensor) -> bool:
    """Whether impl="gemm_saved" keeps the forward's scores for these inputs: autograd will need
    them and 2·L·B·n values of the compute dtype fit the saved-scores budget."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (features, queries, weights))):
        return False
    budget = SAVED_MAX_BYTES if torch.compiler.is_compiling() else _budget(
        features.device, SAVED_MAX_BYTES, SAVED_FREE_FRACTION)
    return _saved_numel(features, queries) * _itemsize(_gemm_dtype(features)) <= budget


# ---------------------------------------------------------------------------------------------
# Registration shared by both paths: fake kernels and autograd
# ---------------------------------------------------------------------------------------------
def _fake_fwd(features, queries, weights, lengths):
    z = features.new_empty((features.shape[0], queries.shape[0]), dtype=_accumulation_dtype(features.dtype))
    return z, torch.empty_like(z)


def _fake_saved_fwd(features, queries, weights, lengths):
    z, lse = _fake_fwd(features, queries, weights, lengths)
    return z, lse, features.new_empty(_saved_numel(features, queries), dtype=_gemm_dtype(features))


def _fake_bwd(grad_z, features, queries, weights, lengths, *saved):
    return torch.empty_like(features), torch.empty_like(queries), torch.empty_like(weights)


def _register(fwd_op, bwd_op, fake_fwd=_fake_fwd) -> None:
    """Forward outputs (z, lse, *kept): all are saved for the backward, only z is differentiable."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_z, *unused):
        features, queries, weights, lengths, *saved = ctx.saved_tensors
        grad_features, grad_q, grad_w = bwd_op(grad_z, features, queries, weights, lengths, *saved)
        return grad_features, grad_q, grad_w, None

    fwd_op.register_fake(fake_fwd)
    bwd_op.register_fake(_fake_bwd)
    fwd_op.register_autograd(backward, setup_context=setup_context)


_register(_triton_fwd, _triton_bwd)
_register(_chunked_fwd, _chunked_bwd)
_register(_gemm_fwd, _gemm_bwd)
_register(_gemm_saved_fwd, _gemm_saved_bwd, _fake_saved_fwd)
if cpu_extension_available():
    torch.library.register_fake("marn_fast::label_attention_forward")(_fake_fwd)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
IMPLS = ("auto", "reference", "torch", "triton", "gemm", "gemm_saved")


def available_impls(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                    lengths: Optional[Tensor] = None) -> Tuple[str, ...]:
    """The impl names that can run on these inputs now ("auto" excluded): "reference", "torch",
    "gemm" and "gemm_saved" everywhere, "triton" on CUDA (or CPU tensors under
    TRITON_INTERPRET=1) for fp16/bf16/fp32 when triton is installed."""
    names = ["reference", "torch"]
    if (triton_available() and features.dtype in TRITON_DTYPES
            and (features.is_cuda or (features.device.type == "cpu" and interpreting()))):
        names.append("triton")
    return tuple(names + ["gemm", "gemm_saved"])


def peak_bytes(impl: str, features: Tensor, queries: Tensor, train: bool, dtype: torch.dtype) -> int:
    """Estimated extra peak bytes of one call of `impl` (forward, and backward when `train`) at
    these shapes with compute dtype `dtype`, beyond the inputs: the measured dispatcher's memory
    estimate. B, n, C = features' shape, L = queries' rows, e = bytes of a value of `dtype` (of
    fp32 for fp16/bf16 where the path computes in fp32), a = 4 (8 for fp64: accumulators):
      reference   infer e·(2·B·L·n + 2·B·L·C): S and its masked copy (then A), V = A·O and W ⊙ V;
                  train e·(3·B·L·n + 3·B·L·C): A kept, the gradients dA and dS, V, dV, W ⊙ V.
                  fp16/bf16 count 4 bytes (autocast runs the softmax in fp32).
      torch       infer: on CPU fp32/fp64 with the extension the C++ kernel's S and P tiles,
                  threads·2·256·256·e; else a·(2·K + 3·B·L) with K = the score chunk
                  DOC_CHUNK·2·min(L, LABEL_CHUNK)·min(n, TOKEN_CHUNK); train adds the backward's
                  a·(3·K + B·n·C + 2·L·C) (the chunk, its products, dO, dQ, dW accumulators).
      gemm        the label chunk SP e·2·Lc·B·n (Lc from CHUNK_MAX_BYTES and CHUNK_FREE_FRACTION of
                  free memory, the documents as one group) plus O [B·n, C] in e (a copy where
                  cut at the longest document or cast); train adds the backward's chunk and
                  a·(B·n·C + 2·L·C).
      gemm_saved  "gemm", plus the kept [A; A∘(P − z)] e·2·L·B·n when training and it fits the
                  saved-scores budget (SAVED_MAX_BYTES, SAVED_FREE_FRACTION).
      triton      infer 4·2·B·L (z, lse); train adds 4·B·n·C (dO) and 4·2·splits·L·C (dQ, dW partials).
    """
    batch, n, c = features.shape
    labels = queries.shape[0]
    device = features.device
    wide = 8 if dtype == torch.float64 else 4
    item = wide if dtype in (torch.float16, torch.bfloat16) and not features.is_cuda else _itemsize(dtype)
    grads = wide * (batch * n * c + 2 * labels * c)
    if impl == "reference":
        per = 3 if train else 2
        return wide * per * batch * labels * (n + c)
    if impl == "torch":
        chunk = DOC_CHUNK * 2 * min(labels, LABEL_CHUNK) * min(n, TOKEN_CHUNK)
        if device.type == "cpu" and dtype in CPU_KERNEL_DTYPES and cpu_extension_available():
            forward = torch.get_num_threads() * 2 * 256 * 256 * item
        else:
            forward = wide * (2 * chunk + 3 * batch * labels)
        return forward + (wide * 3 * chunk + grads if train else 0)
    if impl in ("gemm", "gemm_saved"):
        columns = batch * n
        lc = _label_chunk(_budget(device, CHUNK_MAX_BYTES, CHUNK_FREE_FRACTION), columns, labels, item)
        chunk = item * 2 * lc * columns
        total = chunk + item * columns * c + (chunk + grads if train else 0)
        saved = item * 2 * labels * columns
        if impl == "gemm_saved" and train and saved <= _budget(device, SAVED_MAX_BYTES, SAVED_FREE_FRACTION):
            total += saved
        return total
    if impl == "triton":
        splits = _label_splits(device, batch, labels)
        return 4 * 2 * batch * labels + (4 * (batch * n * c + 2 * splits * labels * c) if train else 0)
    raise ValueError(f"impl: expected one of {IMPLS[1:]}, got {impl!r}")


def default_impl(features: Tensor) -> str:
    """The static choice (what MARN(backend="fused") runs, and "auto" where nothing is measured):
    "triton" on CUDA for fp16/bf16/fp32 when triton is installed, else "torch"."""
    if features.dtype not in TRITON_DTYPES:
        return "torch"
    return resolve_impl("auto", features, "label_attention")


def _measured_impl(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                   lengths: Optional[Tensor]) -> str:
    """impl="auto": the measured dispatcher's choice for this key (ops/dispatch.py)."""
    train = dispatch.grad_flows(features, queries, weights, bias)
    batch, n, c = features.shape
    inputs = (features, queries, weights, bias, lengths)
    return dispatch.choose(
        "label_attention", device=features.device, dtype=features.dtype, train=train,
        sizes={"B": batch, "n": n, "C": c, "L": queries.shape[0]}, candidates=lambda: available_impls(*inputs),
        default=default_impl(features),
        trial=lambda: dispatch.autograd_trial(lambda impl, *t: label_attention(*t, impl=impl), inputs, train),
        memory=lambda impl, dtype: peak_bytes(impl, features, queries, train, dtype))


def _resolve(impl: str, features: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"label_attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("reference", "gemm", "gemm_saved"):
        return impl
    impl = resolve_impl(impl, features, "label_attention")
    if impl == "triton" and features.dtype not in TRITON_DTYPES:
        raise ValueError(f"features: impl='triton' supports float16, bfloat16 and float32, got {features.dtype}")
    return impl


def _reference(features, queries, weights, bias, lengths, with_lse: bool):
    """impl="reference": the plain formula (queries and weights cast to the features' dtype, as
    for the other impls), logits returned in the same dtype as the other impls'."""
    queries, weights = queries.to(features.dtype), weights.to(features.dtype)
    dtype = _accumulation_dtype(features.dtype)
    logits = reference_label_attention(features, queries, weights, bias, lengths).to(dtype)
    if not with_lse:
        return logits, None
    with torch.no_grad():
        scores = torch.matmul(queries.to(dtype), features.to(dtype).transpose(1, 2))
        mask = token_mask(lengths, features.shape[1], features.device)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return logits, scores.logsumexp(2)


def _logits_and_lse(features, queries, weights, bias, lengths, impl: str, with_lse: bool):
    check_label_attention_args(features, queries, weights, bias, lengths)
    if impl == "auto":
        impl = _measured_impl(features, queries, weights, bias, lengths)
    impl = _resolve(impl, features)
    if impl == "reference":
        return _reference(features, queries, weights, bias, lengths, with_lse)
    batch, n, _ = features.shape
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=features.device)
    queries = queries.to(features.dtype)
    weights = weights.to(features.dtype)
    if impl == "gemm_saved" and keeps_scores(features, queries, weights):
        z, lse, _ = _gemm_saved_fwd(features, queries, weights, lengths)
    else:
        op = {"triton": _triton_fwd, "torch": _chunked_fwd, "gemm": _gemm_fwd, "gemm_saved": _gemm_fwd}[impl]
        z, lse = op(features, queries, weights, lengths)
    return z + bias, lse


def label_attention_with_lse(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                             lengths: Optional[Tensor] = None, *, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logits [B, L], lse [B, L]); logits are fp32 (fp64 for fp64 inputs), lse carries no gradient."""
    return _logits_and_lse(features, queries, weights, bias, lengths, impl, with_lse=True)


def label_attention(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                    lengths: Optional[Tensor] = None, *, impl: str = "auto") -> Tensor:
    """Logits [B, L] (fp32; fp64 for fp64 inputs); see the module docstring."""
    return _logits_and_lse(features, queries, weights, bias, lengths, impl, with_lse=False)[0]


def label_attention_topk(features: Tensor, queries: Tensor, labels: Tensor, k: int,
                         lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Top-k evidence tokens for chosen labels.

    features [B, n, C], queries [L, C], labels [B, K] int64 (label indices per document) or
    [K] (the same for every document), 1 ≤ k ≤ n → (indices [B, K, k] int64, weights
    [B, K, k] fp32/fp64): the tokens with the largest a_lt, largest first. Where a document has
    fewer than k tokens the trailing entries are index −1, weight 0. Only the K chosen rows of
    A are computed ([B, K, n]).
    """
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, C] float")
    batch, n, c = features.shape
    check_tensor("queries", queries, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L, C={c}] float")
    if queries.shape[1] != c:
        raise ValueError(f"queries: expected [L, C={c}] (C of features {tuple(features.shape)}), "
                         f"got shape {tuple(queries.shape)}")
    check_tensor("labels", labels, dtypes=(torch.int64,), expected="[B, K] or [K] int64")
    if labels.dim() == 1:
        labels = labels.expand(batch, -1)
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(f"labels: expected [B={batch}, K] or [K] int64, got shape {tuple(labels.shape)}")
    check_same_device(features=features, queries=queries, labels=labels, lengths=lengths)
    check_lengths(lengths, batch, n, features.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= queries.shape[0]):
        raise ValueError(f"labels: every index must lie in [0, L={queries.shape[0]}), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k: expected an int in [1, n={n}], got {k!r}")
    dtype = _accumulation_dtype(features.dtype)
    scores = torch.bmm(queries.to(dtype)[labels], features.to(dtype).transpose(1, 2))  # [B, K, n]
    valid = torch.ones(batch, n, dtype=torch.bool, device=features.device) if lengths is None else (
        torch.arange(n, device=features.device)[None, :] < lengths[:, None])
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights, indices = torch.softmax(scores, dim=2).topk(k, dim=2)
    padded = ~torch.gather(valid[:, None, :].expand_as(scores), 2, indices)
    return indices.masked_fill(padded, -1), weights.masked_fill(padded, 0.0)
