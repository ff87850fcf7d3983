"""ops.bigru in bf16 on the CPU: every available implementation under
`torch.autocast("cpu", dtype=torch.bfloat16)` and with bf16 tensors given directly, forward and
backward (x and all 8 weight gradients), mixed lengths, odd hidden sizes (7, 33, 67: 67 is also a
partial last block of the CUDA kernels on 132 SMs), against nn.GRU in fp32 on a PackedSequence; the
dispatcher's bf16 keys; the model under autocast with the persistent BiGRU.

Tolerances, relative to the largest value of each tensor. bf16 keeps 8 significand bits (unit
roundoff 2⁻⁹ ≈ 2e-3): every input, weight and GEMM product is rounded once (≈ 2e-3 each), the GEMM
sums add a few such errors, and the recurrence carries them through the steps (n ≤ 40 here).
- torch's GRU ("reference", "split", "cudnn_persistent"; under autocast its GEMMs and gates in
  bf16 with an fp32 state, given bf16 tensors everything in bf16): measured at these shapes up to
  1.1e-2 forward and 2.3e-2 on gradients; bounds 2.5e-2 and 5e-2.
- "persistent" (bf16 GEMMs, fp32 recurrence): measured up to 5e-3 forward and 7e-3 on gradients;
  bound 1.5e-2 for both.
A forward error below 5e-4 under autocast means the impl did not compute in bf16 at all (fp32
gives ~1e-7): that fails too, so a path silently computing in fp32 cannot pass.
"""
import pytest
import torch
from torch import nn

from marn_fast import MARN, MARNConfig, ops, reference
from marn_fast.ops import bigru_persistent, dispatch
from marn_fast.ops.bigru import available_impls
from marn_fast.reference import packed_bigru as reference_bigru

BF16 = torch.bfloat16
TOL = {"persistent": (1.5e-2, 1.5e-2)}     # (forward, gradients)
TORCH_GRU_TOL = (2.5e-2, 5e-2)
BF16_FLOOR = 5e-4
CASES = [  # (batch, n, d_in, hidden, lengths)
    (4, 23, 6, 7, [23, 1, 12, 22]),
    (3, 17, 5, 67, [17, 9, 2]),
    (2, 40, 8, 33, [40, 21]),
]


def _case(batch, n, d_in, hidden, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = nn.GRU(d_in, hidden, batch_first=True, bidirectional=True)
    x = torch.randn(batch, n, d_in, generator=g, requires_grad=True)
    return gru, x, torch.tensor(lengths)


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _grads(out, leaves, seed):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, leaves, grad)


_gru, _x, _lengths = _case(2, 3, 2, 2, [3, 2], seed=0)
CPU_IMPLS = available_impls(_x, _lengths, _gru._flat_weights)


def test_every_impl_is_tested_here():
    assert set(CPU_IMPLS) == {"reference", "split", "persistent", "cudnn_persistent"}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("batch,n,d_in,hidden,lengths", CASES)
def test_under_cpu_autocast_matches_fp32_nn_gru(impl, batch, n, d_in, hidden, lengths):
    gru, x, lengths = _case(batch, n, d_in, hidden, lengths, seed=hidden + n)
    leaves = [x, *gru.parameters()]
    want = reference_bigru(gru, x, lengths)
    with torch.autocast("cpu", dtype=BF16):
        got = ops.bigru(x, lengths, gru._flat_weights, impl=impl)
    assert got.dtype == torch.float32  # x's dtype, as nn.GRU under CPU autocast
    forward_tol, grad_tol = TOL.get(impl, TORCH_GRU_TOL)
    err = _rel(got, want)
    assert BF16_FLOOR < err <= forward_tol, f"{impl} forward: relative error {err:.3g}"
    names = ["x"] + [name for name, _ in gru.named_parameters()]
    for name, g, w in zip(names, _grads(got, leaves, n), _grads(want, leaves, n)):
        assert g.dtype == torch.float32, name
        err = _rel(g, w)
        assert err <= grad_tol, f"{impl} grad {name}: relative error {err:.3g} > {grad_tol}"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("batch,n,d_in,hidden,lengths", CASES[:2])
def test_bf16_tensors_given_directly(impl, batch, n, d_in, hidden, lengths):
    # The fp32 reference sees the same bf16-rounded values, upcast: the error is the computation's.
    gru, x, lengths = _case(batch, n, d_in, hidden, lengths, seed=2 * hidden + n)
    xb = x.detach().to(BF16).requires_grad_()
    wb = [w.detach().to(BF16).requires_grad_() for w in gru._flat_weights]
    xr, wr = xb.detach().float().requires_grad_(), [w.detach().float().requires_grad_() for w in wb]
    got = ops.bigru(xb, lengths, wb, impl=impl)
    want = ops.bigru(xr, lengths, wr, impl="reference")
    assert got.dtype == BF16
    forward_tol, grad_tol = TOL.get(impl, TORCH_GRU_TOL)
    assert _rel(got, want) <= forward_tol
    for i, (g, w) in enumerate(zip(_grads(got, [xb, *wb], n), _grads(want, [xr, *wr], n))):
        assert g.dtype == BF16, i
        assert _rel(g, w) <= grad_tol, f"{impl} gradient {i}: relative error {_rel(g, w):.3g}"


def test_persistent_gemms_in_bf16_and_recurrence_in_fp32_under_autocast(monkeypatch):
    seen = []
    kernels = bigru_persistent._kernels

    def spy(device, num_slices):
        forward, backward = kernels(device, num_slices)

        def forward_spy(gx, lengths, w_hh, b_hh, steps):
            seen.append(("forward", gx.dtype, w_hh.dtype, b_hh.dtype))
            return forward(gx, lengths, w_hh, b_hh, steps)

        def backward_spy(dout, hprev, gx, gh, lengths, w_hh, steps):
            seen.append(("backward", dout.dtype, hprev.dtype, gx.dtype, gh.dtype, w_hh.dtype))
            return backward(dout, hprev, gx, gh, lengths, w_hh, steps)
        return forward_spy, backward_spy

    monkeypatch.setattr(bigru_persistent, "_kernels", spy)
    gru, x, lengths = _case(3, 9, 4, 5, [9, 4, 1], seed=3)
    with torch.autocast("cpu", dtype=BF16):
        out = ops.bigru(x, lengths, gru._flat_weights, impl="persistent")
    _grads(out, [x, *gru.parameters()], 1)
    assert seen == [("forward",) + (torch.float32,) * 3, ("backward",) + (torch.float32,) * 5]
    # ... and the GEMMs ran in bf16: G_x from bf16 x and W_ih differs from the fp32 product.
    assert _rel(out, reference_bigru(gru, x, lengths)) > BF16_FLOOR


def test_persistent_under_autocast_is_the_computation_bf16_tensors_get():
    # With x and the weights already bf16-representable, autocast (fp32 tensors) and bf16 tensors
    # given directly run the same computation: the same results up to the bf16 output's rounding.
    gru, x, lengths = _case(3, 15, 6, 11, [15, 7, 3], seed=4)
    xb = x.detach().to(BF16).requires_grad_()
    wb = [w.detach().to(BF16).requires_grad_() for w in gru._flat_weights]
    x32, w32 = xb.detach().float().requires_grad_(), [w.detach().float().requires_grad_() for w in wb]
    with torch.autocast("cpu", dtype=BF16):
        auto = ops.bigru(x32, lengths, w32, impl="persistent")
    direct = ops.bigru(xb, lengths, wb, impl="persistent")
    assert auto.dtype == torch.float32 and direct.dtype == BF16
    assert torch.equal(auto.to(BF16), direct)
    grad = torch.randn(auto.shape, generator=torch.Generator().manual_seed(5)).to(BF16)
    for a, d in zip(torch.autograd.grad(auto, [x32, *w32], grad.float()), torch.autograd.grad(direct, [xb, *wb], grad)):
        assert a.dtype == torch.float32 and d.dtype == BF16
        assert torch.equal(a.to(BF16), d)


# ------------------------------------------------------------------ the measured dispatcher
@pytest.fixture
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_MODE, "tune")
    monkeypatch.setenv(dispatch.ENV_INTERPRETED, "1")  # measure under TRITON_INTERPRET=1 too
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "cache.json"))
    monkeypatch.delenv(dispatch.ENV_FORCE, raising=False)
    monkeypatch.setattr(dispatch, "TABLES_DIR", tmp_path / "no-tables")
    dispatch.reset()
    yield
    dispatch.reset()


def test_dispatcher_keys_bf16_separately_and_measures_its_candidates(tuning):
    gru, x, lengths = _case(3, 12, 5, 6, [12, 7, 2], seed=6)
    ops.bigru(x, lengths, gru._flat_weights)
    with torch.autocast("cpu", dtype=BF16):
        out = ops.bigru(x, lengths, gru._flat_weights)
        ops.bigru(x, lengths, gru._flat_weights)  # the same key: no second measurement
    rows = {row["dtype"]: row for row in dispatch.choices() if row["op"] == "bigru"}
    assert set(rows) == {"float32", "bfloat16"}
    for row in rows.values():
        assert row["source"] == "measured" and row["mode"] == "train" and not row["rejected"]
        assert set(row["ms"]) == {"reference", "split", "persistent"}  # every candidate ran and passed the check
    assert out.dtype == torch.float32 and _rel(out, reference_bigru(gru, x, lengths)) <= TORCH_GRU_TOL[0]
    cached = dispatch.read_table(dispatch.cache_path(x.device))
    assert {key.split("|")[2] for key in cached if key.startswith("bigru|")} == {"float32", "bfloat16"}


def test_persistent_that_raises_is_rejected_by_the_measurement(tuning, monkeypatch):
    # What the dispatcher sees when a CUDA launch's grid barrier times out: the candidate raises
    # (the kernels' error names the cause); it is rejected and another impl is chosen.
    def timed_out(*args, **kwargs):
        raise RuntimeError("marn_fast::bigru_persistent_forward: the grid barrier timed out after 2 s")

    monkeypatch.setattr(bigru_persistent, "_kernels", lambda device, num_slices: (timed_out, timed_out))
    gru, x, lengths = _case(3, 12, 5, 6, [12, 7, 2], seed=7)
    with pytest.warns(RuntimeWarning, match="'persistent' rejected: RuntimeError: .*grid barrier timed out"):
        with torch.autocast("cpu", dtype=BF16):
            out = ops.bigru(x, lengths, gru._flat_weights)
    (row,) = [row for row in dispatch.choices() if row["op"] == "bigru"]
    assert row["impl"] != "persistent" and "grid barrier timed out" in row["rejected"]["persistent"]
    assert _rel(out, reference_bigru(gru, x, lengths)) <= TORCH_GRU_TOL[0]


# ------------------------------------------------------------------ the model
def test_model_trains_under_cpu_autocast_with_the_persistent_bigru(monkeypatch):
    # Issue 25's report: MARN under CPU autocast raised "expected float32 or float64 tensors, got
    # BFloat16" in the persistent BiGRU. Forward and backward now run; logits within 5e-2 of the
    # fp32 reference (bf16 through the whole model, as in tests/test_bf16_cpu.py).
    monkeypatch.setenv(dispatch.ENV_FORCE, "bigru=persistent")
    dispatch.reset()
    torch.manual_seed(8)
    cfg = MARNConfig(vocab_size=60, num_icd=7, num_ccs=4, hidden_size=9, embed_dim=12, dropout=0.0)
    ref = reference.MARN(cfg)
    fused = MARN(cfg, backend="auto")
    fused.load_state_dict(ref.state_dict())
    tokens = torch.randint(2, 60, (3, 20))
    lengths = torch.tensor([20, 13, 5])
    for b, length in enumerate(lengths.tolist()):
        tokens[b, length:] = 0
    expected = ref(tokens, lengths)
    try:
        with torch.autocast("cpu", dtype=BF16):
            out = fused(tokens, lengths)
    finally:
        choices = [row for row in dispatch.choices() if row["op"] == "bigru"]
        dispatch.reset()
    assert [(row["impl"], row["dtype"]) for row in choices] == [("persistent", "bfloat16")]
    for got, want in ((out.icd_logits, expected.icd_logits), (out.ccs_logits, expected.ccs_logits)):
        assert (got.float() - want).abs().max() / want.abs().max().clamp_min(1.0) <= 5e-2
    (out.icd_logits.float().sum() + out.ccs_logits.float().sum()).backward()
    gru_grads = [p.grad for name, p in fused.named_parameters() if name.startswith("encoder.")]
    assert len(gru_grads) == 8
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in gru_grads)
