"""Label-wise attention logits (paper eqs. 12–15; CAML, LAAT/JointLAAT, PLM-ICD), fused: memory
linear in n + L.

features O [B, n, C] (the values), queries Q [L, d_k] (U in the paper), weights W [L, C], bias b
[L], lengths [B] int64 (tokens t ≥ lengths[b] are ignored; None = all n), keys K [B, n, d_k]
(None: K = O and d_k = C, MARN's and CAML's form; LAAT, JointLAAT and PLM-ICD pass
K = tanh(O·W_aᵀ)) → logits [B, L]:
    s_lt = q_l·k_t,  p_lt = w_l·o_t,  a_lt = softmax_t(s_lt) over t < lengths[b]
    z_l = Σ_t a_lt p_lt,  logit_l = z_l + b_l          (= w_l·Σ_t a_lt o_t + b_l)
mask=False attends over all n tokens of every document, as the official LAAT and PLM-ICD code do
(they do not mask padding): it runs as lengths = n, and lengths given with it are checked and
otherwise ignored.
Neither A [B, L, n] nor V = Aᵀ·O [B, L, C] is ever materialised: the implementations keep a
running (online) softmax or one label chunk of scores at a time, and write z and
lse = log Σ_t exp(s_lt) (fp32, or fp64 for fp64 inputs). Backward recomputes a = exp(s − lse)
(or keeps it, "gemm_saved"); with g = dz:
    ds = g·a·(p − z),  dp = g·a,  dO = dp·W (+ ds·Q when K is O),  dK = ds·Q,
    dQ = Σ_b dsᵀ·K,  dW = Σ_b dpᵀ·O,
and db = Σ_b dlogit comes from the plain `z + bias` outside the op. Without keys the registered
ops get keys=None and run exactly MARN's form (one set of loads or GEMM inputs for S and P, one dO
accumulator); their backward returns dK as an empty tensor then.

Precision (`marn_fast.ops.precision`): the op computes in `compute_dtype(features)` — the
features' dtype, or under torch.autocast the autocast dtype (bf16 GEMMs on the CPU's matrix
units or CUDA tensor cores) — with the keys, queries and weights cast to it; softmax statistics,
z, lse and the logits are fp32 (fp64 for fp64). The body runs with autocast off.

Implementations (`impl`), each family in a module of its own; this module holds the checks, the
registered ops (torch.library.custom_op + register_fake + register_autograd: they pass opcheck
and torch.compile(fullgraph=True), also under the Triton interpreter; each takes `Tensor? keys`)
and the entry points:
  "triton":     fused Triton kernels (`label_attention_triton`), ops
                `marn_fast::label_attention_fwd/_bwd`; fp16/bf16/fp32 on CUDA, or on CPU tensors
                under TRITON_INTERPRET=1.
  "torch":      memory-bounded chunks (`label_attention_chunked`), ops
                `marn_fast::label_attention_chunked_fwd/_bwd`; the forward is the C++ tile kernel
                on CPU tensors (fp32/fp64/bf16) with the extension built. Any device and dtype.
  "gemm":       GEMM-first (`label_attention_gemm`), ops `marn_fast::label_attention_gemm_fwd/_bwd`:
                vendor GEMMs, one reduction and one elementwise pass between them. Every device.
  "gemm_saved": "gemm" that keeps [A; A∘(P − z)] for the backward when it fits a budget (ops
                `marn_fast::label_attention_gemm_saved_fwd/_bwd`), else "gemm".
  "reference":  `marn_fast.reference.label_attention` (keys, queries and weights cast to the
                features' dtype, under the caller's autocast as in eager; logits returned as fp32,
                fp64 for fp64, like the other paths).
  "auto":       the measured dispatcher's choice among `available_impls` for this call's key
                (ops/dispatch.py; keyed by the compute dtype, and by d_k when keys are given); where
                nothing is measured, the static `default_impl`: "triton" on CUDA when triton is
                installed and the dtype is not fp64, else "torch".

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
from . import label_attention_chunked as chunked
from . import label_attention_gemm as gemm
from . import label_attention_triton as triton_impl
from ._backend import interpreting, resolve_impl, triton_available
from ._extension import cpu_extension_available
from .memory import budget, itemsize
from .precision import accumulation_dtype, autocast_off, compute_dtype


def check_label_attention_args(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                               lengths: Optional[Tensor], keys: Optional[Tensor] = None) -> None:
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, C] float")
    b, n, c = features.shape
    if keys is None:
        d_k, expect = c, f"[L, C={c}] (C of features {tuple(features.shape)})"
    else:
        check_tensor("keys", keys, ndim=3, dtypes=FLOAT_DTYPES, expected=f"[B={b}, n={n}, d_k] float")
        if keys.shape[:2] != features.shape[:2] or keys.shape[2] == 0:
            raise ValueError(f"keys: expected shape [B={b}, n={n}, d_k >= 1] (B and n of features "
                             f"{tuple(features.shape)}), got shape {tuple(keys.shape)}")
        d_k, expect = keys.shape[2], f"[L, d_k={keys.shape[2]}] (d_k of keys {tuple(keys.shape)})"
    check_tensor("queries", queries, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L, {d_k}] float")
    num_labels = queries.shape[0]
    if queries.shape[1] != d_k:
        raise ValueError(f"queries: expected {expect}, got shape {tuple(queries.shape)}")
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L={num_labels}, C={c}]")
    check_shape("weights", weights, (num_labels, c), "[L, C] (L of queries, C of features)")
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, expected=f"[L={num_labels}]")
    check_shape("bias", bias, (num_labels,), "[L] (L of queries)")
    if n == 0 or num_labels == 0 or c == 0:
        raise ValueError(f"features/queries: n, L and C must be >= 1, got n={n}, L={num_labels}, C={c}")
    check_same_device(features=features, keys=keys, queries=queries, weights=weights, bias=bias, lengths=lengths)
    check_lengths(lengths, b, n, features.device)


# ---------------------------------------------------------------------------------------------
# The registered ops: each implementation family's forward and backward
# ---------------------------------------------------------------------------------------------
# keys=None: K = O (MARN's form). The backward ops return (dO, dK, dQ, dW), dK empty ([0]) when
# keys is None (dO then holds both contributions).
@torch.library.custom_op("marn_fast::label_attention_fwd", mutates_args=())
def _triton_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                keys: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return triton_impl.forward(features, queries, weights, lengths, keys)


@torch.library.custom_op("marn_fast::label_attention_bwd", mutates_args=())
def _triton_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                keys: Optional[Tensor], z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return triton_impl.backward(grad_z, features, queries, weights, lengths, keys, z, lse)


@torch.library.custom_op("marn_fast::label_attention_chunked_fwd", mutates_args=())
def _chunked_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                 keys: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    with autocast_off(features.device):
        return chunked.forward(features, queries, weights, lengths, keys)


@torch.library.custom_op("marn_fast::label_attention_chunked_bwd", mutates_args=())
def _chunked_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                 keys: Optional[Tensor], z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(features.device):
        return chunked.backward(grad_z, features, queries, weights, lengths, keys, z, lse)


@torch.library.custom_op("marn_fast::label_attention_gemm_fwd", mutates_args=())
def _gemm_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
              keys: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    with autocast_off(features.device):
        return gemm.forward(features, queries, weights, lengths, keys)


@torch.library.custom_op("marn_fast::label_attention_gemm_bwd", mutates_args=())
def _gemm_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
              keys: Optional[Tensor], z: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(features.device):
        return gemm.backward(grad_z, features, queries, weights, lengths, keys, z, lse)


@torch.library.custom_op("marn_fast::label_attention_gemm_saved_fwd", mutates_args=())
def _gemm_saved_fwd(features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                    keys: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    saved = features.new_empty(gemm.saved_numel(features, queries), dtype=gemm.gemm_dtype(features))
    with autocast_off(features.device):
        z, lse = gemm.forward(features, queries, weights, lengths, keys, saved)
    return z, lse, saved


@torch.library.custom_op("marn_fast::label_attention_gemm_saved_bwd", mutates_args=())
def _gemm_saved_bwd(grad_z: Tensor, features: Tensor, queries: Tensor, weights: Tensor, lengths: Tensor,
                    keys: Optional[Tensor], z: Tensor, lse: Tensor,
                    saved: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(features.device):
        return gemm.backward(grad_z, features, queries, weights, lengths, keys, z, lse, saved)


# ---------------------------------------------------------------------------------------------
# Registration shared by both paths: fake kernels and autograd
# ---------------------------------------------------------------------------------------------
def _fake_fwd(features, queries, weights, lengths, keys=None):
    z = features.new_empty((features.shape[0], queries.shape[0]), dtype=accumulation_dtype(features.dtype))
    return z, torch.empty_like(z)


def _fake_saved_fwd(features, queries, weights, lengths, keys):
    z, lse = _fake_fwd(features, queries, weights, lengths)
    return z, lse, features.new_empty(gemm.saved_numel(features, queries), dtype=gemm.gemm_dtype(features))


def _fake_bwd(grad_z, features, queries, weights, lengths, keys, *saved):
    grad_keys = features.new_empty(0) if keys is None else torch.empty_like(keys)
    return torch.empty_like(features), grad_keys, torch.empty_like(queries), torch.empty_like(weights)


def _register(fwd_op, bwd_op, fake_fwd=_fake_fwd) -> None:
    """Forward outputs (z, lse, *kept): all are saved for the backward, only z is differentiable."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for lse and the kept scores

    def backward(ctx, grad_z, *unused):
        if grad_z is None:
            return None, None, None, None, None
        features, queries, weights, lengths, keys, *saved = ctx.saved_tensors
        grad_features, grad_keys, grad_q, grad_w = bwd_op(grad_z, features, queries, weights, lengths, keys, *saved)
        return grad_features, grad_q, grad_w, None, None if keys is None else grad_keys

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
    TRITON_INTERPRET=1) when the compute dtype is fp16/bf16/fp32 and triton is installed. The
    same with keys or without."""
    names = ["reference", "torch"]
    if (triton_available() and compute_dtype(features) in triton_impl.DTYPES
            and (features.is_cuda or (features.device.type == "cpu" and interpreting()))):
        names.append("triton")
    return tuple(names + ["gemm", "gemm_saved"])


def peak_bytes(impl: str, features: Tensor, queries: Tensor, train: bool, dtype: torch.dtype,
               keys: Optional[Tensor] = None) -> int:
    """Estimated extra peak bytes of one call of `impl` (forward, and backward when `train`) at
    these shapes with compute dtype `dtype`, beyond the inputs: the measured dispatcher's memory
    estimate. B, n, C = features' shape, L = queries' rows, e = bytes of a value of `dtype` (of
    fp32 for fp16 on the CPU, computed in fp32), a = 4 (8 for fp64: accumulators). Without keys
    (d_k = C):
      reference   infer a·(2·B·L·n + 2·B·L·C): S and its masked copy (then A), V = A·O and W ⊙ V;
                  train a·(3·B·L·n + 3·B·L·C): A kept, the gradients dA and dS, V, dV, W ⊙ V
                  (a for half dtypes too: autocast runs the softmax in fp32).
      torch       infer: on the CPU with the extension (fp32/fp64/bf16) the C++ kernel's S and P
                  tiles, threads·2·256·256·e; else 2·K·a + 3·B·L·a with K = the score chunk
                  DOC_CHUNK·2·min(L, LABEL_CHUNK)·min(n, TOKEN_CHUNK); train adds the backward's
                  a·(3·K + B·n·C + 2·L·C) (the chunk, its products, dO, dQ, dW accumulators).
      gemm        the label chunk SP e·2·Lc·B·n (Lc from CHUNK_MAX_BYTES and CHUNK_FREE_FRACTION of
                  free memory, the documents as one group) plus O [B·n, C] in e (a copy where
                  cut at the longest document or cast); train adds the backward's chunk and
                  a·(B·n·C + 2·L·C).
      gemm_saved  "gemm", plus the kept [A; A∘(P − z)] e·2·L·B·n when training and it fits the
                  saved-scores budget (SAVED_MAX_BYTES, SAVED_FREE_FRACTION).
      triton      infer 4·2·B·L (z, lse); train adds 4·B·n·C (dO) and 4·2·splits·L·C (dQ, dW partials).
    With keys K [B, n, d_k]: dQ (and its Triton partials) is L·d_k instead of L·C, training adds dK
    (a·B·n·d_k; 4·B·n·d_k for triton), "gemm" its K columns e·B·n·d_k, and the PyTorch chunks
    one more score chunk a·K (S and P are two GEMMs, then joined).
    """
    batch, n, c = features.shape
    labels = queries.shape[0]
    device = features.device
    wide = 8 if dtype == torch.float64 else 4
    item = 4 if dtype == torch.float16 and not features.is_cuda else itemsize(dtype)
    d_k = c if keys is None else keys.shape[2]
    grads = wide * (batch * n * c + labels * (c + d_k) + (0 if keys is None else batch * n * d_k))
    if impl == "reference":
        return wide * (3 if train else 2) * batch * labels * (n + c)
    if impl == "torch":
        block = chunked.DOC_CHUNK * 2 * min(labels, chunked.LABEL_CHUNK) * min(n, chunked.TOKEN_CHUNK)
        if device.type == "cpu" and dtype in chunked.CPU_KERNEL_DTYPES and cpu_extension_available():
            forward = torch.get_num_threads() * 2 * 256 * 256 * item
        else:
            forward = wide * ((2 if keys is None else 3) * block + 3 * batch * labels)
        return forward + (wide * 3 * block + grads if train else 0)
    if impl in ("gemm", "gemm_saved"):
        columns = batch * n
        lc = gemm._label_chunk(budget(device, gemm.CHUNK_MAX_BYTES, gemm.CHUNK_FREE_FRACTION), columns, labels, item)
        chunk = item * 2 * lc * columns
        total = chunk + item * columns * (c if keys is None else c + d_k) + (chunk + grads if train else 0)
        saved = item * 2 * labels * columns
        if impl == "gemm_saved" and train and saved <= budget(device, gemm.SAVED_MAX_BYTES, gemm.SAVED_FREE_FRACTION):
            total += saved
        return total
    if impl == "triton":
        splits = triton_impl.label_splits(device, batch, labels)
        keyed = 0 if keys is None else batch * n * d_k  # dK
        return 4 * 2 * batch * labels + (4 * (batch * n * c + keyed + splits * labels * (c + d_k)) if train else 0)
    raise ValueError(f"impl: expected one of {IMPLS[1:]}, got {impl!r}")


def default_impl(features: Tensor) -> str:
    """The static choice (what MARN(backend="fused") runs, and "auto" where nothing is measured):
    "triton" on CUDA for fp16/bf16/fp32 compute when triton is installed, else "torch"."""
    if compute_dtype(features) not in triton_impl.DTYPES:
        return "torch"
    return resolve_impl("auto", features, "label_attention")


def _measured_impl(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                   lengths: Optional[Tensor], keys: Optional[Tensor]) -> str:
    """impl="auto": the measured dispatcher's choice for this key (ops/dispatch.py), keyed by the
    compute dtype (bf16 under bf16 autocast) and, for keyed calls only, by d_k (MARN's keys stay
    as they were)."""
    train = dispatch.grad_flows(features, queries, weights, bias, keys)
    batch, n, c = features.shape
    sizes = {"B": batch, "n": n, "C": c, "L": queries.shape[0]}
    if keys is not None:
        sizes["d_k"] = keys.shape[2]
    inputs = (features, queries, weights, bias, lengths, keys)
    return dispatch.choose(
        "label_attention", device=features.device, dtype=compute_dtype(features), train=train,
        sizes=sizes, candidates=lambda: available_impls(*inputs[:5]), default=default_impl(features),
        trial=lambda: dispatch.autograd_trial(lambda impl, *t: label_attention(*t[:5], keys=t[5], impl=impl),
                                              inputs, train),
        memory=lambda impl, dtype: peak_bytes(impl, features, queries, train, dtype, keys))


def _resolve(impl: str, features: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"label_attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("reference", "gemm", "gemm_saved"):
        return impl
    impl = resolve_impl(impl, features, "label_attention")
    if impl == "triton" and compute_dtype(features) not in triton_impl.DTYPES:
        raise ValueError(f"features: impl='triton' supports float16, bfloat16 and float32, got "
                         f"{compute_dtype(features)}")
    return impl


def _reference(features, queries, weights, bias, lengths, keys, with_lse: bool):
    """impl="reference": the plain formula (keys, queries and weights cast to the features' dtype,
    as for the other impls; under the caller's autocast, as in eager), logits returned in the same
    dtype as the other impls'."""
    queries, weights = queries.to(features.dtype), weights.to(features.dtype)
    keys = None if keys is None else keys.to(features.dtype)
    dtype = accumulation_dtype(features.dtype)
    logits = reference_label_attention(features, queries, weights, bias, lengths, keys=keys).to(dtype)
    if not with_lse:
        return logits, None
    with torch.no_grad():
        k = features if keys is None else keys
        scores = torch.matmul(queries.to(dtype), k.to(dtype).transpose(1, 2))
        mask = token_mask(lengths, features.shape[1], features.device)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return logits, scores.logsumexp(2).to(dtype)


def _check_mask(mask) -> None:
    if not isinstance(mask, bool):
        raise ValueError(f"mask: expected a bool (True: attend to t < lengths[b]; False: to all n tokens), "
                         f"got {mask!r}")


def _logits_and_lse(features, queries, weights, bias, lengths, keys, mask, impl: str, with_lse: bool):
    check_label_attention_args(features, queries, weights, bias, lengths, keys)
    _check_mask(mask)
    if not mask:
        lengths = None  # every document attends over all n tokens
    if keys is features:
        keys = None  # K = O: MARN's form, one set of GEMM inputs
    if impl == "auto":
        impl = _measured_impl(features, queries, weights, bias, lengths, keys)
    impl = _resolve(impl, features)
    if impl == "reference":
        return _reference(features, queries, weights, bias, lengths, keys, with_lse)
    batch, n, _ = features.shape
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=features.device)
    dtype = compute_dtype(features)
    features, queries, weights = features.to(dtype), queries.to(dtype), weights.to(dtype)
    if keys is not None:
        keys = keys.to(dtype)
    if impl == "gemm_saved" and gemm.keeps_scores(features, queries, weights, keys):
        z, lse, _ = _gemm_saved_fwd(features, queries, weights, lengths, keys)
    else:
        op = {"triton": _triton_fwd, "torch": _chunked_fwd, "gemm": _gemm_fwd, "gemm_saved": _gemm_fwd}[impl]
        z, lse = op(features, queries, weights, lengths, keys)
    return z + bias, lse


def label_attention_with_lse(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                             lengths: Optional[Tensor] = None, *, keys: Optional[Tensor] = None, mask: bool = True,
                             impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logits [B, L], lse [B, L]); logits are fp32 (fp64 for fp64 inputs), lse carries no
    gradient. keys [B, n, d_k] (None: the features) and mask as for `label_attention`."""
    return _logits_and_lse(features, queries, weights, bias, lengths, keys, mask, impl, with_lse=True)


def label_attention(features: Tensor, queries: Tensor, weights: Tensor, bias: Tensor,
                    lengths: Optional[Tensor] = None, *, keys: Optional[Tensor] = None, mask: bool = True,
                    impl: str = "auto") -> Tensor:
    """Logits [B, L] (fp32; fp64 for fp64 inputs); see the module docstring.

    features O [B, n, C], queries Q [L, d_k], weights W [L, C], bias [L], lengths [B] int64 or
    None, keys K [B, n, d_k] or None (K = O, d_k = C); mask=False attends over all n tokens (the
    lengths, if given, are checked and then ignored)."""
    return _logits_and_lse(features, queries, weights, bias, lengths, keys, mask, impl, with_lse=False)[0]


def label_attention_topk(features: Tensor, queries: Tensor, labels: Tensor, k: int,
                         lengths: Optional[Tensor] = None, *, keys: Optional[Tensor] = None,
                         mask: bool = True) -> Tuple[Tensor, Tensor]:
    """Top-k evidence tokens for chosen labels.

    features [B, n, C], queries [L, d_k], labels [B, K] int64 (label indices per document) or
    [K] (the same for every document), 1 ≤ k ≤ n, keys [B, n, d_k] or None (the features; A
    depends on the keys and queries only) → (indices [B, K, k] int64, weights [B, K, k]
    fp32/fp64): the tokens with the largest a_lt, largest first. Where a document has fewer than k
    valid tokens the trailing entries are index −1, weight 0; mask=False attends over all n tokens
    (the lengths, if given, are checked and ignored). Only the K chosen rows of A are computed
    ([B, K, n]), in fp32 (fp64 for fp64 keys).
    """
    check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES, expected="[B, n, C] float")
    batch, n, c = features.shape
    if keys is not None:
        check_tensor("keys", keys, ndim=3, dtypes=FLOAT_DTYPES, expected=f"[B={batch}, n={n}, d_k] float")
        if keys.shape[:2] != features.shape[:2]:
            raise ValueError(f"keys: expected shape [B={batch}, n={n}, d_k] (B and n of features "
                             f"{tuple(features.shape)}), got shape {tuple(keys.shape)}")
    k_all = features if keys is None else keys
    d_k, source = k_all.shape[2], "C of features" if keys is None else "d_k of keys"
    check_tensor("queries", queries, ndim=2, dtypes=FLOAT_DTYPES, expected=f"[L, {d_k}] float")
    if queries.shape[1] != d_k:
        raise ValueError(f"queries: expected [L, {d_k}] ({source} {tuple(k_all.shape)}), "
                         f"got shape {tuple(queries.shape)}")
    check_tensor("labels", labels, dtypes=(torch.int64,), expected="[B, K] or [K] int64")
    if labels.dim() == 1:
        labels = labels.expand(batch, -1)
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(f"labels: expected [B={batch}, K] or [K] int64, got shape {tuple(labels.shape)}")
    check_same_device(features=features, keys=keys, queries=queries, labels=labels, lengths=lengths)
    check_lengths(lengths, batch, n, features.device)
    _check_mask(mask)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= queries.shape[0]):
        raise ValueError(f"labels: every index must lie in [0, L={queries.shape[0]}), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k: expected an int in [1, n={n}], got {k!r}")
    dtype = accumulation_dtype(k_all.dtype)
    scores = torch.bmm(queries.to(dtype)[labels], k_all.to(dtype).transpose(1, 2))  # [B, K, n]
    valid = torch.ones(batch, n, dtype=torch.bool, device=features.device) if lengths is None or not mask else (
        torch.arange(n, device=features.device)[None, :] < lengths[:, None])
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights, indices = torch.softmax(scores, dim=2).topk(k, dim=2)
    padded = ~torch.gather(valid[:, None, :].expand_as(scores), 2, indices)
    return indices.masked_fill(padded, -1), weights.masked_fill(padded, 0.0)
