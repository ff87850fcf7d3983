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
  "auto":   "triton" on CUDA when triton is installed and the dtype is not fp64, else "torch".
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
from ._backend import interpreting, resolve_impl
from ._extension import cpu_extension_available

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


def check_label_attention_args(features, queries, weights, bias, lengths) -> None:
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
# Registration shared by both paths: fake kernels and autograd
# ---------------------------------------------------------------------------------------------
def _fake_fwd(features, queries, weights, lengths):
    z = features.new_empty((features.shape[0], queries.shape[0]), dtype=_accumulation_dtype(features.dtype))
    return z, torch.empty_like(z)


def _fake_bwd(grad_z, features, queries, weights, lengths, z, lse):
    return torch.empty_like(features), torch.empty_like(queries), torch.empty_like(weights)


def _register(fwd_op, bwd_op) -> None:
    def setup_context(ctx, inputs, output):
        z, lse = output
        ctx.save_for_backward(*inputs, z, lse)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_z, grad_lse):
        features, queries, weights, lengths, z, lse = ctx.saved_tensors
        grad_features, grad_q, grad_w = bwd_op(grad_z, features, queries, weights, lengths, z, lse)
        return grad_features, grad_q, grad_w, None

    fwd_op.register_fake(_fake_fwd)
    bwd_op.register_fake(_fake_bwd)
    fwd_op.register_autograd(backward, setup_context=setup_context)


_register(_triton_fwd, _triton_bwd)
_register(_chunked_fwd, _chunked_bwd)
if cpu_extension_available():
    torch.library.register_fake("marn_fast::label_attention_forward")(_fake_fwd)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def _resolve(impl: str, features: Tensor) -> str:
    if impl == "auto" and features.dtype not in TRITON_DTYPES:
        return "torch"
    impl = resolve_impl(impl, features, "label_attention")
    if impl == "triton" and features.dtype not in TRITON_DTYPES:
        raise ValueError(f"features: impl='triton' supports float16, bfloat16 and float32, got {features.dtype}")
    return impl


def label_attention_with_lse(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                             lengths: Optional[Tensor] = None, *, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logits [B, L], lse [B, L]); logits are fp32 (fp64 for fp64 inputs), lse carries no gradient."""
    check_label_attention_args(features, queries, weights, bias, lengths)
    impl = _resolve(impl, features)
    batch, n, _ = features.shape
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=features.device)
    queries = queries.to(features.dtype)
    weights = weights.to(features.dtype)
    op = _triton_fwd if impl == "triton" else _chunked_fwd
    z, lse = op(features, queries, weights, lengths)
    return z + bias, lse


def label_attention(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                    lengths: Optional[Tensor] = None, *, impl: str = "auto") -> Tensor:
    """Logits [B, L] (fp32; fp64 for fp64 inputs); see the module docstring."""
    return label_attention_with_lse(features, queries, weights, bias, lengths, impl=impl)[0]


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
