"""Fuzzed arguments for every public op (hypothesis): marn_fast.ops.label_attention,
label_attention_with_lse, label_attention_topk, focal_loss, multitask_focal_loss, bigru, mul_tanh
and the RAM forward marn_fast.ops.ram.ram_forward.

Shapes (zero-sized and one-sized dimensions included), dtypes (every float width, int64, bool),
devices (cpu, meta, one argument on another device), memory layouts (contiguous, transposed,
strided slices, stride-0 expansions), lengths (valid, 0, past n, negative, int32, wrong shape),
NaN/inf values and the impl argument are drawn at random, mostly near valid arguments. Each call
either raises ValueError, or returns what the plain-PyTorch reference (marn_fast.reference) gives
for the same arguments, forward and (fp32/fp64) backward, within a tolerance per dtype:
never another exception, a crash, or a silent wrong answer. On the meta device a call that
works must return tensors of the reference's shapes and dtypes (values cannot be compared; checks
that read values are skipped there).

Budget and the long run: tests/fuzzing.py (MARN_FAST_FUZZ_LONG=1 pytest -m slow ...).
"""
import math

import pytest
import torch
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from marn_fast import reference
from marn_fast.kernels import interpreting
from marn_fast.ops import (
    bigru,
    focal_loss,
    label_attention,
    label_attention_topk,
    label_attention_with_lse,
    mul_tanh,
    multitask_focal_loss,
)
from marn_fast.ops.ram import ram_forward

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-5), torch.float16: (3e-2, 3e-2),
             torch.bfloat16: (8e-2, 8e-2)}


class Draws:
    """Random tensors from one seed, with the layout/device/value perturbations the fuzzing draws."""

    def __init__(self, data, seed: int) -> None:
        self.data = data
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, strategy):
        return self.data.draw(strategy)

    def randn(self, shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(tuple(shape), generator=self.gen, dtype=torch.float64) * scale).to(dtype)

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """The same values in another memory layout (non-contiguous) or as they are."""
        kind = self.draw(st.sampled_from(["contiguous"] * 3 + ["transposed", "strided", "expanded"]))
        if kind == "transposed" and t.dim() >= 2:
            return t.transpose(0, -1).contiguous().transpose(0, -1)
        if kind == "strided" and t.dim() >= 1:
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            wide[..., ::2] = t
            return wide[..., ::2]
        if kind == "expanded" and t.dim() >= 1 and t.shape[0] >= 1:
            return t[:1].expand(t.shape)  # stride 0: every row is the first
        return t


def lengths_for(d: Draws, batch: int, n: int):
    """Valid lengths (or None) mostly; sometimes out of range, of another dtype or shape."""
    kind = d.draw(st.sampled_from(["valid"] * 6 + ["none", "zero", "past_n", "negative", "int32", "shape", "float"]))
    if kind == "none" or batch == 0:
        return None if kind == "none" else torch.zeros(0, dtype=torch.int64)
    lengths = torch.randint(1, max(n, 1) + 1, (batch,), generator=d.gen)
    if kind == "zero":
        lengths[0] = 0
    elif kind == "past_n":
        lengths[-1] = n + 1
    elif kind == "negative":
        lengths[0] = -1
    elif kind == "int32":
        lengths = lengths.int()
    elif kind == "shape":
        lengths = lengths.repeat(2)
    elif kind == "float":
        lengths = lengths.float()
    return lengths


def on_device(d: Draws, tensors: dict) -> dict:
    """Everything on cpu (mostly), everything on meta, or one argument on meta."""
    kind = d.draw(st.sampled_from(["cpu"] * 5 + ["meta", "one_meta"]))
    if kind == "cpu":
        return tensors
    names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    moved = names if kind == "meta" else [d.draw(st.sampled_from(names))]
    return {k: (v.to("meta") if k in moved else v) for k, v in tensors.items()}


def poison(d: Draws, t: torch.Tensor) -> torch.Tensor:
    """Sometimes a NaN or an infinity in a float tensor."""
    if not t.is_floating_point() or t.numel() == 0 or not d.draw(st.integers(0, 9)) == 0:
        return t
    t = t.clone()
    t.view(-1)[0] = d.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return t


def outcome(call):
    """('ok', result) or ('refused', ValueError); any other exception fails the test."""
    try:
        return "ok", call()
    except ValueError as exc:
        return "refused", exc


def close(got, want, dtype, what):
    rtol, atol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if got.device.type == "meta" or want.device.type == "meta":
        assert got.shape == want.shape, (what, got.shape, want.shape)
        return
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True, msg=what)


def is_meta(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


def all_finite(*tensors) -> bool:
    return all(not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta"
               or bool(torch.isfinite(t).all()) for t in tensors)


def reference_or_none(call):
    """The reference's result, or None where it cannot say (it raises on input the op refuses)."""
    try:
        return call()
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
        return None


def valid_lengths(lengths, batch, n) -> bool:
    return lengths is None or (lengths.dtype == torch.int64 and tuple(lengths.shape) == (batch,)
                               and (lengths.device.type == "meta" or batch == 0
                                    or (int(lengths.min()) >= 1 and int(lengths.max()) <= n)))


# ----------------------------------------------------------------------------- label attention
def label_attention_args(d: Draws):
    batch, n, c, labels = (d.draw(st.integers(0, 3)), d.draw(st.integers(0, 9)), d.draw(st.integers(0, 8)),
                           d.draw(st.integers(0, 6)))
    dtype = d.draw(st.sampled_from(FLOATS + [torch.int64]))
    other = d.draw(st.sampled_from([dtype] * 4 + FLOATS))  # queries/weights may differ (cast inside)
    args = {"features": d.layout(poison(d, d.randn((batch, n, c), dtype if dtype.is_floating_point else
                                                     torch.float32).to(dtype))),
            "queries": d.layout(d.randn((labels, c), other)), "weights": d.layout(d.randn((labels, c), other)),
            "bias": d.layout(d.randn((labels,), other))}
    mismatch = d.draw(st.sampled_from([None] * 6 + ["queries", "weights", "bias", "ndim"]))
    if mismatch == "ndim":
        args["features"] = args["features"][0] if batch else args["features"][None]
    elif mismatch is not None:
        args[mismatch] = torch.cat([args[mismatch], args[mismatch][:1]]) if labels else args[mismatch][None]
    args["lengths"] = lengths_for(d, batch, n)
    return on_device(d, args), batch, n


def _lse_reference(features, queries, lengths):
    scores = torch.matmul(queries.to(features.dtype), features.transpose(1, 2)).double()
    if lengths is not None:
        scores = scores.masked_fill(~(torch.arange(features.shape[1], device=features.device)[None, None, :]
                                      < lengths[:, None, None]), -math.inf)
    return torch.logsumexp(scores, dim=2)


@fuzz(40)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(["auto", "auto", "torch", "triton", "cuda-only"]), with_lse=st.booleans())
def test_label_attention(data, seed, impl, with_lse):
    d = Draws(data, seed)
    args, batch, n = label_attention_args(d)
    if impl == "triton" and not interpreting():
        impl = "auto"
    grad = d.draw(st.booleans()) and args["features"].dtype in (torch.float32, torch.float64) and not is_meta(
        *args.values())
    if grad:
        for key in ("features", "queries", "weights"):
            args[key] = args[key].detach().requires_grad_(args[key].is_floating_point())
    op = label_attention_with_lse if with_lse else label_attention
    status, result = outcome(lambda: op(**args, impl=impl))
    if status == "refused":
        return
    logits, lse = result if with_lse else (result, None)
    f, q, w, b, lengths = (args[k] for k in ("features", "queries", "weights", "bias", "lengths"))
    assert valid_lengths(lengths, batch, n), f"accepted lengths {lengths} for [B={batch}, n={n}]"
    want_dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
    assert logits.shape == (batch, q.shape[0]) and logits.dtype == want_dtype, (logits.shape, logits.dtype)
    compute = torch.float64 if f.dtype == torch.float64 else torch.float32
    cast = {k: (v.detach().to(compute) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}
    want = reference_or_none(lambda: reference.label_attention(**cast))
    assert want is not None, "the op accepted arguments the reference cannot compute"
    close(logits, want, f.dtype, "logits")
    if lse is not None:
        close(lse, _lse_reference(cast["features"], cast["queries"], cast["lengths"]), f.dtype, "lse")
    if grad and all_finite(f, q, w, b):
        g = d.randn(logits.shape, logits.dtype)
        got = torch.autograd.grad(logits, (f, q, w), g)
        ref_in = [t.detach().to(f.dtype).clone().requires_grad_() for t in (f, q, w)]
        want_logits = reference.label_attention(*ref_in, b.detach().to(f.dtype), lengths)
        for name, x, y in zip("fqw", got, torch.autograd.grad(want_logits, ref_in, g)):
            close(x, y, f.dtype, f"d{name}")


@fuzz(30)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_label_attention_topk(data, seed):
    d = Draws(data, seed)
    args, batch, n = label_attention_args(d)
    args.pop("weights"), args.pop("bias")
    num_labels = args["queries"].shape[0] if args["queries"].dim() == 2 else 1
    k = d.draw(st.integers(-1, n + 1))
    rows = d.draw(st.sampled_from(["shared", "per_doc", "bad"]))
    picks = torch.randint(0, max(num_labels, 1), (batch, 2) if rows == "per_doc" else (2,), generator=d.gen)
    labels = picks + (num_labels if rows == "bad" else 0)
    labels = labels.to(args["features"].device) if d.draw(st.booleans()) else labels
    status, result = outcome(lambda: label_attention_topk(args["features"], args["queries"], labels, k,
                                                          args["lengths"]))
    if status == "refused":
        return
    indices, weights = result
    assert 1 <= k <= n and valid_lengths(args["lengths"], batch, n)
    assert indices.shape == weights.shape == (batch, 2, k) and indices.dtype == torch.int64
    if is_meta(args["features"], args["queries"], labels):
        return
    compute = torch.float64 if args["features"].dtype == torch.float64 else torch.float32
    f, q = args["features"].to(compute), args["queries"].to(compute)
    want_idx, want_w = reference.topk_evidence(f, q, labels, k, args["lengths"])
    close(weights, want_w, args["features"].dtype, "top-k weights")
    # Ties may order tokens differently: where the weights differ from their neighbours, the indices match.
    full = reference.attention_weights(f, q, args["lengths"])
    chosen = torch.gather(full, 1, (labels if labels.dim() == 2 else labels.expand(batch, -1))[:, :, None]
                          .expand(-1, -1, full.shape[2]))
    valid = indices >= 0
    if valid.any() and all_finite(f, q):
        gathered = torch.gather(chosen, 2, indices.clamp_min(0))[valid]
        close(gathered, weights[valid].to(compute), args["features"].dtype, "weights at the returned tokens")
    assert torch.equal(valid, want_idx >= 0)


# ----------------------------------------------------------------------------- focal loss
def focal_args(d: Draws, prefix=""):
    batch, labels = d.draw(st.integers(0, 4)), d.draw(st.integers(0, 7))
    dtype = d.draw(st.sampled_from(FLOATS + [torch.int64]))
    logits = poison(d, d.randn((batch, labels), torch.float64, scale=d.draw(st.sampled_from([1.0, 30.0]))))
    logits = logits.to(dtype) if dtype.is_floating_point else logits.round().to(dtype)
    kind = d.draw(st.sampled_from(["hard", "soft", "bool", "uint8", "out_of_range", "int64", "shape"]))
    targets = (torch.rand(batch, labels, generator=d.gen) < 0.3).to(torch.float64)
    if kind == "soft":
        targets = torch.rand(batch, labels, generator=d.gen, dtype=torch.float64)
    targets = {"bool": targets.bool(), "uint8": targets.to(torch.uint8), "int64": targets.long(),
               "out_of_range": targets * 2 - 0.5, "shape": targets.T}.get(kind, targets.to(
                   d.draw(st.sampled_from(FLOATS))))
    return {f"{prefix}logits": d.layout(logits), f"{prefix}targets": d.layout(targets)}


FOCAL_OPTIONS = st.fixed_dictionaries({
    "alpha": st.sampled_from([0.999, 0.25, 0.0, 1.0, -0.1, 1.5, math.nan]),
    "gamma": st.sampled_from([2.0, 0.0, 0.5, 5.0, -1.0, math.nan]),
    "balanced": st.booleans(), "reduction": st.sampled_from(["mean", "sum", "none", "avg"])})


def focal_reference(logits, targets, **options):
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return reference.focal_loss(logits.detach().to(compute), targets.to(compute), **options)


@fuzz(40)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), options=FOCAL_OPTIONS,
       impl=st.sampled_from(["auto", "torch", "triton", "nope"]))
def test_focal_loss(data, seed, options, impl):
    d = Draws(data, seed)
    args = on_device(d, focal_args(d))
    if impl == "triton" and not interpreting():
        impl = "auto"
    logits, targets = args["logits"], args["targets"]
    grad = logits.dtype in (torch.float32, torch.float64) and not is_meta(logits) and d.draw(st.booleans())
    if grad:
        logits = logits.detach().requires_grad_()
    check = d.draw(st.booleans())  # the [0, 1] range check runs only when asked (a host sync otherwise)
    status, loss = outcome(lambda: focal_loss(logits, targets, impl=impl, check_targets=check, **options))
    if status == "refused":
        return
    assert 0 <= options["alpha"] <= 1 and options["gamma"] >= 0 and options["reduction"] != "avg"
    assert logits.is_floating_point() and logits.shape == targets.shape and logits.numel() > 0
    want = reference_or_none(lambda: focal_reference(logits, targets, **options))
    assert want is not None, "the op accepted arguments the reference cannot compute"
    if check and not is_meta(targets):
        assert targets.dtype in (torch.bool, torch.uint8) or (0 <= targets.min() and targets.max() <= 1)
    close(loss, want, logits.dtype, "loss")
    if grad and all_finite(logits):
        g = d.randn(loss.shape, loss.dtype)
        got = torch.autograd.grad(loss, logits, g)[0]
        ref_in = logits.detach().clone().requires_grad_()
        want_grad = torch.autograd.grad(reference.focal_loss(ref_in, targets.to(logits.dtype), **options), ref_in, g)[0]
        close(got, want_grad, logits.dtype, "d logits")


@fuzz(25)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), options=FOCAL_OPTIONS,
       lambdas=st.tuples(st.sampled_from([0.7, 0.0, 1.5]), st.sampled_from([0.3, 0.0])))
def test_multitask_focal_loss(data, seed, options, lambdas):
    d = Draws(data, seed)
    args = on_device(d, {**focal_args(d, "icd_"), **focal_args(d, "ccs_")})
    status, loss = outcome(lambda: multitask_focal_loss(**args, lambda_icd=lambdas[0], lambda_ccs=lambdas[1],
                                                        **options))
    if status == "refused":
        return
    want = reference_or_none(lambda: lambdas[0] * focal_reference(args["icd_logits"], args["icd_targets"], **options)
                             + lambdas[1] * focal_reference(args["ccs_logits"], args["ccs_targets"], **options))
    assert want is not None, "the op accepted arguments the reference cannot compute"
    close(loss, want, args["icd_logits"].dtype, "multitask loss")


# ----------------------------------------------------------------------------- BiGRU
@fuzz(30)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), impl=st.sampled_from(["auto", "auto", "persistent", "x"]))
def test_bigru(data, seed, impl):
    d = Draws(data, seed)
    batch, n, embed, hidden = (d.draw(st.integers(0, 3)), d.draw(st.integers(1, 7)), d.draw(st.integers(1, 5)),
                               d.draw(st.integers(1, 4)))
    dtype = d.draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int64]))
    gru = torch.nn.GRU(embed, hidden, batch_first=True, bidirectional=True).to(
        dtype if dtype.is_floating_point else torch.float32)
    weights = [p.detach() for p in gru._flat_weights]
    drop = d.draw(st.sampled_from([None] * 6 + ["one_weight"]))  # x of another width than the weights: refused
    if drop == "one_weight":
        weights = weights[:-1]
    x = d.randn((batch, n, embed), torch.float64)
    x = d.layout(poison(d, x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)))
    args = {"x": x, "lengths": lengths_for(d, batch, n)}
    if impl != "persistent":  # the persistent path refuses meta tensors (below)
        args = on_device(d, args)
    weights = [w.to(args["x"].device) for w in weights]  # x and weights on one device (two: refused, below)
    status, out = outcome(lambda: bigru(args["x"], args["lengths"], weights, impl=impl))
    if status == "refused":
        return
    x, lengths = args["x"], args["lengths"]
    assert valid_lengths(lengths, batch, n) and impl in ("auto", "persistent")
    assert out.shape == (batch, n, 2 * hidden), out.shape
    if is_meta(x, lengths):
        return  # (the reference packs the sequence on the CPU: no meta twin; the shape was checked)
    want = reference_or_none(lambda: reference.packed_bigru(gru, x, lengths))
    if want is None:  # pack_padded_sequence cannot take an empty batch; the op returns an empty output
        assert batch == 0, "the op accepted arguments the reference cannot compute"
        return
    close(out, want, x.dtype, "bigru")


# ----------------------------------------------------------------------------- mul_tanh and the RAM
@fuzz(30)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1),
       shape=st.lists(st.integers(0, 5), max_size=4), other=st.sampled_from([None, "dtype", "shape"]))
def test_mul_tanh(data, seed, shape, other):
    d = Draws(data, seed)
    dtype = d.draw(st.sampled_from(FLOATS + [torch.int64, torch.bool]))
    u = d.layout(poison(d, d.randn(shape, torch.float64).to(dtype)))
    h = d.randn(shape if other != "shape" else shape + [2], torch.float64)
    h = d.layout(h.to(d.draw(st.sampled_from(FLOATS)) if other == "dtype" else dtype))
    args = on_device(d, {"u": u, "h": h})
    grad = dtype in (torch.float32, torch.float64) and not is_meta(*args.values()) and other is None
    if grad:
        args = {k: v.detach().requires_grad_() for k, v in args.items()}
    status, out = outcome(lambda: mul_tanh(**args))
    if status == "refused":
        return
    want = reference_or_none(lambda: torch.tanh(args["u"].detach() * args["h"].detach()))
    assert want is not None and out.dtype == args["u"].dtype == args["h"].dtype
    close(out, want, dtype, "mul_tanh")
    if grad and all_finite(*args.values()) and out.numel():
        g = d.randn(out.shape, out.dtype)
        got = torch.autograd.grad(out, (args["u"], args["h"]), g)
        ref_in = [t.detach().clone().requires_grad_() for t in (args["u"], args["h"])]
        for x, y in zip(got, torch.autograd.grad(torch.tanh(ref_in[0] * ref_in[1]), ref_in, g)):
            close(x, y, dtype, "mul_tanh grad")


@fuzz(15)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), channels=st.integers(4, 12),
       training=st.booleans(), output_tanh=st.booleans())
def test_ram_forward(data, seed, channels, training, output_tanh):
    d = Draws(data, seed)
    torch.manual_seed(seed)
    ram = reference.RAM(channels, output_tanh=output_tanh)
    for m in ram.modules():  # non-trivial running statistics and affines
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    ram.train(training)
    batch, n = d.draw(st.integers(0, 3)), d.draw(st.integers(1, 7))
    width = d.draw(st.sampled_from([channels] * 5 + [channels + 1]))
    # (an int dtype, or one other than the RAM's, is refused: tests below)
    dtype = d.draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    ram.to(dtype)
    h = d.layout(poison(d, d.randn((batch, width, n), dtype)))
    h = on_device(d, {"h": h})["h"]
    twin = reference.RAM(channels, output_tanh=output_tanh).to(next(ram.parameters()).dtype)
    twin.load_state_dict(ram.state_dict())
    twin.train(training)
    status, out = outcome(lambda: ram_forward(ram, h))
    if status == "refused":
        return
    assert width == channels and out.shape == h.shape
    want = reference_or_none(lambda: twin(h.to(next(twin.parameters()).dtype)))
    assert want is not None, "the op accepted arguments the reference cannot compute"
    close(out, want, h.dtype, "RAM output")
    if training and not is_meta(h) and all_finite(h):
        for (name, a), b in zip(ram.state_dict().items(), twin.state_dict().values()):
            close(a, b, torch.float32, f"running statistics {name}")


# ----------------------------------------------------------------------------- found by the fuzzing
# Crashes the fuzzing found inside ops' entry points, now refused with a ValueError.
def test_bigru_refuses_empty_sequences():
    gru = torch.nn.GRU(3, 2, batch_first=True, bidirectional=True)
    # (with lengths, check_lengths already refuses them: none lies in [1, 0])
    with pytest.raises(ValueError, match=r"x: expected at least one token \(n >= 1\), got shape \(2, 0, 3\)"):
        bigru(torch.randn(2, 0, 3), None, [p.detach() for p in gru._flat_weights])


def test_ram_forward_refuses_empty_sequences():
    ram = reference.RAM(8).eval()  # (in training the BatchNorm count check refuses it already)
    with pytest.raises(ValueError, match=r"h: expected at least one token \(n >= 1\), got shape \(2, 8, 0\)"):
        ram_forward(ram, torch.randn(2, 8, 0))


def test_bigru_refuses_weights_on_another_device():
    gru = torch.nn.GRU(3, 2, batch_first=True, bidirectional=True)
    with pytest.raises(ValueError, match="all tensors must be on one device, got x on meta, weights.0. on cpu"):
        bigru(torch.randn(2, 4, 3, device="meta"), None, [p.detach() for p in gru._flat_weights])


@pytest.mark.parametrize("training", [False, True])
def test_ram_forward_refuses_integer_input(training):
    ram = reference.RAM(8).train(training)
    with pytest.raises(ValueError, match="h: .*torch.int64"):
        ram_forward(ram, torch.randint(0, 3, (2, 8, 5)))


@pytest.mark.parametrize("with_lengths", [False, True])
def test_bigru_refuses_input_of_another_width(with_lengths):
    gru = torch.nn.GRU(3, 2, batch_first=True, bidirectional=True)
    lengths = torch.tensor([4, 2]) if with_lengths else None
    with pytest.raises(ValueError, match=r"x: expected \[B, n, d_e=3\] .* got shape \(2, 4, 5\)"):
        bigru(torch.randn(2, 4, 5), lengths, [p.detach() for p in gru._flat_weights])


def test_persistent_bigru_on_meta_is_refused():
    gru = torch.nn.GRU(3, 2, batch_first=True, bidirectional=True).to("meta")
    with pytest.raises(ValueError, match="meta tensors"):
        bigru(torch.randn(2, 4, 3, device="meta"), torch.tensor([4, 2], device="meta"),
              [p.detach() for p in gru._flat_weights], impl="persistent")


def test_ram_forward_refuses_another_dtype_than_its_parameters():
    ram = reference.RAM(8).eval()
    with pytest.raises(ValueError, match="h: expected dtype torch.float32 .* got torch.bfloat16"):
        ram_forward(ram, torch.randn(2, 8, 5, dtype=torch.bfloat16))
