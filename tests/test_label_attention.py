"""Fused label-wise attention against the plain-PyTorch reference (computed in float64).

Every impl of `available_impls(...)` is forced in turn: "reference", "torch" (the path that
impl="auto" runs on CPU tensors: the C++ forward for fp32/fp64 when the extension is built, else
PyTorch chunks; the backward in PyTorch chunks), "triton" (Triton kernels; on the CPU through
TRITON_INTERPRET=1, set by conftest.py), "gemm" and "gemm_saved" (vendor GEMMs; their reduction
and elementwise pass as Triton kernels where those run, and also forced onto their PyTorch twin:
the variants "gemm/torch-ops" and "gemm_saved/torch-ops"). The C++ forward and the
PyTorch-chunk forward are also tested on their own. Every impl also runs with keys K [B, n, d_k]
separate from the values (LAAT's and PLM-ICD's form, d_k ≠ C: five gradients) and with mask=False
(the "keyed" tests).
Tolerances are stated per dtype in TOL and are relative to the largest reference value:
|actual − expected| ≤ tol · max(1, max|expected|); `tolerance()` states the exceptions.
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from marn_fast.ops._extension import cpu_extension_available
from marn_fast.ops.label_attention import (
    available_impls,
    label_attention,
    label_attention_topk,
    label_attention_with_lse,
)
from marn_fast.reference.label_attention import label_attention as reference_label_attention
from marn_fast.reference.label_attention import topk_evidence

la_module = importlib.import_module("marn_fast.ops.label_attention")
gemm_module = importlib.import_module("marn_fast.ops.label_attention_gemm")
chunked_module = importlib.import_module("marn_fast.ops.label_attention_chunked")
triton_module = importlib.import_module("marn_fast.ops.label_attention_triton")
memory_module = importlib.import_module("marn_fast.ops.memory")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["reference", "torch", "triton", "gemm", "gemm_saved", "gemm/torch-ops", "gemm_saved/torch-ops",
         "gemm/cpp", "gemm_saved/cpp"]
GEMM_IMPLS = ["gemm", "gemm_saved", "gemm/torch-ops", "gemm_saved/torch-ops", "gemm/cpp", "gemm_saved/cpp"]
# fp32: every path accumulates in fp32 (IEEE dots on GPU) — errors observed <= 5e-6 relative.
# fp16: S and P are exact fp32 sums of fp16 products, but ds/dp enter the backward GEMMs as fp16
#       in the Triton path and gradients are returned in fp16 — errors observed <= 5e-4 relative.
# bf16: 8-bit mantissa, ~8× the fp16 error; where S itself is rounded to bf16 see tolerance().
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 4e-2, torch.float64: 1e-10}
PAD_VALUE = 1e4  # written into padded token positions: must not change logits or gradients


def rounds_scores(impl: str, dtype: torch.dtype) -> bool:
    """Whether `impl` rounds S to the half dtype before the softmax (its GEMMs run in that dtype,
    as the eager reference's): "torch" and the gemm impls in bf16 on every device and in fp16 on
    CUDA (fp16 on the CPU computes in fp32); "triton" keeps S in fp32."""
    base = impl.partition("/")[0]
    if base not in ("torch", "gemm", "gemm_saved"):
        return False
    return dtype == torch.bfloat16 or (dtype == torch.float16 and DEVICE == "cuda")


def tolerance(impl: str, dtype: torch.dtype, max_score: float = 4.0) -> float:
    """TOL[dtype], except where S is rounded to a half dtype before the softmax (`rounds_scores`).
    There each a_lt carries a relative error up to about max|s|·ε of the dtype, and so does the
    result (observed on the CPU with half scores at max|s| = 4: <= 8e-4 fp16, <= 7.3e-3 bf16, a
    quarter of max|s|·ε or less)."""
    if rounds_scores(impl, dtype):
        return max(TOL[dtype], max_score * torch.finfo(dtype).eps)
    return TOL[dtype]


@contextlib.contextmanager
def forced(variant: str, features, queries, weights, bias, lengths):
    """The impl name of a test variant, skipping when `available_impls` lacks it; "<impl>/torch-ops"
    and "<impl>/cpp" make the gemm impls use their PyTorch twin or the C++ kernels for the
    reduction and the elementwise pass (instead of Triton under the interpreter or on CUDA)."""
    impl, _, twin = variant.partition("/")
    if impl != "auto" and impl not in available_impls(features, queries, weights, bias, lengths):
        pytest.skip(f"impl {impl!r} not available for {features.dtype} on {features.device}")
    if impl == "reference" and features.dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the eager reference in half precision is the baseline, not a fused path")
    with pytest.MonkeyPatch.context() as patch:
        if twin == "cpp" and (features.device.type != "cpu" or not cpu_extension_available()):
            pytest.skip("the C++ reductions need CPU tensors and the compiled extension")
        if twin in ("torch-ops", "cpp"):
            which = "torch" if twin == "torch-ops" else "cpp"
            patch.setattr(gemm_module, "reductions", lambda device, dtype: which)
        yield impl


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} × {scale:.3g}"


def _lengths(batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct lengths where possible, always including n and (for B ≥ 2) 1."""
    values = (torch.randperm(n, generator=generator)[:batch] + 1).tolist()
    values += [int(torch.randint(1, n + 1, (1,), generator=generator))] * (batch - len(values))
    values[0] = n
    if batch >= 2:
        values[1] = 1
    return torch.tensor(values, dtype=torch.int64)


def make_inputs(batch, n, c, num_labels, dtype, seed, score_scale=None):
    """Fresh random (features, queries, weights, bias, lengths) on DEVICE in `dtype`; padded
    positions of features hold PAD_VALUE. score_scale rescales Q so that max |q·o| = score_scale."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    queries = torch.randn(num_labels, c, generator=g, dtype=torch.float64) / c ** 0.5
    weights = torch.randn(num_labels, c, generator=g, dtype=torch.float64)
    bias = torch.randn(num_labels, generator=g, dtype=torch.float64)
    lengths = _lengths(batch, n, g)
    if score_scale is not None:
        queries *= score_scale / torch.einsum("lc,btc->blt", queries, features).abs().max()
    pad = torch.arange(n)[None, :] >= lengths[:, None]
    features[pad] = PAD_VALUE
    return tuple(t.to(DEVICE, dtype) for t in (features, queries, weights, bias)) + (lengths.to(DEVICE),)


def make_keyed_inputs(batch, n, c, d_k, num_labels, dtype, seed, mask=True, score_scale=None):
    """Fresh random (features, queries [L, d_k], weights, bias, lengths, keys [B, n, d_k]) on DEVICE
    in `dtype`, the keys independent of the features. With mask, padded positions of the features
    and the keys hold PAD_VALUE (they must change nothing); without, every token is attended and
    holds random values. score_scale rescales Q so that max |q·k| over attended tokens = score_scale."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    keys = torch.randn(batch, n, d_k, generator=g, dtype=torch.float64)
    queries = torch.randn(num_labels, d_k, generator=g, dtype=torch.float64) / d_k ** 0.5
    weights = torch.randn(num_labels, c, generator=g, dtype=torch.float64)
    bias = torch.randn(num_labels, generator=g, dtype=torch.float64)
    lengths = _lengths(batch, n, g)
    pad = torch.arange(n)[None, :] >= lengths[:, None]
    if score_scale is not None:
        scores = torch.einsum("ld,btd->blt", queries, keys)
        if mask:
            scores = scores.masked_fill(pad[:, None, :], 0.0)
        queries *= score_scale / scores.abs().max()
    if mask:
        features[pad], keys[pad] = PAD_VALUE, PAD_VALUE
    inputs = tuple(t.to(DEVICE, dtype) for t in (features, queries, weights, bias))
    return inputs + (lengths.to(DEVICE), keys.to(DEVICE, dtype))


GRAD_NAMES = ("dO", "dQ", "dW", "db", "dK")


def reference_with_grads(features, queries, weights, bias, lengths, grad, keys=None, mask=True):
    """Reference logits and (dO, dQ, dW, db[, dK]) in float64 from the (already rounded) inputs."""
    tensors = (features, queries, weights, bias) + (() if keys is None else (keys,))
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = reference_label_attention(*leaves[:4], lengths, keys=None if keys is None else leaves[4], mask=mask)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def run_and_compare(variant, features, queries, weights, bias, lengths, grad, tol, grad_fn=None, keys=None,
                    mask=True):
    """Logits and (dO, dQ, dW, db[, dK]) of one impl variant against the float64 reference."""
    tensors = (features, queries, weights, bias) + (() if keys is None else (keys,))
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with forced(variant, features, queries, weights, bias, lengths) as impl:
        out = label_attention(*leaves[:4], lengths, keys=None if keys is None else leaves[4], mask=mask, impl=impl)
        assert out.dtype == (torch.float64 if features.dtype == torch.float64 else torch.float32)
        (out.backward(grad) if grad_fn is None else grad_fn(out).backward())
    expected, expected_grads = reference_with_grads(features, queries, weights, bias, lengths, grad, keys, mask)
    _assert_close(out, expected, tol, f"{variant} logits")
    for name, leaf, ref_grad in zip(GRAD_NAMES, leaves, expected_grads):
        assert leaf.grad.dtype == leaf.dtype, f"{name} dtype {leaf.grad.dtype} != {leaf.dtype}"
        _assert_close(leaf.grad, ref_grad, tol, f"{variant} {name}")
    return leaves


SHAPES = [(3, 37, 20, 45), (2, 1, 7, 3), (3, 50, 33, 1), (1, 70, 40, 66)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-C{}-L{}".format(*s))
def test_matches_reference_weighted_grad(impl, dtype, shape):
    batch, n, c, num_labels = shape
    inputs = make_inputs(batch, n, c, num_labels, dtype, seed=hash(shape) % 1000)
    grad = torch.randn(batch, num_labels, device=DEVICE)
    leaves = run_and_compare(impl, *inputs, grad, tolerance(impl, dtype))
    # Padded positions (filled with PAD_VALUE) get exactly zero gradient.
    pad = torch.arange(n, device=DEVICE)[None, :] >= inputs[4][:, None]
    assert torch.all(leaves[0].grad[pad] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_scores(impl, dtype):
    """Scores up to ±80: exp would overflow without the running max."""
    inputs = make_inputs(3, 45, 24, 40, dtype, seed=7, score_scale=80.0)
    grad = torch.randn(3, 40, device=DEVICE)
    run_and_compare(impl, *inputs, grad, tolerance(impl, dtype, max_score=80.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_of_sum_and_of_transposed_view(impl):
    """Gradients arrive expanded (stride 0, from .sum()) or transposed: both must be read right."""
    inputs = make_inputs(3, 37, 20, 45, torch.float32, seed=3)
    ones = torch.ones(3, 45, device=DEVICE)
    run_and_compare(impl, *inputs, ones, TOL[torch.float32], grad_fn=lambda out: out.sum())
    grad_t = torch.randn(45, 3, device=DEVICE)
    run_and_compare(impl, *inputs, grad_t.t(), TOL[torch.float32])
    run_and_compare(impl, *inputs, grad_t.t(), TOL[torch.float32], grad_fn=lambda out: (out.t() * grad_t).sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    features, queries, weights, bias, lengths = make_inputs(3, 37, 20, 45, torch.float32, seed=4)
    features_nc = features.transpose(1, 2).contiguous().transpose(1, 2)  # strides (n·C, 1, n)
    queries_nc = torch.cat([queries, queries], dim=1)[:, :20]  # row stride 2C
    weights_nc = weights.t().contiguous().t()
    bias_nc = torch.stack([bias, bias], dim=1)[:, 0]  # stride 2
    assert not any(t.is_contiguous() for t in (features_nc, queries_nc, weights_nc, bias_nc))
    grad = torch.randn(3, 45, device=DEVICE)
    run_and_compare(impl, features_nc, queries_nc, weights_nc, bias_nc, lengths, grad, TOL[torch.float32])


@pytest.mark.parametrize("variant", IMPLS)
def test_lengths_none_means_full(variant):
    features, queries, weights, bias, _ = make_inputs(2, 19, 9, 21, torch.float32, seed=5)
    features = torch.randn_like(features)  # no padding
    full = torch.full((2,), 19, dtype=torch.int64, device=DEVICE)
    with forced(variant, features, queries, weights, bias, full) as impl:
        torch.testing.assert_close(label_attention(features, queries, weights, bias, impl=impl),
                                   label_attention(features, queries, weights, bias, full, impl=impl),
                                   rtol=0, atol=0)  # same op, same inputs: bit-identical


@pytest.mark.parametrize("variant", IMPLS)
def test_lse_is_logsumexp_of_valid_scores(variant):
    features, queries, weights, bias, lengths = make_inputs(3, 37, 20, 45, torch.float32, seed=16, score_scale=60.0)
    leaves = [t.requires_grad_() for t in (features, queries, weights, bias)]
    with forced(variant, features, queries, weights, bias, lengths) as impl:
        _, lse = label_attention_with_lse(*leaves, lengths, impl=impl)
    scores = torch.einsum("lc,btc->blt", queries.detach().double(), features.detach().double())
    scores = scores.masked_fill(torch.arange(37, device=DEVICE)[None, None, :] >= lengths[:, None, None], float("-inf"))
    _assert_close(lse, torch.logsumexp(scores, dim=2), TOL[torch.float32], f"{variant} lse")
    assert not lse.requires_grad


def test_auto_picks_chunked_path_on_cpu_and_float64():
    """impl='auto' on CPU (or for fp64 anywhere) is the chunked path: exact float64 parity."""
    inputs = make_inputs(3, 37, 20, 45, torch.float64, seed=6)
    grad = torch.randn(3, 45, device=DEVICE, dtype=torch.float64)
    run_and_compare("auto", *inputs, grad, TOL[torch.float64])


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 6), n=st.integers(1, 40), c=st.integers(1, 24), num_labels=st.integers(1, 40),
       impl=st.sampled_from(IMPLS), seed=st.integers(0, 2 ** 16))
def test_property_small_shapes(batch, n, c, num_labels, impl, seed):
    inputs = make_inputs(batch, n, c, num_labels, torch.float32, seed=seed)
    assume(impl.partition("/")[0] in available_impls(*inputs))
    grad = torch.randn(batch, num_labels, device=DEVICE, generator=None)
    run_and_compare(impl, *inputs, grad, TOL[torch.float32])


def test_triton_backward_with_document_splits(monkeypatch):
    """The dQ/dW kernel split over document groups (as on a GPU with few label tiles): three
    documents in two groups, partial sums added by the caller."""
    monkeypatch.setattr(triton_module, "label_splits", lambda device, batch, num_labels: 2)
    inputs = make_inputs(3, 37, 20, 45, torch.float32, seed=15)
    grad = torch.randn(3, 45, device=DEVICE)
    run_and_compare("triton", *inputs, grad, TOL[torch.float32])


# --- the chunked PyTorch path: chunking exercised, working set bounded -----------------------

def _pytorch_chunks_only(monkeypatch):
    """The "torch" path's forward through the PyTorch chunks even where the C++ kernel applies."""
    monkeypatch.setattr(chunked_module, "cpu_kernel_applies", lambda features: False)


def test_chunked_path_with_small_chunks(monkeypatch):
    """Chunks of 2 documents × 4 labels × 8 tokens: many label chunks, several token chunks per
    document (online softmax across token chunks, some fully padded), partial last chunks."""
    _pytorch_chunks_only(monkeypatch)
    monkeypatch.setattr(chunked_module, "DOC_CHUNK", 2)
    monkeypatch.setattr(chunked_module, "LABEL_CHUNK", 4)
    monkeypatch.setattr(chunked_module, "TOKEN_CHUNK", 8)
    inputs = make_inputs(3, 37, 20, 45, torch.float64, seed=8, score_scale=40.0)
    grad = torch.randn(3, 45, device=DEVICE, dtype=torch.float64)
    run_and_compare("torch", *inputs, grad, TOL[torch.float64])


def _allocations(fn):
    """(largest single allocation, peak of live allocations) in bytes during fn(), from the
    profiler's memory events (CPU allocator)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return max(size for _, size in events), peak


@pytest.mark.skipif(DEVICE != "cpu", reason="tracks the CPU allocator")
def test_chunked_path_working_set_is_bounded(monkeypatch):
    """No intermediate of n·L elements in forward or backward: the largest allocation is at most
    the score chunk [DOC_CHUNK, 2·LABEL_CHUNK, TOKEN_CHUNK] or an input-sized buffer (dO
    [B, n, C], dQ [L, C]), while the reference allocates [B, L, n] (checked too, so this
    test can fail)."""
    _pytorch_chunks_only(monkeypatch)
    doc_chunk, label_chunk, token_chunk = 2, 16, 64
    monkeypatch.setattr(chunked_module, "DOC_CHUNK", doc_chunk)
    monkeypatch.setattr(chunked_module, "LABEL_CHUNK", label_chunk)
    monkeypatch.setattr(chunked_module, "TOKEN_CHUNK", token_chunk)
    batch, n, c, num_labels = 3, 300, 8, 400
    features, queries, weights, bias, lengths = make_inputs(batch, n, c, num_labels, torch.float32, seed=9)
    leaves = [t.requires_grad_() for t in (features, queries, weights, bias)]

    largest, peak = _allocations(lambda: label_attention(*leaves, lengths, impl="torch").sum().backward())
    bound = 4 * max(doc_chunk * 2 * label_chunk * token_chunk, batch * n * c, num_labels * c, batch * num_labels)
    assert largest <= bound, f"largest allocation {largest} B > bound {bound} B"
    assert peak <= 8 * bound, f"peak live allocations {peak} B > {8 * bound} B"
    assert peak < 4 * n * num_labels

    ref_largest, ref_peak = _allocations(lambda: reference_label_attention(*leaves, lengths).sum().backward())
    assert ref_largest >= 4 * batch * n * num_labels and ref_peak > 10 * peak


# --- the C++ CPU forward (torch.ops.marn_fast.label_attention_forward) ---------------------
# It tiles 256 labels × 256 tokens: the shapes below cross both tile edges (255, 256, 257, 513).
needs_cpu_kernel = pytest.mark.skipif(DEVICE != "cpu" or not cpu_extension_available(),
                                      reason="the C++ CPU kernel (marn_fast._C)")


def _reference_z_lse(features, queries, weights, lengths, keys=None):
    """(z, lse) in float64 from the plain-PyTorch reference: z = logits − bias (keys None: K = O)."""
    f, q, w = (t.double() for t in (features, queries, weights))
    k = f if keys is None else keys.double()
    z = reference_label_attention(f, q, w, torch.zeros(q.shape[0], dtype=torch.float64), lengths,
                                  keys=None if keys is None else k)
    scores = torch.einsum("ld,btd->blt", q, k)
    valid = torch.arange(f.shape[1])[None, None, :] < lengths[:, None, None]
    return z, scores.masked_fill(~valid, float("-inf")).logsumexp(2)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 513, 24, 257), (2, 256, 9, 511), (4, 255, 17, 256), (1, 1, 3, 1)],
                         ids=lambda s: "B{}-n{}-C{}-L{}".format(*s))
def test_cpu_kernel_matches_reference(dtype, shape):
    """z and lse of the C++ kernel and of the PyTorch chunks against the float64 reference, every
    document a different length, padded tokens holding PAD_VALUE, scores up to ±80."""
    features, queries, weights, _, lengths = make_inputs(*shape, dtype, seed=sum(shape), score_scale=80.0)
    expected_z, expected_lse = _reference_z_lse(features, queries, weights, lengths)
    z, lse = torch.ops.marn_fast.label_attention_forward(features, queries, weights, lengths)
    assert z.dtype == lse.dtype == dtype
    _assert_close(z, expected_z, TOL[dtype], "C++ z")
    _assert_close(lse, expected_lse, TOL[dtype], "C++ lse")
    z_chunks, lse_chunks = chunked_module.forward_torch(features, queries, weights, lengths)
    _assert_close(z_chunks, expected_z, TOL[dtype], "PyTorch chunks z")
    _assert_close(lse_chunks, expected_lse, TOL[dtype], "PyTorch chunks lse")


BF16_SCORE = 4.0  # max |s| of the bf16 tests: S rounded to bf16 costs up to max|s|·ε relative


@needs_cpu_kernel
@pytest.mark.parametrize("shape", [(3, 513, 24, 257), (2, 256, 9, 511), (1, 1, 3, 1)],
                         ids=lambda s: "B{}-n{}-C{}-L{}".format(*s))
def test_cpu_kernel_bf16(shape):
    """bf16 features: bf16 tile GEMMs (scores rounded to bf16, as the eager reference's), fp32
    statistics and outputs; against the float64 reference of the same bf16 values, tolerance
    max|s|·ε(bf16) (module TOL's rationale)."""
    features, queries, weights, _, lengths = make_inputs(*shape, torch.bfloat16, seed=sum(shape),
                                                         score_scale=BF16_SCORE)
    expected_z, expected_lse = _reference_z_lse(features, queries, weights, lengths)
    z, lse = torch.ops.marn_fast.label_attention_forward(features, queries, weights, lengths)
    assert z.dtype == lse.dtype == torch.float32
    tol = BF16_SCORE * torch.finfo(torch.bfloat16).eps
    _assert_close(z, expected_z, tol, "C++ bf16 z")
    _assert_close(lse, expected_lse, tol, "C++ bf16 lse")


def _block(dtype, labels, lengths, tokens, seed):
    """Random s, p [labels, D·T] in dtype (padded tokens hold PAD_VALUE) and the group's lengths."""
    g = torch.Generator().manual_seed(seed)
    docs = len(lengths)
    s = (3 * torch.randn(labels, docs * tokens, generator=g, dtype=torch.float64)).to(dtype)
    p = torch.randn(labels, docs * tokens, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    pad = (torch.arange(tokens)[None, :] >= lengths[:, None]).reshape(-1)
    s[:, pad], p[:, pad] = PAD_VALUE, PAD_VALUE
    return s, p, lengths


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep", [False, True])
def test_cpp_block_passes(dtype, keep):
    """The C++ reduction and elementwise pass of the GEMM-first path against the PyTorch twins run
    in float64 on the same values, on a block with a strided row layout (a column slice, as a
    group's block is), 3 documents of uneven lengths (17 = one lane block + 1, 1, and 40 = the
    full width), padded tokens holding PAD_VALUE. The C++ passes compute in fp32 (fp64): z and
    lse within 1e-5 (1e-12); the in-place results are rounded to the block's dtype on store
    (bf16: within ε relative)."""
    labels, tokens = 5, 40
    s, p, lengths = _block(dtype, labels, [17, 1, 40], tokens, seed=31)
    pad = torch.arange(tokens)[None, :] >= lengths[:, None]
    wide_s, wide_p = (torch.cat([t, t[:, :7]], dim=1) for t in (s, p))  # row stride 3·40 + 7
    block_s, block_p = wide_s[:, :3 * tokens], wide_p[:, :3 * tokens]
    twin = gemm_module._Block(s.double().clone(), p.double().clone(), (0, 3, tokens), (0, labels), lengths, pad)
    z, lse = torch.empty(3, labels, dtype=torch.float64), torch.empty(3, labels, dtype=torch.float64)
    gemm_module._stats_torch(twin, z, lse, keep)
    cz, clse = torch.ops.marn_fast.label_attention_block_stats(block_s, block_p, lengths, keep)
    assert cz.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    stored = torch.finfo(dtype).eps if dtype == torch.bfloat16 else tol
    _assert_close(cz, z, tol, "z")
    _assert_close(clse, lse, tol, "lse")
    if keep:
        _assert_close(block_s, twin.s, stored, "A")
        _assert_close(block_p, twin.p, stored, "A∘(P − z)")
    assert torch.equal(wide_s[:, 3 * tokens:], s[:, :7]) and torch.equal(wide_p[:, 3 * tokens:], p[:, :7])
    grad_z = torch.randn(3, labels, dtype=torch.float64)
    s2, p2, _ = _block(dtype, labels, [17, 1, 40], tokens, seed=31)
    twin = gemm_module._Block(s2.double().clone(), p2.double().clone(), (0, 3, tokens), (0, labels), lengths, pad)
    gemm_module._scores_to_grads_torch(twin, z, lse, grad_z)
    acc = cz.dtype
    torch.ops.marn_fast.label_attention_block_grads(s2, p2, lengths, z.to(acc), lse.to(acc), grad_z.to(acc))
    scale = grad_z.abs().max().item()
    _assert_close(s2, twin.s, stored * scale, "dP")
    _assert_close(p2, twin.p, stored * scale * 4, "dS")
    assert torch.all(s2.view(labels, 3, tokens)[:, pad] == 0) and torch.all(p2.view(labels, 3, tokens)[:, pad] == 0)


@pytest.mark.parametrize("variant", IMPLS)
@pytest.mark.parametrize("shape", [(3, 37, 20, 45), (2, 1, 7, 3), (1, 70, 40, 66)],
                         ids=lambda s: "B{}-n{}-C{}-L{}".format(*s))
def test_cpu_autocast_bf16_matches_fp32_reference(variant, shape):
    """Every impl under torch.autocast("cpu", bfloat16) on fp32 inputs and parameters: logits fp32,
    gradients fp32 (the leaves' dtype), within max|s|·ε(bf16) (BF16_SCORE = 4; the autocast
    reference itself rounds its scores and its softmax to bf16) of the fp32 reference. bf16
    parameters would be rounded by autocast anyway: the reference gets the bf16-rounded inputs, so
    the tolerance bounds the computation alone."""
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    batch, n, c, num_labels = shape
    inputs = make_inputs(batch, n, c, num_labels, torch.bfloat16, seed=sum(shape), score_scale=BF16_SCORE)
    inputs = tuple(t.float() for t in inputs[:4]) + (inputs[4],)
    grad = torch.randn(batch, num_labels)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:4]]
    with forced(variant, *inputs) as impl:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = label_attention(*leaves, inputs[4], impl=impl)
        assert out.dtype == torch.float32
        out.backward(grad)
    expected, expected_grads = reference_with_grads(*inputs, grad)
    tol = 2 * BF16_SCORE * torch.finfo(torch.bfloat16).eps
    _assert_close(out, expected, tol, f"{variant} logits")
    for name, leaf, ref_grad in zip(("dO", "dQ", "dW", "db"), leaves, expected_grads):
        assert leaf.grad.dtype == torch.float32
        _assert_close(leaf.grad, ref_grad, tol, f"{variant} {name}")


@pytest.mark.parametrize("variant", [v for v in IMPLS if v != "reference"])
def test_bf16_inputs_given_directly(variant):
    """bf16 features, queries and weights (no autocast): gradients in bf16, logits fp32."""
    inputs = make_inputs(3, 37, 20, 45, torch.bfloat16, seed=41, score_scale=BF16_SCORE)
    grad = torch.randn(3, 45, device=DEVICE)
    run_and_compare(variant, *inputs, grad, 2 * BF16_SCORE * torch.finfo(torch.bfloat16).eps)


@needs_cpu_kernel
def test_cpu_kernel_is_the_torch_forward_on_cpu(monkeypatch):
    """impl="torch" on fp32 CPU tensors runs the C++ forward (bit-identical to calling it)."""
    features, queries, weights, bias, lengths = make_inputs(2, 300, 12, 270, torch.float32, seed=12)
    z, _ = torch.ops.marn_fast.label_attention_forward(features, queries, weights, lengths)
    assert torch.equal(label_attention(features, queries, weights, bias, lengths, impl="torch"), z + bias)


@needs_cpu_kernel
def test_cpu_kernel_working_set_is_bounded():
    """The C++ forward allocates one S/P tile pair (at most 2 · 256 · 256 values) per thread, not
    the [n, L] scores the reference allocates (checked too, so this test can fail)."""
    batch, n, c, num_labels = 1, 3000, 8, 1500
    features, queries, weights, bias, lengths = make_inputs(batch, n, c, num_labels, torch.float32, seed=13)
    with torch.no_grad():
        largest, peak = _allocations(lambda: label_attention(features, queries, weights, bias, lengths))
        ref_largest, _ = _allocations(lambda: reference_label_attention(features, queries, weights, bias, lengths))
    tile = 4 * 2 * 256 * 256
    assert largest <= tile, f"largest allocation {largest} B > one tile pair {tile} B"
    assert peak <= 4 * tile + 4 * 4 * batch * num_labels
    assert ref_largest >= 4 * n * num_labels > 10 * peak


@needs_cpu_kernel
@pytest.mark.parametrize("name,change", [
    ("features", lambda a: (a[0].half(),) + a[1:]),
    ("queries", lambda a: (a[0], a[1][:, :-1]) + a[2:]),
    ("weights", lambda a: a[:2] + (a[2][:-1],) + a[3:]),
    ("lengths", lambda a: a[:3] + (a[3][:-1],)),
    ("lengths", lambda a: a[:3] + (torch.tensor([0, 5]),)),
    ("lengths", lambda a: a[:3] + (torch.tensor([5, 10]),)),
])
def test_cpu_kernel_bad_input(name, change):
    """The C++ op names the argument (the Python entry point checks first, with ValueError)."""
    features, queries, weights, _, lengths = make_inputs(2, 9, 5, 3, torch.float32, seed=14)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.marn_fast.label_attention_forward(*change((features, queries, weights, lengths)))


@needs_cpu_kernel
def test_cpu_kernel_opcheck():
    features, queries, weights, _, lengths = make_inputs(2, 9, 5, 3, torch.float32, seed=15)
    torch.library.opcheck(torch.ops.marn_fast.label_attention_forward, (features, queries, weights, lengths))
    features, queries, weights, _, lengths, keys = make_keyed_inputs(2, 9, 5, 4, 3, torch.float32, seed=15)
    torch.library.opcheck(torch.ops.marn_fast.label_attention_forward, (features, queries, weights, lengths, keys))


# --- the GEMM-first paths ("gemm", "gemm_saved"): groups, label chunks, splits, kept scores ---

# (B, n, C, L, lengths). On the CPU every document is a group of its own, cut at its length; on
# CUDA B <= 4 with unequal lengths runs document by document, B = 6 as one group cut at the longest
# document (padded tokens inside the group), equal lengths as one group. The "cuda_rule" layout
# forces CUDA's rule on any device.
LAYOUTS = ["native", "cuda_rule"]
GEMM_CASES = [(3, 37, 20, 45, [37, 1, 20]), (6, 29, 13, 33, [29, 3, 17, 1, 29, 8]),
              (6, 29, 13, 33, [22, 3, 17, 1, 9, 8]), (2, 30, 11, 19, [30, 30]), (1, 1, 5, 2, [1])]


def _gemm_inputs(case, dtype, seed, score_scale=None):
    """make_inputs with the given lengths: fresh random values, PAD_VALUE past each length, and
    (score_scale) Q rescaled so that the largest valid |q·o| is score_scale."""
    batch, n, c, num_labels, lengths = case
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    queries = torch.randn(num_labels, c, generator=g, dtype=torch.float64) / c ** 0.5
    weights = torch.randn(num_labels, c, generator=g, dtype=torch.float64)
    bias = torch.randn(num_labels, generator=g, dtype=torch.float64)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    pad = torch.arange(n)[None, :] >= lengths[:, None]
    if score_scale is not None:
        scores = torch.einsum("lc,btc->blt", queries, features).masked_fill(pad[:, None, :], 0.0)
        queries *= score_scale / scores.abs().max()
    features[pad] = PAD_VALUE
    return tuple(t.to(DEVICE, dtype) for t in (features, queries, weights, bias)) + (lengths.to(DEVICE),)


def _layout(monkeypatch, layout: str) -> None:
    """"cuda_rule": the document groups CUDA uses, on any device."""
    if layout == "cuda_rule":
        groups = gemm_module._groups
        monkeypatch.setattr(gemm_module, "_groups", lambda ends, device: groups(ends, torch.device("cuda")))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", GEMM_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "B{}-n{}-C{}-L{}-".format(*c[:4]) + "-".join(map(str, c[4])))
def test_gemm_groups(monkeypatch, layout, variant, dtype, case):
    """Per-document groups, one group with padded tokens inside (PAD_VALUE there must not leak),
    one group without padding; fp32 (Triton kernels under the interpreter, the C++ kernels and
    the twin) and fp64 (C++ and the twin)."""
    _layout(monkeypatch, layout)
    inputs = _gemm_inputs(case, dtype, seed=len(case[4]) + case[1], score_scale=30.0)
    grad = torch.randn(case[0], case[3], device=DEVICE, dtype=dtype)
    leaves = run_and_compare(variant, *inputs, grad, TOL[dtype])
    pad = torch.arange(case[1], device=DEVICE)[None, :] >= inputs[4][:, None]
    assert torch.all(leaves[0].grad[pad] == 0)


@pytest.mark.parametrize("variant", GEMM_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("per_document", [True, False])
def test_gemm_small_label_chunks(monkeypatch, variant, dtype, per_document):
    """A budget of 3 or 7 labels per chunk: L = 45 runs as 15 or 7 chunks (the last of 7 shorter),
    forward and backward (for "gemm_saved": the backward's scratch chunks over the kept rows);
    documents one by one or as one group."""
    batch, n, c, num_labels = 3, 37, 20, 45
    inputs = _gemm_inputs((batch, n, c, num_labels, [37, 1, 20]), dtype, seed=21, score_scale=30.0)
    itemsize = 8 if dtype == torch.float64 else 4
    if per_document:  # documents of 37, 1 and 20 tokens side by side: chunks of 3 labels
        monkeypatch.setattr(gemm_module, "_groups", lambda ends, device: [(d, d + 1, t) for d, t in enumerate(ends)])
        monkeypatch.setattr(gemm_module, "CHUNK_MAX_BYTES", 2 * 3 * (37 + 1 + 20) * itemsize)
        expected_size, columns = 3, 37 + 1 + 20
    else:  # one group of 3 × 37 columns: 7 chunks of 7 labels, the last of 3
        monkeypatch.setattr(gemm_module, "_groups", lambda ends, device: [(0, len(ends), max(ends))])
        monkeypatch.setattr(gemm_module, "CHUNK_MAX_BYTES", 2 * 7 * batch * n * itemsize)
        expected_size, columns = 7, batch * n
    size, _ = gemm_module._chunk_size(inputs[0], columns, num_labels, dtype)
    assert size == expected_size
    grad = torch.randn(batch, num_labels, device=DEVICE, dtype=dtype)
    run_and_compare(variant, *inputs, grad, TOL[dtype])


@pytest.mark.parametrize("variant", ["gemm", "gemm_saved"])
def test_gemm_reduction_token_splits(monkeypatch, variant):
    """The Triton reduction split over 3 token ranges (as on a GPU when D·Lc is small): partial
    max, sum and Σe·p combined by the caller; a split past a document's length is empty."""
    inputs = _gemm_inputs((3, 100, 12, 20, [100, 1, 70]), torch.float32, seed=22, score_scale=40.0)
    if gemm_module.reductions(inputs[0].device, inputs[0].dtype) != "triton":
        pytest.skip("needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setattr(gemm_module, "_token_splits", lambda device, docs, num_labels, tokens: 3)
    grad = torch.randn(3, 20, device=DEVICE)
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", GEMM_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunked", [False, True])
def test_gemm_half_scores(monkeypatch, layout, variant, dtype, chunked):
    """S and P kept in fp16/bf16 (the GEMMs' output dtype: bf16 on every device, fp16 forced here
    as on CUDA), dO from one GEMM per chunk with [W_c; Q_c] plus an fp32 add. S rounded to the
    dtype before the softmax: tolerance max|s|·ε (max|s| = 4 here; errors observed <= 8e-4 fp16,
    <= 7.3e-3 bf16)."""
    if variant.endswith("/cpp") and dtype == torch.float16:
        pytest.skip("the C++ passes take fp32/fp64/bf16 blocks (fp16 blocks exist on CUDA only)")
    monkeypatch.setattr(gemm_module, "gemm_dtype", lambda features: features.dtype)
    _layout(monkeypatch, layout)
    case = (6, 29, 13, 33, [29, 3, 17, 1, 29, 8])
    inputs = _gemm_inputs(case, dtype, seed=27, score_scale=4.0)
    if chunked:  # chunks of 5 labels: 33 = 6 × 5 + 3
        groups = gemm_module._groups(inputs[4].tolist(), inputs[0].device)
        columns = sum((d1 - d0) * t for d0, d1, t in groups)
        monkeypatch.setattr(gemm_module, "CHUNK_MAX_BYTES", 2 * 5 * columns * 2)
        assert gemm_module._chunk_size(inputs[0], columns, 33, dtype)[0] == 5
    grad = torch.randn(6, 33, device=DEVICE)
    run_and_compare(variant, *inputs, grad, 4.0 * torch.finfo(dtype).eps)


def test_label_chunk_sizes_fit_the_budget_and_balance():
    for budget, columns, num_labels in [(10 ** 6, 1000, 9000), (800, 10, 45), (1, 7, 5), (10 ** 9, 4, 3)]:
        size = gemm_module._label_chunk(budget, columns, num_labels, 4)
        chunks = -(-num_labels // size)
        assert 1 <= size <= num_labels
        assert 2 * size * columns * 4 <= max(budget, 2 * columns * 4)  # fits (one label at least)
        assert size * (chunks - 1) < num_labels <= size * chunks  # no empty chunk
        assert num_labels - size * (chunks - 1) >= size - chunks  # balanced: the last is nearly full


def test_chunk_budget_is_capped_by_free_memory(monkeypatch):
    free = memory_module.free_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0
    limit = gemm_module.CHUNK_MAX_BYTES
    monkeypatch.setattr(memory_module, "free_memory_bytes", lambda device: 10 ** 9)
    assert memory_module.budget(torch.device("cpu"), limit, 0.1) == 10 ** 8
    monkeypatch.setattr(memory_module, "free_memory_bytes", lambda device: 10 ** 12)
    assert memory_module.budget(torch.device("cpu"), limit, 0.1) == limit
    monkeypatch.setattr(memory_module, "free_memory_bytes", lambda device: None)
    assert memory_module.budget(torch.device("cpu"), limit, 0.1) == limit


class _CountingOp:
    """Wraps a registered op and counts its calls."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.mark.parametrize("variant", ["gemm_saved", "gemm_saved/torch-ops"])
def test_gemm_saved_keeps_scores_only_for_autograd_and_within_budget(monkeypatch, variant):
    """The kept-scores forward runs only when autograd will need it (grad mode on and an input
    that requires grad) and 2·L·B·n values fit the budget; otherwise "gemm" runs, with the same
    results and gradients."""
    inputs = make_inputs(3, 37, 20, 45, torch.float32, seed=23)
    saved_fwd = _CountingOp(la_module._gemm_saved_fwd)
    monkeypatch.setattr(la_module, "_gemm_saved_fwd", saved_fwd)
    expected = reference_label_attention(*(t.double() for t in inputs[:4]), inputs[4])
    with forced(variant, *inputs) as impl:
        with torch.no_grad():
            out = label_attention(*(t.detach().requires_grad_() for t in inputs[:4]), inputs[4], impl=impl)
        _assert_close(out, expected, TOL[torch.float32], "no_grad logits")
        out = label_attention(*inputs, impl=impl)  # nothing requires grad
        _assert_close(out, expected, TOL[torch.float32], "inference logits")
        assert saved_fwd.calls == 0 and out.grad_fn is None
    grad = torch.randn(3, 45, device=DEVICE)
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])
    assert saved_fwd.calls == 1
    monkeypatch.setattr(gemm_module, "SAVED_MAX_BYTES", 2 * 45 * 3 * 37 * 4 - 1)  # one value short
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])
    assert saved_fwd.calls == 1  # fell back to recomputing
    monkeypatch.setattr(gemm_module, "SAVED_MAX_BYTES", 2 * 45 * 3 * 37 * 4)
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])
    assert saved_fwd.calls == 2


@pytest.mark.skipif(DEVICE != "cpu", reason="tracks the CPU allocator")
def test_gemm_saved_memory_inference_and_training(monkeypatch):
    """Under no_grad "gemm_saved" allocates nothing near the 2·L·B·n kept values (only its label
    chunk, forced small here); in training it keeps exactly one such buffer."""
    monkeypatch.setattr(gemm_module, "reductions", lambda device, dtype: "torch")  # no interpreter copies
    batch, n, c, num_labels = 2, 300, 8, 400
    features, queries, weights, bias, lengths = make_inputs(batch, n, c, num_labels, torch.float32, seed=24)
    kept = 4 * 2 * num_labels * batch * n
    monkeypatch.setattr(gemm_module, "CHUNK_MAX_BYTES", kept // 16)
    with torch.no_grad():
        largest, _ = _allocations(lambda: label_attention(features, queries, weights, bias, lengths,
                                                          impl="gemm_saved"))
    assert largest <= kept // 16
    leaves = [t.requires_grad_() for t in (features, queries, weights, bias)]
    largest, _ = _allocations(lambda: label_attention(*leaves, lengths, impl="gemm_saved"))
    assert largest == kept


@pytest.mark.skipif(DEVICE != "cpu", reason="tracks the CPU allocator")
def test_gemm_working_set_is_bounded(monkeypatch):
    """"gemm" forward and backward allocate at most the label chunk's buffer (the budget) or an
    input-sized buffer, while the reference allocates [B, L, n]."""
    monkeypatch.setattr(gemm_module, "reductions", lambda device, dtype: "torch")
    batch, n, c, num_labels = 3, 300, 8, 400
    features, queries, weights, bias, lengths = make_inputs(batch, n, c, num_labels, torch.float32, seed=25)
    budget = 4 * 2 * 32 * batch * n
    monkeypatch.setattr(gemm_module, "CHUNK_MAX_BYTES", budget)
    leaves = [t.requires_grad_() for t in (features, queries, weights, bias)]
    largest, peak = _allocations(lambda: label_attention(*leaves, lengths, impl="gemm").sum().backward())
    assert largest <= max(budget, 4 * batch * n * c, 4 * num_labels * c), largest
    assert peak < 4 * batch * n * num_labels
    ref_largest, _ = _allocations(lambda: reference_label_attention(*leaves, lengths).sum().backward())
    assert ref_largest >= 4 * batch * n * num_labels


def test_available_impls():
    features, queries, weights, bias, lengths = make_inputs(2, 9, 5, 3, torch.float32, seed=26)
    names = available_impls(features, queries, weights, bias, lengths)
    assert {"reference", "torch", "gemm", "gemm_saved"} <= set(names) and "auto" not in names
    assert ("triton" in names) == (DEVICE == "cuda" or la_module.interpreting())
    assert "triton" not in available_impls(features.double(), queries, weights, bias, lengths)
    for name in names:  # every listed impl runs
        label_attention(features, queries, weights, bias, lengths, impl=name)


# --- registration ---------------------------------------------------------------------------

@pytest.mark.parametrize("keyed", [False, True], ids=["keys-none", "keys"])
@pytest.mark.parametrize("prefix", ["label_attention", "label_attention_chunked", "label_attention_gemm",
                                    "label_attention_gemm_saved"])
def test_opcheck(prefix, keyed):
    """Each registered forward and backward, with keys=None (MARN's form; dK comes back empty) and
    with keys [B, n, d_k = 4] ≠ the features [B, n, C = 5]."""
    if keyed:
        features, queries, weights, _, lengths, keys = make_keyed_inputs(2, 9, 5, 4, 3, torch.float32, seed=10)
    else:
        (features, queries, weights, _, lengths), keys = make_inputs(2, 9, 5, 3, torch.float32, seed=10), None
    fwd = getattr(torch.ops.marn_fast, f"{prefix}_fwd")
    bwd = getattr(torch.ops.marn_fast, f"{prefix}_bwd")
    args = tuple(t.requires_grad_() for t in (features, queries, weights)) + (lengths,)
    args += (None if keys is None else keys.requires_grad_(),)
    torch.library.opcheck(fwd, args)
    plain = tuple(t.detach() for t in args[:3]) + (lengths, None if keys is None else keys.detach())
    outputs = fwd(*plain)  # (z, lse) or (z, lse, kept)
    torch.library.opcheck(bwd, (torch.randn(2, 3, device=DEVICE),) + plain + tuple(outputs))
    grads = bwd(torch.randn(2, 3, device=DEVICE), *plain, *outputs)
    assert grads[1].shape == ((0,) if keys is None else keys.shape)


@pytest.mark.parametrize("impl", ["triton", "gemm", "gemm_saved"])
def test_torch_compile_fullgraph_smoke(impl):
    features, queries, weights, bias, _ = make_inputs(2, 11, 6, 7, torch.float32, seed=11)
    features = torch.randn_like(features)
    if impl not in available_impls(features, queries, weights, bias):
        pytest.skip(f"impl {impl!r} not available here")
    compiled = torch.compile(lambda *t: label_attention(*t, impl=impl).sum(), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (features, queries, weights, bias)]
    out = compiled(*leaves)
    out.backward()
    expected, expected_grads = reference_with_grads(features, queries, weights, bias, None,
                                                    torch.ones(2, 7, device=DEVICE))
    _assert_close(out, expected.sum(), TOL[torch.float32], "compiled logits sum")
    for leaf, ref_grad in zip(leaves, expected_grads):
        _assert_close(leaf.grad, ref_grad, TOL[torch.float32], "compiled grad")


# --- top-k evidence -------------------------------------------------------------------------

@pytest.mark.parametrize("shared_labels", [False, True])
def test_topk_matches_reference(shared_labels):
    features, queries, _, _, lengths = make_inputs(3, 30, 12, 25, torch.float32, seed=12)
    labels = torch.tensor([3, 0, 24], device=DEVICE) if shared_labels else torch.randint(0, 25, (3, 4), device=DEVICE)
    k = 5  # more than lengths[1] = 1: entries past a document's length are −1 / 0
    indices, weights = label_attention_topk(features, queries, labels, k, lengths)
    ref_indices, ref_weights = topk_evidence(features.double(), queries.double(), labels, k, lengths)
    assert torch.equal(indices, ref_indices)
    _assert_close(weights, ref_weights, TOL[torch.float32], "top-k weights")
    assert torch.all(indices[1, :, 1:] == -1) and torch.all(weights[1, :, 0] == 1)


# --- bad input ------------------------------------------------------------------------------

def _bad_inputs():
    f, q, w, b = torch.randn(2, 5, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(3)
    ok = torch.tensor([5, 2])
    return [
        ("queries", (f, torch.randn(3, 6), w, b, ok), {}),
        ("weights", (f, q, torch.randn(4, 4), b, ok), {}),
        ("weights", (f, q, torch.randn(3, 6), b, ok), {}),
        ("bias", (f, q, w, torch.randn(4), ok), {}),
        ("lengths", (f, q, w, b, torch.tensor([5, 2, 1])), {}),
        ("lengths", (f, q, w, b, torch.tensor([5, 0])), {}),
        ("lengths", (f, q, w, b, torch.tensor([6, 2])), {}),
        ("lengths", (f, q, w, b, torch.tensor([5.0, 2.0])), {}),
        ("features", (torch.randn(5, 4), q, w, b, None), {}),
        ("device", (f.to("meta"), q, w, b, None), {}),
        ("impl", (f, q, w, b, ok), {"impl": "cuda"}),
        ("features", tuple(t.double().to(DEVICE) for t in (f, q, w, b)) + (ok.to(DEVICE),), {"impl": "triton"}),
    ]


@pytest.mark.parametrize("name,args,kwargs", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_value_error(name, args, kwargs):
    with pytest.raises(ValueError, match=name):
        label_attention(*args, **kwargs)


@pytest.mark.parametrize("name,labels,k", [("labels", torch.tensor([[0, 3]]), 2),
                                           ("labels", torch.tensor([[0, 1], [1, 2]]), 2),
                                           ("labels", torch.tensor([0.0]), 2),
                                           ("k", torch.tensor([0, 1]), 0), ("k", torch.tensor([0, 1]), 6)])
def test_topk_bad_input(name, labels, k):
    with pytest.raises(ValueError, match=name):
        label_attention_topk(torch.randn(1, 5, 4), torch.randn(3, 4), labels, k)


# --- keys separate from the values (LAAT, JointLAAT, PLM-ICD) and mask=False ----------------
# K [B, n, d_k] with d_k ≠ C, independent of O: S = Q·Kᵀ, P = W·Oᵀ, five gradients (dO, dQ, dW,
# db, dK) against the reference's keyed formula in float64. Tolerances as above (TOL, tolerance(),
# BF16_SCORE).

# (B, n, C, d_k, L): d_k < C, one token, d_k > C (more key columns than a Triton C block), d_k = 1.
KEYED_SHAPES = [(3, 37, 20, 11, 45), (2, 1, 7, 3, 3), (1, 70, 40, 64, 66), (3, 50, 33, 1, 2)]
MASKS = pytest.mark.parametrize("mask", [True, False], ids=["masked", "unmasked"])


def _assert_padding_gets_no_gradient(leaves, lengths, n):
    pad = torch.arange(n, device=DEVICE)[None, :] >= lengths[:, None]
    assert torch.all(leaves[0].grad[pad] == 0) and torch.all(leaves[4].grad[pad] == 0)


@MASKS
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", KEYED_SHAPES, ids=lambda s: "B{}-n{}-C{}-dk{}-L{}".format(*s))
def test_keyed_matches_reference(impl, shape, mask):
    """fp32; with mask, padded tokens (PAD_VALUE in features and keys) get exactly zero gradient;
    without, every token is attended whatever the lengths passed."""
    batch, n, c, d_k, num_labels = shape
    *inputs, keys = make_keyed_inputs(batch, n, c, d_k, num_labels, torch.float32, seed=sum(shape), mask=mask)
    grad = torch.randn(batch, num_labels, device=DEVICE)
    leaves = run_and_compare(impl, *inputs, grad, TOL[torch.float32], keys=keys, mask=mask)
    if mask:
        _assert_padding_gets_no_gradient(leaves, inputs[4], n)


@pytest.mark.parametrize("impl", IMPLS)
def test_keyed_large_scores(impl):
    """Scores up to ±80 from the keys: exp would overflow without the running max."""
    *inputs, keys = make_keyed_inputs(3, 45, 24, 13, 40, torch.float32, seed=7, score_scale=80.0)
    run_and_compare(impl, *inputs, torch.randn(3, 40, device=DEVICE), TOL[torch.float32], keys=keys)


@MASKS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", IMPLS)
def test_keyed_half_inputs(variant, dtype, mask):
    """fp16/bf16 features, keys, queries and weights given directly: gradients in the inputs'
    dtypes, logits fp32; max|s| = BF16_SCORE. fp16: `tolerance()`; bf16: 2·max|s|·ε as
    test_bf16_inputs_given_directly."""
    *inputs, keys = make_keyed_inputs(3, 37, 20, 11, 45, dtype, seed=43, mask=mask, score_scale=BF16_SCORE)
    tol = tolerance(variant, dtype) if dtype == torch.float16 else 2 * BF16_SCORE * torch.finfo(dtype).eps
    run_and_compare(variant, *inputs, torch.randn(3, 45, device=DEVICE), tol, keys=keys, mask=mask)


@MASKS
@pytest.mark.parametrize("keys_dtype", [torch.float32, torch.bfloat16], ids=["fp32-keys", "bf16-keys"])
@pytest.mark.parametrize("variant", IMPLS)
def test_keyed_cpu_autocast_bf16(variant, keys_dtype, mask):
    """Under torch.autocast("cpu", bfloat16) on fp32 features, queries and weights, with fp32 keys or
    bf16 keys (what LabelWiseAttention passes under autocast: its key projection ran in bf16):
    logits fp32, each gradient in its leaf's dtype, within 2·max|s|·ε(bf16) of the fp32
    reference of the bf16-rounded inputs (test_cpu_autocast_bf16_matches_fp32_reference's rule)."""
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    *inputs, keys = make_keyed_inputs(3, 37, 20, 11, 45, torch.bfloat16, seed=44, mask=mask, score_scale=BF16_SCORE)
    inputs = [t.float() for t in inputs[:4]] + [inputs[4]]
    keys = keys.to(keys_dtype)
    grad = torch.randn(3, 45)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:4] + [keys]]
    with forced(variant, *inputs) as impl:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = label_attention(*leaves[:4], inputs[4], keys=leaves[4], mask=mask, impl=impl)
        assert out.dtype == torch.float32
        out.backward(grad)
    expected, expected_grads = reference_with_grads(*inputs, grad, keys=keys, mask=mask)
    tol = 2 * BF16_SCORE * torch.finfo(torch.bfloat16).eps
    _assert_close(out, expected, tol, f"{variant} logits")
    for name, leaf, ref_grad in zip(GRAD_NAMES, leaves, expected_grads):
        assert leaf.grad.dtype == leaf.dtype, f"{name} dtype {leaf.grad.dtype} != {leaf.dtype}"
        _assert_close(leaf.grad, ref_grad, tol, f"{variant} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_keyed_grad_of_sum_and_non_contiguous_keys(impl):
    """The expanded gradient of .sum(), and keys in two non-contiguous layouts (token-major
    transposed, and a column slice of a wider tensor) with a transposed gradient."""
    *inputs, keys = make_keyed_inputs(3, 37, 20, 11, 45, torch.float32, seed=45)
    run_and_compare(impl, *inputs, torch.ones(3, 45, device=DEVICE), TOL[torch.float32],
                    grad_fn=lambda out: out.sum(), keys=keys)
    transposed = keys.transpose(1, 2).contiguous().transpose(1, 2)
    sliced = torch.cat([keys, keys[:, :, :5]], dim=2)[:, :, :11]
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    grad_t = torch.randn(45, 3, device=DEVICE)
    for layout in (transposed, sliced):
        run_and_compare(impl, *inputs, grad_t.t(), TOL[torch.float32], keys=layout)


@MASKS
@pytest.mark.parametrize("variant", IMPLS)
def test_keyed_lse_is_logsumexp_of_the_key_scores(variant, mask):
    *inputs, keys = make_keyed_inputs(3, 37, 20, 11, 45, torch.float32, seed=46, mask=mask, score_scale=60.0)
    features, queries, weights, bias, lengths = inputs
    with forced(variant, *inputs) as impl:
        _, lse = label_attention_with_lse(features, queries, weights, bias, lengths, keys=keys, mask=mask, impl=impl)
    scores = torch.einsum("ld,btd->blt", queries.double(), keys.double())
    if mask:
        scores = scores.masked_fill(torch.arange(37, device=DEVICE)[None, None, :] >= lengths[:, None, None],
                                    float("-inf"))
    _assert_close(lse, torch.logsumexp(scores, dim=2), TOL[torch.float32], f"{variant} lse")


@pytest.mark.parametrize("variant", IMPLS)
def test_unmasked_ignores_lengths_and_keys_that_are_the_features_are_marns_form(variant):
    """mask=False with lengths is bit-identical to lengths=None; keys=features is bit-identical to
    no keys (the registered ops then get keys=None: MARN's form, spied on)."""
    features, queries, weights, bias, lengths = make_inputs(3, 19, 9, 21, torch.float32, seed=47)
    features = torch.randn_like(features)  # no PAD_VALUE: every token is attended below
    with forced(variant, features, queries, weights, bias, lengths) as impl:
        unmasked = label_attention(features, queries, weights, bias, lengths, mask=False, impl=impl)
        assert torch.equal(unmasked, label_attention(features, queries, weights, bias, impl=impl))
        assert not torch.allclose(unmasked, label_attention(features, queries, weights, bias, lengths, impl=impl))
        seen = []
        with pytest.MonkeyPatch.context() as patch:
            for name in ("_triton_fwd", "_chunked_fwd", "_gemm_fwd", "_gemm_saved_fwd"):
                op = getattr(la_module, name)
                patch.setattr(la_module, name, lambda *args, op=op: seen.append(args[4]) or op(*args))
            same = label_attention(features, queries, weights, bias, lengths, keys=features, impl=impl)
        assert torch.equal(same, label_attention(features, queries, weights, bias, lengths, impl=impl))
        assert all(k is None for k in seen) and len(seen) == (impl != "reference")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 513, 24, 13, 257), (2, 256, 9, 40, 511), (1, 1, 3, 2, 1)],
                         ids=lambda s: "B{}-n{}-C{}-dk{}-L{}".format(*s))
def test_cpu_kernel_keyed(dtype, shape):
    """The C++ tile forward and the PyTorch chunks with keys (S tiles from K, P tiles from O),
    across the 256-label and 256-token tile edges, scores up to ±80 (bf16: ±BF16_SCORE, tolerance
    max|s|·ε as test_cpu_kernel_bf16)."""
    scale = BF16_SCORE if dtype == torch.bfloat16 else 80.0
    features, queries, weights, _, lengths, keys = make_keyed_inputs(*shape, dtype, seed=sum(shape),
                                                                     score_scale=scale)
    expected_z, expected_lse = _reference_z_lse(features, queries, weights, lengths, keys)
    tol = BF16_SCORE * torch.finfo(dtype).eps if dtype == torch.bfloat16 else TOL[dtype]
    z, lse = torch.ops.marn_fast.label_attention_forward(features, queries, weights, lengths, keys)
    assert z.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(z, expected_z, tol, "C++ z")
    _assert_close(lse, expected_lse, tol, "C++ lse")
    z_chunks, lse_chunks = chunked_module.forward_torch(features, queries, weights, lengths, keys)
    _assert_close(z_chunks, expected_z, tol, "PyTorch chunks z")
    _assert_close(lse_chunks, expected_lse, tol, "PyTorch chunks lse")


@needs_cpu_kernel
@pytest.mark.parametrize("name,change", [
    ("keys", lambda f, q, w, n, k: (f, q, w, n, k[:, :-1])),
    ("keys", lambda f, q, w, n, k: (f, q, w, n, k.double())),
    ("queries", lambda f, q, w, n, k: (f, q[:, :-1], w, n, k)),
    ("weights", lambda f, q, w, n, k: (f, q, w[:, :-1], n, k)),
])
def test_cpu_kernel_keyed_bad_input(name, change):
    features, queries, weights, _, lengths, keys = make_keyed_inputs(2, 9, 5, 4, 3, torch.float32, seed=48)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.marn_fast.label_attention_forward(*change(features, queries, weights, lengths, keys))


def test_keyed_chunked_path_with_small_chunks(monkeypatch):
    """The PyTorch chunks with keys: 2 documents × 4 labels × 8 tokens per chunk, float64."""
    _pytorch_chunks_only(monkeypatch)
    monkeypatch.setattr(chunked_module, "DOC_CHUNK", 2)
    monkeypatch.setattr(chunked_module, "LABEL_CHUNK", 4)
    monkeypatch.setattr(chunked_module, "TOKEN_CHUNK", 8)
    *inputs, keys = make_keyed_inputs(3, 37, 20, 11, 45, torch.float64, seed=49, score_scale=40.0)
    run_and_compare("torch", *inputs, torch.randn(3, 45, device=DEVICE, dtype=torch.float64), TOL[torch.float64],
                    keys=keys)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", GEMM_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_keyed_gemm_groups_and_label_chunks(monkeypatch, layout, variant, dtype):
    """The GEMM-first paths with keys: S from the keys' column space, P, dO and dW from the
    features', dK and dQ from dS; 6 documents of uneven lengths (per-document groups, or CUDA's
    one group cut at the longest with padded tokens inside), chunks of 5 labels (33 = 6 × 5 + 3).
    fp16 (forced as on CUDA) and bf16 keep S and P in the half dtype, dO and dK from separate
    GEMMs added in fp32: tolerance max|s|·ε, max|s| = 4 (test_gemm_half_scores)."""
    if variant.endswith("/cpp") and dtype == torch.float16:
        pytest.skip("the C++ passes take fp32/fp64/bf16 blocks (fp16 blocks exist on CUDA only)")
    monkeypatch.setattr(gemm_module, "gemm_dtype", lambda features: features.dtype)
    _layout(monkeypatch, layout)
    half = dtype in (torch.float16, torch.bfloat16)
    *inputs, keys = make_keyed_inputs(6, 29, 13, 7, 33, dtype, seed=50, score_scale=4.0 if half else 30.0)
    groups = gemm_module._groups(inputs[4].tolist(), inputs[0].device)
    columns = sum((d1 - d0) * t for d0, d1, t in groups)
    monkeypatch.setattr(gemm_module, "CHUNK_MAX_BYTES", 2 * 5 * columns * gemm_module.itemsize(dtype))
    assert gemm_module._chunk_size(inputs[0], columns, 33, dtype)[0] == 5
    grad = torch.randn(6, 33, device=DEVICE, dtype=torch.float32 if half else dtype)
    tol = 4.0 * torch.finfo(dtype).eps if half else TOL[dtype]
    leaves = run_and_compare(variant, *inputs, grad, tol, keys=keys)
    _assert_padding_gets_no_gradient(leaves, inputs[4], 29)


def test_keyed_triton_backward_with_document_splits(monkeypatch):
    monkeypatch.setattr(triton_module, "label_splits", lambda device, batch, num_labels: 2)
    *inputs, keys = make_keyed_inputs(3, 37, 20, 11, 45, torch.float32, seed=51)
    run_and_compare("triton", *inputs, torch.randn(3, 45, device=DEVICE), TOL[torch.float32], keys=keys)


@pytest.mark.parametrize("impl", ["torch", "triton", "gemm", "gemm_saved"])
def test_keyed_torch_compile_fullgraph_smoke(impl):
    """fullgraph=True with keys, unmasked (LAAT's form): logits and all five gradients."""
    features, queries, weights, bias, lengths, keys = make_keyed_inputs(2, 11, 6, 5, 7, torch.float32, seed=52,
                                                                        mask=False)
    if impl not in available_impls(features, queries, weights, bias):
        pytest.skip(f"impl {impl!r} not available here")
    compiled = torch.compile(lambda f, q, w, b, k: label_attention(f, q, w, b, lengths, keys=k, mask=False,
                                                                   impl=impl).sum(), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (features, queries, weights, bias, keys)]
    out = compiled(*leaves)
    out.backward()
    expected, expected_grads = reference_with_grads(features, queries, weights, bias, lengths,
                                                    torch.ones(2, 7, device=DEVICE), keys=keys, mask=False)
    _assert_close(out, expected.sum(), TOL[torch.float32], "compiled logits sum")
    for name, leaf, ref_grad in zip(GRAD_NAMES, leaves, expected_grads):
        _assert_close(leaf.grad, ref_grad, TOL[torch.float32], f"compiled {name}")


def test_measured_dispatch_keys_a_keyed_call_by_d_k(monkeypatch):
    """impl="auto" asks the dispatcher with the sizes B, n, C, L (MARN's key, unchanged) and adds
    d_k only for keyed calls, whose trial runs the keyed op and whose memory estimate counts the
    keys."""
    asked = []

    def choose(op, *, sizes, trial, default, memory, **kwargs):
        asked.append((dict(sizes), trial(), memory))
        return default

    monkeypatch.setattr(la_module.dispatch, "choose", choose)
    features, queries, weights, bias, lengths, keys = make_keyed_inputs(2, 9, 5, 4, 3, torch.float32, seed=53)
    plain = make_inputs(2, 9, 5, 3, torch.float32, seed=53)
    label_attention(*plain)
    out = label_attention(features, queries, weights, bias, lengths, keys=keys)
    assert [a[0] for a in asked] == [{"B": 2, "n": 9, "C": 5, "L": 3}, {"B": 2, "n": 9, "C": 5, "L": 3, "d_k": 4}]
    torch.testing.assert_close(asked[1][1]("reference")[0], out)  # the trial runs the keyed call
    for (_, _, memory), passed in zip(asked, (None, keys)):
        want = la_module.peak_bytes("gemm", features, plain[1] if passed is None else queries, False, torch.float32,
                                    passed)
        assert memory("gemm", torch.float32) == want


@MASKS
@pytest.mark.parametrize("shared_labels", [False, True])
def test_keyed_topk_matches_reference(shared_labels, mask):
    """Top-k evidence from the keys' attention (fp32 keys with fp64 features: A in fp32); mask=False
    ranks padded tokens too (no −1 entries)."""
    features, queries, _, _, lengths, keys = make_keyed_inputs(3, 30, 12, 7, 25, torch.float32, seed=54, mask=mask)
    labels = torch.tensor([3, 0, 24], device=DEVICE) if shared_labels else torch.randint(0, 25, (3, 4), device=DEVICE)
    indices, weights = label_attention_topk(features.double(), queries, labels, 5, lengths, keys=keys, mask=mask)
    assert weights.dtype == torch.float32
    ref_indices, ref_weights = topk_evidence(keys.double(), queries.double(), labels, 5, lengths if mask else None)
    assert torch.equal(indices, ref_indices)
    _assert_close(weights, ref_weights, TOL[torch.float32], "top-k weights")
    assert bool((indices[1, :, 1:] == -1).all()) == mask


def _keyed_bad_inputs():
    f, q, w, b = torch.randn(2, 5, 4), torch.randn(3, 6), torch.randn(3, 4), torch.randn(3)
    k, ok = torch.randn(2, 5, 6), torch.tensor([5, 2])
    return [
        ("keys", (f, q, w, b, ok), {"keys": torch.randn(2, 4, 6)}),
        ("keys", (f, q, w, b, ok), {"keys": torch.randn(3, 5, 6)}),
        ("keys", (f, q, w, b, ok), {"keys": torch.randn(2, 5, 0)}),
        ("keys", (f, q, w, b, ok), {"keys": torch.randn(10, 6)}),
        ("keys", (f, q, w, b, ok), {"keys": k.long()}),
        ("queries", (f, torch.randn(3, 4), w, b, ok), {"keys": k}),
        ("device", (f, q, w, b, ok), {"keys": k.to("meta")}),
        ("mask", (f, q, w, b, ok), {"keys": k, "mask": 0}),
        ("lengths", (f, q, w, b, torch.tensor([5, 6])), {"keys": k, "mask": False}),
    ]


@pytest.mark.parametrize("name,args,kwargs", _keyed_bad_inputs(), ids=lambda v: v if isinstance(v, str) else None)
def test_keyed_bad_input_raises_value_error(name, args, kwargs):
    with pytest.raises(ValueError, match=name):
        label_attention(*args, **kwargs)
    with pytest.raises(ValueError, match=name):
        label_attention_topk(args[0], args[1], torch.tensor([0, 1]), 2, args[4], **kwargs)


# --- GPU only -------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "gemm", "gemm_saved"])
@pytest.mark.parametrize("shape", [(3, 37, 20, 45), (4, 300, 96, 200), (8, 300, 96, 200)], ids=str)
def test_gpu_bf16(impl, shape):
    inputs = make_inputs(*shape, torch.bfloat16, seed=13)
    grad = torch.randn(shape[0], shape[3], device=DEVICE)
    run_and_compare(impl, *inputs, grad, tolerance(impl, torch.bfloat16))


@requires_cuda
@MASKS
@pytest.mark.parametrize("impl", ["triton", "gemm", "gemm_saved"])
@pytest.mark.parametrize("shape", [(3, 37, 20, 11, 45), (4, 300, 96, 64, 200), (8, 300, 96, 160, 200)], ids=str)
def test_gpu_bf16_keyed(impl, shape, mask):
    """bf16 with keys on the GPU (the Triton kernels compiled with KEYED, d_k below, at and above
    a C block), masked and unmasked."""
    *inputs, keys = make_keyed_inputs(*shape, torch.bfloat16, seed=55, mask=mask, score_scale=BF16_SCORE)
    grad = torch.randn(shape[0], shape[4], device=DEVICE)
    run_and_compare(impl, *inputs, grad, 2 * BF16_SCORE * torch.finfo(torch.bfloat16).eps, keys=keys, mask=mask)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "gemm"])
@pytest.mark.parametrize("shape", [(2, 32768, 64, 300), (2, 512, 64, 70000)], ids=str)
def test_gpu_large_against_chunked_float64(impl, shape):
    """n = 32,768 or L = 70,000 in bf16 against the chunked path in float64 (itself tested
    against the reference above; the reference's [B, L, n] would not be the point here)."""
    batch, n, c, num_labels = shape
    features, queries, weights, bias, lengths = make_inputs(*shape, torch.bfloat16, seed=14)
    grad = torch.randn(batch, num_labels, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (features, queries, weights, bias)]
    out = label_attention(*leaves, lengths, impl=impl)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (features, queries, weights, bias)]
    expected = label_attention(*ref_leaves, lengths, impl="torch")
    expected.backward(grad.double())
    _assert_close(out, expected, tolerance(impl, torch.bfloat16), "large logits")
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        _assert_close(leaf.grad, ref_leaf.grad, tolerance(impl, torch.bfloat16), "large grad")
