"""The persistent BiGRU's C++ CPU kernels (csrc/cpu/gru_cpu.cpp) and the whole
`persistent_bigru` on the CPU.

1. The two ops against their step-by-step PyTorch oracle (`_recurrence_forward`,
   `_recurrence_backward` of marn_fast.ops.bigru_persistent). Tolerances, relative to the largest
   value: fp32 5e-6 (the kernels use ≤ 2-ulp exp/tanh and the vendor GEMM's summation order; measured
   ≤ 1.1e-6 over 300 steps), fp64 1e-12 (summation order only).
2. `persistent_bigru` (hence `ops.bigru(impl="persistent")`) against nn.GRU on a PackedSequence,
   forward and backward (x and all 8 weights): fp32 2e-5, fp64 1e-10, relative to the largest value.
   fp64 inputs are computed in fp64 by the same C++ kernels.
"""
import pytest
import torch
from torch import nn

from marn_fast import ops
from marn_fast.ops import cpu_extension_available
from marn_fast.ops.bigru_persistent import (
    _kernels,
    _recurrence_backward,
    _recurrence_forward,
    barrier_timeout_s,
    persistent_bigru,
)
from marn_fast.reference import packed_bigru as reference_bigru

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="needs the compiled extension marn_fast._C")

FORWARD = torch.ops.marn_fast.bigru_persistent_forward
BACKWARD = torch.ops.marn_fast.bigru_persistent_backward


def _close(got, want, rel):
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item() / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


def _recurrence_inputs(batch, steps_total, hidden, lengths, dtype, seed):
    """Random gx, W_hh, b_hh, dH for the ops, and hprev / gh built from the oracle's states."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    gx = torch.randn(2, batch, steps_total, 3 * hidden, generator=g, dtype=dtype)
    w_hh = torch.randn(2, 3 * hidden, hidden, generator=g, dtype=dtype) / hidden ** 0.5
    b_hh = torch.randn(2, 3 * hidden, generator=g, dtype=dtype)
    dout = torch.randn(2, batch, steps_total, hidden, generator=g, dtype=dtype)
    return gx, lengths, w_hh, b_hh, dout


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 5e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("batch,steps_total,hidden,lengths", [
    (1, 1, 2, [1]),                        # one token
    (1, 17, 7, [17]),                      # one full document
    (3, 40, 33, [40, 1, 23]),              # odd B, odd h, a length-1 document
    (5, 64, 20, [30, 64, 1, 63, 30]),      # unsorted lengths with ties
    (4, 96, 300, [96, 95, 2, 50]),         # the model's hidden size
])
def test_kernels_match_their_step_by_step_oracle(dtype, rel, batch, steps_total, hidden, lengths):
    gx, lengths, w_hh, b_hh, dout = _recurrence_inputs(batch, steps_total, hidden, lengths, dtype, seed=hidden)
    steps = int(lengths.max())
    want = _recurrence_forward(gx, lengths, w_hh, b_hh, steps, 3)
    got = FORWARD(gx, lengths, w_hh, b_hh, steps)
    assert got.shape == want.shape and got.dtype == dtype
    _close(got, want, rel)
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(got[:, b, length:] == 0) and torch.all(got[:, b, :length].abs().sum(-1) > 0)
    hprev = torch.nn.functional.pad(want[:, :, :-1], (0, 0, 1, 0))
    gh = torch.baddbmm(b_hh[:, None], hprev.view(2, -1, hidden), w_hh.transpose(1, 2)).view_as(gx)
    want_gx, want_gh = _recurrence_backward(dout, hprev, gx, gh, lengths, w_hh, steps, 3)
    got_gx, got_gh = BACKWARD(dout, hprev, gx, gh, lengths, w_hh, steps)
    _close(got_gx, want_gx, rel)
    _close(got_gh, want_gh, rel)
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(got_gx[:, b, length:] == 0) and torch.all(got_gh[:, b, length:] == 0)


def test_steps_below_the_longest_document_stop_the_recurrence_there():
    gx, lengths, w_hh, b_hh, dout = _recurrence_inputs(3, 12, 5, [12, 4, 9], torch.float64, seed=1)
    want = _recurrence_forward(gx, lengths, w_hh, b_hh, 7, 1)
    torch.testing.assert_close(FORWARD(gx, lengths, w_hh, b_hh, 7), want, atol=1e-12, rtol=0)
    assert torch.all(want[:, :, 7:] == 0)
    gh = gx.flip(-1).contiguous()  # any G_h: the backward takes it as given
    for got, ref in zip(BACKWARD(dout, want, gx, gh, lengths, w_hh, 7),
                        _recurrence_backward(dout, want, gx, gh, lengths, w_hh, 7, 1)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_one_or_two_threads_give_the_same_result():
    gx, lengths, w_hh, b_hh, dout = _recurrence_inputs(3, 30, 40, [30, 11, 29], torch.float32, seed=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            h = FORWARD(gx, lengths, w_hh, b_hh, 30)
            results.append((h, *BACKWARD(dout, h, gx, gx, lengths, w_hh, 30)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)


def test_ops_neither_mutate_nor_alias_their_inputs():
    gx, lengths, w_hh, b_hh, dout = _recurrence_inputs(2, 6, 4, [6, 3], torch.float32, seed=3)
    h = FORWARD(gx, lengths, w_hh, b_hh, 6)
    torch.library.opcheck(FORWARD, (gx, lengths, w_hh, b_hh, 6), test_utils="test_schema")
    torch.library.opcheck(BACKWARD, (dout, h, gx, gx, lengths, w_hh, 6), test_utils="test_schema")


def test_ops_reject_bad_input():
    gx, lengths, w_hh, b_hh, dout = _recurrence_inputs(2, 6, 4, [6, 3], torch.float32, seed=4)
    with pytest.raises(RuntimeError, match="gx must be"):
        FORWARD(gx[..., :-1], lengths, w_hh, b_hh, 6)
    with pytest.raises(RuntimeError, match="w_hh"):
        FORWARD(gx, lengths, w_hh.double(), b_hh, 6)
    with pytest.raises(RuntimeError, match="b_hh"):
        FORWARD(gx, lengths, w_hh, b_hh[:, :-1], 6)
    with pytest.raises(RuntimeError, match="steps"):
        FORWARD(gx, lengths, w_hh, b_hh, 7)
    with pytest.raises(RuntimeError, match="lengths"):
        FORWARD(gx, lengths.int(), w_hh, b_hh, 6)
    with pytest.raises(RuntimeError, match="lengths"):
        FORWARD(gx, torch.tensor([6, -1]), w_hh, b_hh, 6)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        FORWARD(gx.half(), lengths, w_hh.half(), b_hh.half(), 6)
    with pytest.raises(RuntimeError, match="hprev"):
        BACKWARD(dout, dout[:, :, :-1], gx, gx, lengths, w_hh, 6)
    with pytest.raises(RuntimeError, match="gh"):
        BACKWARD(dout, dout, gx, gx.double(), lengths, w_hh, 6)
    # The CUDA kernels' barrier arguments: the timeout's range is checked here too; nothing on the
    # CPU can be left out.
    with pytest.raises(RuntimeError, match=r"timeout_s must lie in \(0, 3600\], got 0"):
        FORWARD(gx, lengths, w_hh, b_hh, 6, 0.0)
    with pytest.raises(RuntimeError, match="absent_block .* must be -1 on the CPU, got 3"):
        BACKWARD(dout, dout, gx, gx, lengths, w_hh, 6, 2.0, 3)


# ----------------------------------------------------------------- persistent_bigru on the CPU
def _gru_case(batch, n, d_in, hidden, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = nn.GRU(d_in, hidden, batch_first=True, bidirectional=True).to(dtype)
    x = torch.randn(batch, n, d_in, generator=g, dtype=dtype, requires_grad=True)
    return gru, x, torch.as_tensor(lengths)


def test_cpu_path_runs_the_compiled_kernels():
    forward, backward = _kernels(torch.device("cpu"), 4)
    assert forward.func is FORWARD and backward.func is BACKWARD
    assert forward.keywords == backward.keywords == {"timeout_s": barrier_timeout_s()}


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch,n,d_in,hidden,lengths", [
    (1, 1, 3, 2, [1]),
    (1, 50, 6, 7, [50]),
    (3, 41, 5, 33, [41, 1, 20]),
    (5, 129, 9, 16, [129, 1, 128, 60, 129]),
    (2, 300, 4, 12, [17, 300]),
])
def test_matches_packed_nn_gru_forward_and_backward(dtype, rel, batch, n, d_in, hidden, lengths):
    gru, x, lengths = _gru_case(batch, n, d_in, hidden, lengths, dtype, seed=batch * 7 + n)
    want = reference_bigru(gru, x, lengths)
    got = ops.bigru(x, lengths, gru._flat_weights, impl="persistent")
    assert got.shape == want.shape == (batch, n, 2 * hidden) and got.dtype == dtype
    _close(got, want, rel)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(n), dtype=dtype)
    leaves = [x, *gru.parameters()]
    for w, g in zip(torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
        assert g.shape == w.shape
        _close(g, w, rel)


@pytest.mark.parametrize("make_grad", [
    lambda out: torch.ones_like(out).expand_as(out),                               # gradient of .sum()
    lambda out: torch.randn(out.shape[::-1], dtype=out.dtype).permute(2, 1, 0),   # a transposed view
], ids=["expanded", "transposed"])
def test_non_contiguous_output_gradients(make_grad):
    gru, x, lengths = _gru_case(3, 19, 4, 6, [19, 5, 12], torch.float64, seed=8)
    want = reference_bigru(gru, x, lengths)
    got = persistent_bigru(x, lengths, gru._flat_weights)
    grad = make_grad(got)
    leaves = [x, *gru.parameters()]
    for w, g in zip(torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
        _close(g, w, 1e-10)


def test_frozen_input_or_frozen_weights():
    # The model's embedding is frozen: only the weights need gradients (dX is then not computed).
    gru, x, lengths = _gru_case(2, 15, 4, 5, [15, 8], torch.float64, seed=9)
    x = x.detach()
    want = torch.autograd.grad(reference_bigru(gru, x, lengths).sum(), list(gru.parameters()))
    got = torch.autograd.grad(persistent_bigru(x, lengths, gru._flat_weights).sum(), list(gru.parameters()))
    for w, g in zip(want, got):
        _close(g, w, 1e-10)
    # Frozen weights, x requiring a gradient.
    x.requires_grad_()
    weights = [w.detach() for w in gru._flat_weights]
    (want,) = torch.autograd.grad(reference_bigru(gru, x, lengths).sum(), [x])
    (got,) = torch.autograd.grad(persistent_bigru(x, lengths, weights).sum(), [x])
    _close(got, want, 1e-10)


def test_inference_keeps_no_graph():
    gru, x, lengths = _gru_case(2, 9, 3, 4, [9, 2], torch.float32, seed=10)
    with torch.no_grad():
        out = persistent_bigru(x, lengths, gru._flat_weights)
    assert out.grad_fn is None and not out.requires_grad
    _close(out, reference_bigru(gru, x, lengths).detach(), 2e-5)


def test_without_the_extension_the_python_twins_run(monkeypatch):
    import marn_fast.ops.bigru_persistent as module
    monkeypatch.setattr(module, "cpu_extension_available", lambda: False)
    forward, _ = module._kernels(torch.device("cpu"), 2)
    assert forward is not FORWARD
    gru, x, lengths = _gru_case(3, 11, 4, 5, [11, 1, 6], torch.float64, seed=11)
    want = reference_bigru(gru, x, lengths)
    got = persistent_bigru(x, lengths, gru._flat_weights, num_slices=2)
    _close(got, want, 1e-10)
    leaves = [x, *gru.parameters()]
    for w, g in zip(torch.autograd.grad(want.sum(), leaves), torch.autograd.grad(got.sum(), leaves)):
        _close(g, w, 1e-10)
