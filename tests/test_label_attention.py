"""Fused label-wise attention against the plain-PyTorch reference (computed in float64).

Every impl of `available_impls(...)` is forced in turn: "reference", "torch" (the path that
impl="auto" runs on CPU tensors: the C++ forward for fp32/fp64 when the extension is built, else
PyTorch chunks; the backward in PyTorch chunks), "triton" (Triton kernels; on the CPU through
TRITON_INTERPRET=1, set by conftest.py), "gemm" and "gemm_saved" (vendor GEMMs; their reduction
and elementwise pass as Triton kernels where those run, and also forced onto their PyTorch twin:
the variants "gemm/torch-ops" and "gemm_saved/torch-ops"). The C++ forward and the
PyTorch-chunk forward are also tested on their own.
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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["reference", "torch", "triton", "gemm", "gemm_saved", "gemm/torch-ops", "gemm_saved/torch-ops"]
GEMM_IMPLS = ["gemm", "gemm_saved", "gemm/torch-ops", "gemm_saved/torch-ops"]
# fp32: every path accumulates in fp32 (IEEE dots on GPU) — errors observed <= 5e-6 relative.
# fp16: S and P are exact fp32 sums of fp16 products, but ds/dp enter the backward GEMMs as fp16
#       in the Triton path and gradients are returned in fp16 — errors observed <= 5e-4 relative.
# bf16 (GPU only): 8-bit mantissa, expected ~8× the fp16 error (not yet measured: no GPU here).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 4e-2, torch.float64: 1e-10}
PAD_VALUE = 1e4  # written into padded token positions: must not change logits or gradients


def tolerance(impl: str, dtype: torch.dtype, max_score: float = 4.0) -> float:
    """TOL[dtype], except where S is rounded to a half dtype before the softmax: the gemm impls
    on CUDA with fp16/bf16 (as the eager reference does; not measured yet, no GPU here). There
    each a_lt carries a relative error up to about max|s|·ε of the dtype, and so does the result
    (observed on the CPU with half scores at max|s| = 4: <= 8e-4 fp16, <= 7.3e-3 bf16, a quarter
    of max|s|·ε or less)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if half and DEVICE == "cuda" and impl.startswith("gemm"):
        return max(TOL[dtype], max_score * torch.finfo(dtype).eps)
    return TOL[dtype]


@contextlib.contextmanager
def forced(variant: str, features, queries, weights, bias, lengths):
    """The impl name of a test variant, skipping when `available_impls` lacks it; "<impl>/torch-ops"
    makes the gemm impls use their PyTorch twin instead of the Triton kernels."""
    impl, _, twin = variant.partition("/")
    if impl != "auto" and impl not in available_impls(features, queries, weights, bias, lengths):
        pytest.skip(f"impl {impl!r} not available for {features.dtype} on {features.device}")
    if impl == "reference" and features.dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the eager reference in half precision is the baseline, not a fused path")
    with pytest.MonkeyPatch.context() as patch:
        if twin == "torch-ops":
            patch.setattr(la_module, "_use_triton_reductions", lambda device, dtype: False)
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


def reference_with_grads(features, queries, weights, bias, lengths, grad):
    """Reference logits and (dO, dQ, dW, db) in float64 from the (already rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (features, queries, weights, bias)]
    out = reference_label_attention(*leaves, lengths)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def run_and_compare(variant, features, queries, weights, bias, lengths, grad, tol, grad_fn=None):
    """Logits and (dO, dQ, dW, db) of one impl variant against the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (features, queries, weights, bias)]
    with forced(variant, features, queries, weights, bias, lengths) as impl:
        out = label_attention(*leaves, lengths, impl=impl)
        assert out.dtype == (torch.float64 if features.dtype == torch.float64 else torch.float32)
        (out.backward(grad) if grad_fn is None else grad_fn(out).backward())
    expected, expected_grads = reference_with_grads(features, queries, weights, bias, lengths, grad)
    _assert_close(out, expected, tol, f"{variant} logits")
    for name, leaf, ref_grad in zip(("dO", "dQ", "dW", "db"), leaves, expected_grads):
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
    monkeypatch.setattr(la_module, "_label_splits", lambda device, batch, num_labels: 2)
    inputs = make_inputs(3, 37, 20, 45, torch.float32, seed=15)
    grad = torch.randn(3, 45, device=DEVICE)
    run_and_compare("triton", *inputs, grad, TOL[torch.float32])


# --- the chunked PyTorch path: chunking exercised, working set bounded -----------------------

def _pytorch_chunks_only(monkeypatch):
    """The "torch" path's forward through the PyTorch chunks even where the C++ kernel applies."""
    monkeypatch.setattr(la_module, "_cpu_kernel_applies", lambda features: False)


def test_chunked_path_with_small_chunks(monkeypatch):
    """Chunks of 2 documents × 4 labels × 8 tokens: many label chunks, several token chunks per
    document (online softmax across token chunks, some fully padded), partial last chunks."""
    _pytorch_chunks_only(monkeypatch)
    monkeypatch.setattr(la_module, "DOC_CHUNK", 2)
    monkeypatch.setattr(la_module, "LABEL_CHUNK", 4)
    monkeypatch.setattr(la_module, "TOKEN_CHUNK", 8)
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
    monkeypatch.setattr(la_module, "DOC_CHUNK", doc_chunk)
    monkeypatch.setattr(la_module, "LABEL_CHUNK", label_chunk)
    monkeypatch.setattr(la_module, "TOKEN_CHUNK", token_chunk)
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


def _reference_z_lse(features, queries, weights, lengths):
    """(z, lse) in float64 from the plain-PyTorch reference: z = logits − bias."""
    f, q, w = (t.double() for t in (features, queries, weights))
    z = reference_label_attention(f, q, w, torch.zeros(q.shape[0], dtype=torch.float64), lengths)
    scores = torch.einsum("lc,btc->blt", q, f)
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
    z_chunks, lse_chunks = la_module.chunked_forward_torch(features, queries, weights, lengths)
    _assert_close(z_chunks, expected_z, TOL[dtype], "PyTorch chunks z")
    _assert_close(lse_chunks, expected_lse, TOL[dtype], "PyTorch chunks lse")


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


# --- the GEMM-first paths ("gemm", "gemm_saved"): groups, label chunks, splits, kept scores ---

# (B, n, C, L, lengths): B <= 4 with unequal lengths runs document by document; B = 6 runs as one
# group cut at the longest document, with padded tokens inside the group; equal lengths: one group.
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


@pytest.mark.parametrize("variant", GEMM_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "B{}-n{}-C{}-L{}-".format(*c[:4]) + "-".join(map(str, c[4])))
def test_gemm_groups(variant, dtype, case):
    """Per-document groups, one group with padded tokens inside (PAD_VALUE there must not leak),
    one group without padding; fp32 (Triton kernels under the interpreter, and the twin) and
    fp64 (the twin)."""
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
    if per_document:  # documents of 37, 1 and 20 tokens: chunks of 3 labels (sized for the widest)
        monkeypatch.setattr(la_module, "CHUNK_MAX_BYTES", 2 * 3 * 37 * itemsize)
        expected_size = 3
    else:  # one group of 3 × 37 columns: 7 chunks of 7 labels, the last of 3
        monkeypatch.setattr(la_module, "PER_DOCUMENT_MAX_BATCH", 0)
        monkeypatch.setattr(la_module, "CHUNK_MAX_BYTES", 2 * 7 * batch * n * itemsize)
        expected_size = 7
    size, _ = la_module._chunk_size(inputs[0], la_module._groups(inputs[4].tolist()), num_labels, dtype)
    assert size == expected_size
    grad = torch.randn(batch, num_labels, device=DEVICE, dtype=dtype)
    run_and_compare(variant, *inputs, grad, TOL[dtype])


@pytest.mark.parametrize("variant", ["gemm", "gemm_saved"])
def test_gemm_reduction_token_splits(monkeypatch, variant):
    """The Triton reduction split over 3 token ranges (as on a GPU when D·Lc is small): partial
    max, sum and Σe·p combined by the caller; a split past a document's length is empty."""
    inputs = _gemm_inputs((3, 100, 12, 20, [100, 1, 70]), torch.float32, seed=22, score_scale=40.0)
    if not la_module._use_triton_reductions(inputs[0].device, inputs[0].dtype):
        pytest.skip("needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setattr(la_module, "_token_splits", lambda device, docs, num_labels, tokens: 3)
    grad = torch.randn(3, 20, device=DEVICE)
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])


@pytest.mark.parametrize("variant", GEMM_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunked", [False, True])
def test_gemm_half_scores_as_on_cuda(monkeypatch, variant, dtype, chunked):
    """The CUDA half-precision branch on the CPU: S and P kept in fp16/bf16 (as on CUDA, where
    they are the GEMM's output dtype), dO from one GEMM per chunk with [W_c; Q_c] plus an fp32
    add. S rounded to the dtype before the softmax: tolerance max|s|·ε (max|s| = 4 here; errors
    observed <= 8e-4 fp16, <= 7.3e-3 bf16)."""
    monkeypatch.setattr(la_module, "_gemm_dtype", lambda features: features.dtype)
    case = (6, 29, 13, 33, [29, 3, 17, 1, 29, 8])
    inputs = _gemm_inputs(case, dtype, seed=27, score_scale=4.0)
    if chunked:  # chunks of 5 labels: 33 = 6 × 5 + 3
        monkeypatch.setattr(la_module, "CHUNK_MAX_BYTES", 2 * 5 * 6 * 29 * 2)
        assert la_module._chunk_size(inputs[0], la_module._groups(inputs[4].tolist()), 33, dtype)[0] == 5
    grad = torch.randn(6, 33, device=DEVICE)
    run_and_compare(variant, *inputs, grad, 4.0 * torch.finfo(dtype).eps)


def test_label_chunk_sizes_fit_the_budget_and_balance():
    for budget, columns, num_labels in [(10 ** 6, 1000, 9000), (800, 10, 45), (1, 7, 5), (10 ** 9, 4, 3)]:
        size = la_module._label_chunk(budget, columns, num_labels, 4)
        chunks = -(-num_labels // size)
        assert 1 <= size <= num_labels
        assert 2 * size * columns * 4 <= max(budget, 2 * columns * 4)  # fits (one label at least)
        assert size * (chunks - 1) < num_labels <= size * chunks  # no empty chunk
        assert num_labels - size * (chunks - 1) >= size - chunks  # balanced: the last is nearly full


def test_chunk_budget_is_capped_by_free_memory(monkeypatch):
    assert la_module.free_memory_bytes(torch.device("cpu")) is None or la_module.free_memory_bytes(
        torch.device("cpu")) > 0
    monkeypatch.setattr(la_module, "free_memory_bytes", lambda device: 10 ** 9)
    assert la_module._budget(torch.device("cpu"), la_module.CHUNK_MAX_BYTES, 0.1) == 10 ** 8
    monkeypatch.setattr(la_module, "free_memory_bytes", lambda device: 10 ** 12)
    assert la_module._budget(torch.device("cpu"), la_module.CHUNK_MAX_BYTES, 0.1) == la_module.CHUNK_MAX_BYTES
    monkeypatch.setattr(la_module, "free_memory_bytes", lambda device: None)
    assert la_module._budget(torch.device("cpu"), la_module.CHUNK_MAX_BYTES, 0.1) == la_module.CHUNK_MAX_BYTES


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
    monkeypatch.setattr(la_module, "SAVED_MAX_BYTES", 2 * 45 * 3 * 37 * 4 - 1)  # one value short
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])
    assert saved_fwd.calls == 1  # fell back to recomputing
    monkeypatch.setattr(la_module, "SAVED_MAX_BYTES", 2 * 45 * 3 * 37 * 4)
    run_and_compare(variant, *inputs, grad, TOL[torch.float32])
    assert saved_fwd.calls == 2


@pytest.mark.skipif(DEVICE != "cpu", reason="tracks the CPU allocator")
def test_gemm_saved_memory_inference_and_training(monkeypatch):
    """Under no_grad "gemm_saved" allocates nothing near the 2·L·B·n kept values (only its label
    chunk, forced small here); in training it keeps exactly one such buffer."""
    monkeypatch.setattr(la_module, "_use_triton_reductions", lambda device, dtype: False)  # no interpreter copies
    batch, n, c, num_labels = 2, 300, 8, 400
    features, queries, weights, bias, lengths = make_inputs(batch, n, c, num_labels, torch.float32, seed=24)
    kept = 4 * 2 * num_labels * batch * n
    monkeypatch.setattr(la_module, "CHUNK_MAX_BYTES", kept // 16)
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
    monkeypatch.setattr(la_module, "_use_triton_reductions", lambda device, dtype: False)
    batch, n, c, num_labels = 3, 300, 8, 400
    features, queries, weights, bias, lengths = make_inputs(batch, n, c, num_labels, torch.float32, seed=25)
    budget = 4 * 2 * 32 * batch * n
    monkeypatch.setattr(la_module, "CHUNK_MAX_BYTES", budget)
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

@pytest.mark.parametrize("prefix", ["label_attention", "label_attention_chunked", "label_attention_gemm",
                                    "label_attention_gemm_saved"])
def test_opcheck(prefix):
    features, queries, weights, _, lengths = make_inputs(2, 9, 5, 3, torch.float32, seed=10)
    fwd = getattr(torch.ops.marn_fast, f"{prefix}_fwd")
    bwd = getattr(torch.ops.marn_fast, f"{prefix}_bwd")
    args = tuple(t.requires_grad_() for t in (features, queries, weights)) + (lengths,)
    torch.library.opcheck(fwd, args)
    outputs = fwd(*(t.detach() for t in args[:3]), lengths)  # (z, lse) or (z, lse, kept)
    torch.library.opcheck(bwd, (torch.randn(2, 3, device=DEVICE),) + tuple(t.detach() for t in args[:3])
                          + (lengths,) + tuple(outputs))


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
