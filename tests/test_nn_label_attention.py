"""marn_fast.nn.LabelWiseAttention and the keyed/unmasked forms of the reference label attention.

Every style ("marn", "caml", "laat") against a plain formula written here from the originals'
equations (einsum and an explicit max-subtracted softmax, in float64, from the module's own
weights), forward and backward, masked and unmasked, on odd shapes; fp32 inputs, bf16 inputs, and
fp32 inputs under CPU bf16 autocast. Tolerances are relative to the largest expected value:
|actual − expected| ≤ tol · max(1, max|expected|), with tol in TOL:
  fp32: every product and sum in fp32 — errors observed ≤ 1.1e-6; 2e-5 stated.
  bf16 (inputs, or autocast): the scores, keys and A·H GEMMs round to bf16 (8-bit mantissa,
        ε = 7.8e-3) — errors observed ≤ 1.2e-2 (every style, all through the fused op: "laat"
        with keys ≤ 9.9e-3); 4e-2 stated (the fused op's bf16 tolerance in
        tests/test_label_attention.py).
Also: loading the originals' state_dicts (aehrc/LAAT, PLM-ICD, CAML, MARN key names), init, bad
input, evidence top-k, every style running the fused op (spied on), and the overflow test (scores
at ±1e4 in half precision: the naive softmax overflows, the reference and the fused op do not).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from marn_fast import MARN, MARNConfig, reference
from marn_fast.nn import ORIGINAL_HEADS, STYLES, LabelWiseAttention, original_head_state_dict
from marn_fast.nn.label_attention import LAAT_INIT_STD
from marn_fast.ops import label_attention
from marn_fast.reference.model import LabelAttentionHead

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
PAD_VALUE = 30.0  # written into padded token states: with mask=True it must not change anything
# (B, n, C, L, d_a): one document of one token, odd sizes, more labels than tokens.
SHAPES = [(1, 1, 3, 2, 2), (3, 13, 10, 7, 5), (2, 33, 17, 65, 9)]


def make_head(style, c, num_labels, d_a, mask, seed):
    torch.manual_seed(seed)
    head = LabelWiseAttention(c, num_labels, style=style, d_a=d_a if style == "laat" else None, mask=mask)
    with torch.no_grad():  # weights at a scale that makes the softmax peaked but not saturated
        for name, p in head.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "weight" in name else 1.0))
    return head


def make_features(batch, n, c, mask, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, c, generator=g)
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    lengths[0] = n
    if batch > 1:
        lengths[1] = 1
    if mask:
        features[torch.arange(n)[None, :] >= lengths[:, None]] = PAD_VALUE
    return features, lengths


def plain_logits(style: str, p: dict, h: torch.Tensor, lengths, mask: bool) -> torch.Tensor:
    """Logits of a head with parameters `p` (the originals' names, float64) on token states h."""
    if style == "laat":
        keys = torch.tanh(torch.einsum("btc,dc->btd", h, p["first_linears.weight"]))
        q, w, b = p["second_linears.weight"], p["third_linears.weight"], p["third_linears.bias"]
    else:
        keys, q, w, b = h, p["U.weight"], p["final.weight"], p["final.bias"]
    s = torch.einsum("btd,ld->blt", keys, q)
    if mask and lengths is not None:
        valid = torch.arange(h.shape[1])[None, None, :] < lengths[:, None, None]
        s = torch.where(valid, s, torch.tensor(float("-inf"), dtype=s.dtype))
    e = torch.exp(s - s.amax(dim=2, keepdim=True))
    return torch.einsum("blt,btc,lc->bl", e / e.sum(dim=2, keepdim=True), h, w) + b


def plain(head: LabelWiseAttention, features: torch.Tensor, lengths, grad: torch.Tensor):
    """(logits, dfeatures, {name: dparameter}) of `plain_logits` in float64 from the head's weights."""
    h = features.detach().double().requires_grad_()
    p = {k: v.detach().double().requires_grad_() for k, v in head.state_dict().items()}
    out = plain_logits(head.style, p, h, lengths, head.mask)
    out.backward(grad.double())
    return out.detach(), h.grad, {k: v.grad for k, v in p.items()}


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} × {scale:.3g}"


def run_head(head, features, lengths, grad, autocast=False):
    """(logits, dfeatures, {name: dparameter}) of the module's forward."""
    head.zero_grad()
    f = features.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = head(f, lengths)
    out.backward(grad)
    return out.detach(), f.grad, {k: p.grad for k, p in head.named_parameters()}


# --------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mask", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-inputs"])
def test_forward_and_backward_match_the_plain_formula(style, shape, mask, precision):
    batch, n, c, num_labels, d_a = shape
    head = make_head(style, c, num_labels, d_a, mask, seed=sum(shape))
    features, lengths = make_features(batch, n, c, mask, seed=n)
    grad = torch.randn(batch, num_labels, generator=torch.Generator().manual_seed(1))
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    if precision == "bf16-inputs":  # the head casts its weights to the features' dtype
        features = features.to(torch.bfloat16)
    out, d_features, d_params = run_head(head, features, lengths, grad, autocast=precision == "bf16-autocast")
    want, want_features, want_params = plain(head, features, lengths, grad)
    assert out.dtype == torch.float32
    tol = TOL[dtype]
    assert_close(out, want, tol, "logits")
    assert_close(d_features, want_features, tol, "d features")
    for name, g in d_params.items():
        if name == "U.bias":  # CAML's U bias is never read
            assert g is None
            continue
        assert_close(g, want_params[name], tol, f"d {name}")


@pytest.mark.parametrize("style", STYLES)
def test_masked_padding_changes_nothing_and_unmasked_attends_to_it(style):
    head = make_head(style, 6, 5, 4, mask=True, seed=0)
    features, lengths = make_features(3, 9, 6, mask=True, seed=0)
    other = features.clone()
    other[torch.arange(9)[None, :] >= lengths[:, None]] = -7.0
    assert torch.equal(head(features, lengths), head(other, lengths))
    unmasked = make_head(style, 6, 5, 4, mask=False, seed=0)
    assert not torch.allclose(unmasked(features, lengths), unmasked(other, lengths))
    assert torch.equal(unmasked(features, lengths), unmasked(features, None))  # lengths not read


def test_gradient_of_a_sum_and_of_a_transposed_view():
    """Non-contiguous gradients and inputs (the expanded gradient of .sum(), a transposed view)."""
    head = make_head("laat", 8, 5, 3, mask=True, seed=2)
    features, lengths = make_features(2, 7, 8, mask=True, seed=2)
    transposed = features.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    head(transposed, lengths).sum().backward()
    _, want_features, want_params = plain(head, features, lengths, torch.ones(2, 5))
    assert_close(transposed.grad, want_features, TOL[torch.float32], "d features")
    assert_close(head.second_linears.weight.grad, want_params["second_linears.weight"], TOL[torch.float32], "d U")


@pytest.mark.parametrize("style", STYLES)
def test_reference_logits_is_the_plain_formula_and_forward_agrees(style):
    head = make_head(style, 10, 7, 5, mask=True, seed=3).double()
    features, lengths = make_features(3, 11, 10, mask=True, seed=3)
    features = features.double()
    want = plain_logits(style, {k: v.double() for k, v in head.state_dict().items()}, features, lengths, True)
    assert_close(head.reference_logits(features, lengths), want, 1e-12, "reference_logits")
    assert_close(head(features, lengths), want, 1e-10, "forward")
    assert head(features, lengths).dtype == torch.float64


@pytest.mark.parametrize("mask", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("style", STYLES)
def test_every_style_runs_the_fused_op(monkeypatch, style, mask):
    """forward reaches one of the fused op's registered forwards (spied on), with keys [B, n, d_a]
    for "laat" and None (MARN's form) for the others, lengths = n everywhere when unmasked, and
    never the plain formula (patched to fail)."""
    ops_module = importlib.import_module("marn_fast.ops.label_attention")
    nn_module = importlib.import_module("marn_fast.nn.label_attention")
    calls = []

    def spy(op):
        def call(features, queries, weights, lengths, keys):
            calls.append((keys, lengths))
            return op(features, queries, weights, lengths, keys)
        return call

    for name in ("_triton_fwd", "_chunked_fwd", "_gemm_fwd", "_gemm_saved_fwd"):
        monkeypatch.setattr(ops_module, name, spy(getattr(ops_module, name)))

    def plain_formula(*args, **kwargs):
        raise AssertionError("the plain formula ran")

    for module in (ops_module, nn_module):
        monkeypatch.setattr(module, "reference_label_attention", plain_formula)
    head = make_head(style, 10, 7, 5, mask, seed=9)
    features, lengths = make_features(3, 11, 10, mask, seed=9)
    out = head(features, lengths)
    assert len(calls) == 1
    keys, seen_lengths = calls[0]
    assert (keys is None) == (style != "laat")
    if keys is not None:
        assert keys.shape == (3, 11, 5)
    assert torch.equal(seen_lengths, lengths if mask else torch.full((3,), 11))
    monkeypatch.undo()
    assert_close(out, head.reference_logits(features, lengths).double(), TOL[torch.float32], "logits")


# --------------------------------------------------------------------------------- the reference's keys and mask
def test_reference_keys_default_to_the_features_and_unmasked_ignores_lengths():
    g = torch.Generator().manual_seed(4)
    f, q, w, b = (torch.randn(3, 8, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g),
                  torch.randn(6, generator=g))
    lengths = torch.tensor([8, 1, 5])
    base = reference.label_attention(f, q, w, b, lengths)
    assert torch.equal(reference.label_attention(f, q, w, b, lengths, keys=f), base)
    assert torch.equal(reference.label_attention(f, q, w, b, lengths, mask=False),
                       reference.label_attention(f, q, w, b, None))
    keys = torch.randn(3, 8, 4, generator=g)
    q4 = torch.randn(6, 4, generator=g)
    alpha = reference.attention_weights(f, q4, lengths, keys=keys)
    assert alpha.shape == (3, 6, 8) and torch.allclose(alpha.sum(2), torch.ones(3, 6))
    assert (alpha[1, :, 1:] == 0).all() and (alpha[2, :, 5:] == 0).all()
    want = torch.einsum("blt,btc,lc->bl", alpha, f, w) + b
    assert torch.allclose(reference.label_attention(f, q4, w, b, lengths, keys=keys), want, atol=1e-6)


# --------------------------------------------------------------------------------- weights, init, originals
def test_state_dict_keys_and_shapes_per_style():
    c, num_labels = 12, 7
    shapes = {k: tuple(v.shape) for k, v in LabelWiseAttention(c, num_labels, "laat", d_a=5).state_dict().items()}
    assert shapes == {"first_linears.weight": (5, c), "second_linears.weight": (num_labels, 5),
                      "third_linears.weight": (num_labels, c), "third_linears.bias": (num_labels,)}
    assert LabelWiseAttention(c, num_labels, "laat").d_a == c  # d_a defaults to C, as LAAT and PLM-ICD
    caml = {k: tuple(v.shape) for k, v in LabelWiseAttention(c, num_labels, "caml").state_dict().items()}
    assert caml == {"U.weight": (num_labels, c), "U.bias": (num_labels,), "final.weight": (num_labels, c),
                    "final.bias": (num_labels,)}
    marn = LabelWiseAttention(c, num_labels, "marn").state_dict()
    ours = LabelAttentionHead(c, num_labels).state_dict()
    assert {k: v.shape for k, v in marn.items()} == {k: v.shape for k, v in ours.items()}


def test_initialisation_of_each_original():
    torch.manual_seed(0)
    laat = LabelWiseAttention(512, 400, "laat", d_a=256)
    for w in (laat.first_linears.weight, laat.second_linears.weight, laat.third_linears.weight):
        assert abs(w.mean().item()) < 0.003 and abs(w.std().item() / LAAT_INIT_STD - 1) < 0.02
    bound = 1 / 512 ** 0.5  # nn.Linear's default bias init, which LAAT keeps
    assert laat.third_linears.bias.abs().max() <= bound and laat.third_linears.bias.std() > bound / 3
    for style in ("marn", "caml"):
        head = LabelWiseAttention(512, 400, style)
        xavier = (6 / (512 + 400)) ** 0.5
        for w in (head.U.weight, head.final.weight):
            assert w.abs().max() <= xavier and abs(w.std().item() / (xavier / 3 ** 0.5) - 1) < 0.02


def _original_state(source: str, c: int, num_labels: int, d_a: int, seed: int) -> dict:
    """A state_dict named as the original model's (its encoder's keys and unused ones included)."""
    g = torch.Generator().manual_seed(seed)
    style, prefix, names = ORIGINAL_HEADS[source]
    shapes = {"first_linears.weight": (d_a, c), "second_linears.weight": (num_labels, d_a),
              "third_linears.weight": (num_labels, c), "third_linears.bias": (num_labels,),
              "U.weight": (num_labels, c), "U.bias": (num_labels,), "final.weight": (num_labels, c),
              "final.bias": (num_labels,)}
    state = {prefix + theirs: torch.randn(shapes[ours], generator=g) * 0.5 for theirs, ours in names.items()}
    state["encoder.weight_ih_l0"] = torch.randn(4, 3, generator=g)
    if source == "laat":
        state["attention.linear.weight"] = torch.randn(c, c, generator=g)  # built, never used by LAAT
    return state


@pytest.mark.parametrize("source", sorted(ORIGINAL_HEADS))
def test_an_original_checkpoints_head_loads_and_gives_its_logits(source):
    """The original's forward (the plain formula on its own tensors; LAAT and PLM-ICD mask nothing)
    equals the loaded module's."""
    c, num_labels, d_a = 10, 9, 6
    state = _original_state(source, c, num_labels, d_a, seed=5)
    style, prefix, names = ORIGINAL_HEADS[source]
    mask = style in ("marn", "caml")
    head = LabelWiseAttention.from_original(state, source, mask=mask)
    assert head.style == style and head.num_labels == num_labels and head.in_features == c
    features, lengths = make_features(3, 8, c, mask=False, seed=5)
    ours = {v: state[prefix + k].double() for k, v in names.items()}
    want = plain_logits(style, ours, features.double(), lengths, mask)
    assert_close(head(features, lengths), want, TOL[torch.float32], f"{source} logits")
    assert set(original_head_state_dict(state, source)) == set(head.state_dict())


def test_the_marn_models_head_loads_into_the_layer():
    torch.manual_seed(0)
    model = MARN(MARNConfig(vocab_size=30, num_icd=6, num_ccs=4, hidden_size=4), backend="reference")
    features, lengths = make_features(2, 7, 8, mask=True, seed=6)
    for head_name, prefix in (("icd_head", "icd_head."), ("ccs_head", "ccs_head.")):
        head = LabelWiseAttention.from_original(model.state_dict(), "marn", prefix=prefix)
        want = model._head_logits(getattr(model, head_name), features, lengths)
        assert_close(head(features, lengths), want.double(), TOL[torch.float32], head_name)


def test_bad_input_is_a_value_error_naming_the_argument():
    head = LabelWiseAttention(6, 4, "laat", d_a=3)
    cases = [(lambda: LabelWiseAttention(6, 4, "bert"), "style"), (lambda: LabelWiseAttention(0, 4), "in_features"),
             (lambda: LabelWiseAttention(6, 4, "marn", d_a=3), "d_a"),
             (lambda: LabelWiseAttention(6, 4, mask=1), "mask"),
             (lambda: head(torch.randn(2, 5, 7)), "features"), (lambda: head(torch.randn(5, 6)), "features"),
             (lambda: head(torch.randn(2, 5, 6), torch.tensor([5, 6])), "lengths"),
             (lambda: head(torch.randn(2, 5, 6).long()), "features"),
             (lambda: original_head_state_dict({}, "laat"), "state_dict"),
             (lambda: original_head_state_dict({}, "bert"), "source")]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            call()


@pytest.mark.parametrize("style", STYLES)
def test_topk_evidence_is_the_largest_attention_weights(style):
    head = make_head(style, 8, 6, 5, mask=True, seed=7)
    features, lengths = make_features(3, 10, 8, mask=True, seed=7)
    labels = torch.tensor([[0, 5], [2, 3], [1, 1]])
    indices, weights = head.topk(features, labels, 3, lengths)
    keys = head.keys(features)
    alpha = reference.attention_weights(features, head.queries, lengths, keys=keys).detach()
    chosen = torch.gather(alpha, 1, labels[:, :, None].expand(-1, -1, 10))
    want_weights, want_indices = chosen.topk(3, dim=2)
    padded = want_indices >= lengths[:, None, None]
    assert torch.equal(indices, want_indices.masked_fill(padded, -1))
    assert torch.allclose(weights, want_weights.masked_fill(padded, 0.0), atol=1e-6)


# --------------------------------------------------------------------------------- overflow (reference half)
def overflow_inputs(dtype: torch.dtype, keyed: bool, seed: int = 8):
    """(features, queries, weights, bias, lengths, keys) in `dtype` whose scores q·k reach ±1e4
    (queries scaled so; keys = tanh(H·W_aᵀ) for the keyed form, None otherwise)."""
    g = torch.Generator().manual_seed(seed)
    batch, n, c, num_labels = 3, 16, 8, 5
    features = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    keys = torch.tanh(features @ torch.randn(c, 6, generator=g, dtype=torch.float64)) if keyed else None
    k = features if keys is None else keys
    queries = torch.randn(num_labels, k.shape[2], generator=g, dtype=torch.float64)
    queries *= 1e4 / torch.einsum("ld,btd->blt", queries, k).abs().max()
    weights = torch.randn(num_labels, c, generator=g, dtype=torch.float64)
    bias = torch.randn(num_labels, generator=g, dtype=torch.float64)
    lengths = torch.tensor([n, 1, 9])
    cast = [t.to(dtype) for t in (features, queries, weights, bias)]
    return (*cast, lengths, None if keys is None else keys.to(dtype))


def naive_softmax_logits(features, queries, weights, bias, lengths, keys):
    """Label attention with the textbook softmax exp(s)/Σexp(s) of the half-precision scores."""
    k = features if keys is None else keys
    scores = torch.matmul(queries, k.transpose(1, 2))
    e = torch.exp(scores).masked_fill(torch.arange(k.shape[1])[None, None, :] >= lengths[:, None, None], 0)
    return ((torch.matmul(e / e.sum(2, keepdim=True), features)) * weights).sum(2) + bias


# The paths that must stay finite on those inputs: the reference (torch.softmax subtracts the max)
# and the fused op (its online softmax), on the CPU's static impl ("torch": the C++ tile forward).
OVERFLOW_PATHS = {
    "reference": lambda f, q, w, b, lengths, keys: reference.label_attention(f, q, w, b, lengths, keys=keys),
    "fused": lambda f, q, w, b, lengths, keys: label_attention(f, q, w, b, lengths, keys=keys),
}
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("keyed", [False, True], ids=["marn-form", "keyed"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_naive_softmax_of_half_precision_scores_overflows(dtype, keyed):
    inputs = overflow_inputs(dtype, keyed)
    scores = torch.matmul(inputs[1], (inputs[0] if inputs[5] is None else inputs[5]).transpose(1, 2))
    assert scores.abs().max() > 9e3 and torch.isfinite(scores).all()  # the scores themselves are fine
    assert not torch.isfinite(naive_softmax_logits(*inputs)).all()


@pytest.mark.parametrize("keyed", [False, True], ids=["marn-form", "keyed"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("path", sorted(OVERFLOW_PATHS))
@pytest.mark.filterwarnings("ignore:marn_fast. label attention computes float16")  # fp16 on the CPU: fp32
def test_label_attention_stays_finite_where_the_naive_softmax_overflows(path, dtype, keyed):
    """Finite, and each logit minus its bias a convex combination of the per-token values
    p_lt = w_l·h_t over valid tokens (what a softmax-weighted sum must be), to bf16 rounding."""
    features, queries, weights, bias, lengths, keys = overflow_inputs(dtype, keyed)
    out = OVERFLOW_PATHS[path](features, queries, weights, bias, lengths, keys)
    assert torch.isfinite(out).all()
    p = torch.einsum("btc,lc->blt", features.double(), weights.double())
    valid = torch.arange(p.shape[2])[None, None, :] < lengths[:, None, None]
    lo = p.masked_fill(~valid, float("inf")).amin(2)
    hi = p.masked_fill(~valid, float("-inf")).amax(2)
    z = out.double() - bias.double()
    slack = TOL[torch.bfloat16] * max(1.0, p.abs().max().item())
    assert (z >= lo - slack).all() and (z <= hi + slack).all()
