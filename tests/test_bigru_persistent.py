"""The persistent BiGRU (marn_fast.ops.bigru_persistent: CUDA kernels, and their step-exact CPU
twins here) against nn.GRU on a PackedSequence: forward and its own reverse-time backward.

Tolerances: float64 1e-10 (only the summation order differs: W_hh in blocks, G_h in one GEMM in
backward); float32 2e-5 relative to the largest value (fp32 state through up to 40 steps);
bf16 inputs (computed in fp32 from the bf16 values, output rounded to bf16) 1e-2.
"""
import pytest
import torch
from torch import nn

from marn_fast.ops.bigru_persistent import _gate_rows, _slices, persistent_bigru
from marn_fast.reference import packed_bigru as reference_bigru


def _case(batch, n, d_in, hidden, seed, dtype=torch.float64, lengths=None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = nn.GRU(d_in, hidden, batch_first=True, bidirectional=True).to(dtype)
    x = torch.randn(batch, n, d_in, generator=g, dtype=dtype, requires_grad=True)
    if lengths is None:
        lengths = torch.randint(1, n + 1, (batch,), generator=g)
        lengths[0] = n
    return gru, x, torch.as_tensor(lengths)


def _close(got, want, rel):
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item() / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch,n,d_in,hidden,slices,lengths", [
    (1, 1, 3, 2, 1, [1]),                 # one document of one token
    (1, 9, 4, 5, 2, [9]),                 # one document
    (4, 11, 5, 7, 3, [11, 1, 6, 10]),     # 7 units over 3 blocks (3, 2, 2 rows per gate)
    (5, 40, 6, 8, 4, None),               # random lengths
    (3, 13, 4, 6, 8, [13, 2, 7]),         # more blocks than some slices can fill
])
def test_matches_packed_nn_gru_forward_and_backward(dtype, rel, batch, n, d_in, hidden, slices, lengths):
    gru, x, lengths = _case(batch, n, d_in, hidden, seed=batch * 31 + n, dtype=dtype, lengths=lengths)
    want = reference_bigru(gru, x, lengths)
    got = persistent_bigru(x, lengths, gru._flat_weights, num_slices=slices)
    assert got.shape == want.shape == (batch, n, 2 * hidden) and got.dtype == dtype
    _close(got, want, rel)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(n), dtype=dtype)
    leaves = [x, *gru.parameters()]
    for w, g in zip(torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
        _close(g, w, rel)


def test_padding_is_zero_and_never_read_and_reverse_starts_at_each_last_token():
    gru, x, lengths = _case(3, 8, 4, 5, seed=7, lengths=[8, 3, 1])
    out = persistent_bigru(x, lengths, gru._flat_weights)
    poisoned = x.detach().clone()
    for b, length in enumerate(lengths.tolist()):
        poisoned[b, length:] = 1e6
    torch.testing.assert_close(persistent_bigru(poisoned, lengths, gru._flat_weights), out, atol=0, rtol=0)
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(out[b, length:] == 0)
    # The reverse direction of document 1 (length 3) at its last token saw only that token: it
    # equals a one-token reverse GRU run on x[1, 2].
    single = persistent_bigru(x[1:2, 2:3], torch.tensor([1]), gru._flat_weights)
    torch.testing.assert_close(out[1, 2, 5:], single[0, 0, 5:], atol=1e-12, rtol=0)


def test_gradient_is_zero_past_lengths():
    gru, x, lengths = _case(2, 6, 3, 4, seed=5, lengths=[6, 2])
    persistent_bigru(x, lengths, gru._flat_weights).pow(2).sum().backward()
    assert torch.all(x.grad[1, 2:] == 0) and torch.any(x.grad[1, :2] != 0)


def test_no_lengths_means_full_documents():
    gru, x, _ = _case(2, 6, 3, 4, seed=3)
    full = torch.full((2,), 6, dtype=torch.int64)
    torch.testing.assert_close(persistent_bigru(x, None, gru._flat_weights),
                               persistent_bigru(x, full, gru._flat_weights), atol=0, rtol=0)


def test_bf16_inputs_use_fp32_state():
    gru, x, lengths = _case(3, 20, 5, 8, seed=9, dtype=torch.float32, lengths=[20, 13, 4])
    xb = x.detach().bfloat16()
    weights = [w.detach().bfloat16() for w in gru._flat_weights]
    got = persistent_bigru(xb, lengths, weights)
    assert got.dtype == torch.bfloat16
    want = persistent_bigru(xb.float(), lengths, [w.float() for w in weights])
    _close(got.float(), want, 1e-2)


def test_slices_cover_every_gate_row_once():
    for hidden, k in ((300, 10), (7, 3), (5, 8)):
        units = [u for block in _slices(hidden, k) for u in block]
        assert units == list(range(hidden))
        rows = torch.cat([_gate_rows(block, hidden) for block in _slices(hidden, k)])
        assert sorted(rows.tolist()) == list(range(3 * hidden))


def test_bad_input():
    gru, x, lengths = _case(2, 5, 3, 4, seed=1)
    with pytest.raises(ValueError, match="weights"):
        persistent_bigru(x, lengths, gru._flat_weights[:4])
    with pytest.raises(ValueError, match="lengths"):
        persistent_bigru(x, torch.tensor([0, 5]), gru._flat_weights)
    with pytest.raises(ValueError, match="num_slices"):
        persistent_bigru(x, lengths, gru._flat_weights, num_slices=0)


# ----------------------------------------------------------------- the CUDA kernels (GPU only)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("batch,n,hidden", [(1, 1, 4), (3, 37, 7), (13, 300, 300), (2, 32000, 64)])
def test_cuda_kernels_match_packed_nn_gru_fp32(batch, n, hidden):
    # fp32 with TF32 off on both sides: 1e-4 of the largest value over up to 32,000 steps.
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gru, x, lengths = _case(batch, n, 5, hidden, seed=n, dtype=torch.float32)
        gru, x = gru.cuda(), x.detach().cuda().requires_grad_()
        lengths = lengths.cuda()
        want = reference_bigru(gru, x, lengths)
        got = persistent_bigru(x, lengths, gru._flat_weights)
        _close(got, want, 1e-4)
        grad = torch.randn_like(want)
        leaves = [x, *gru.parameters()]
        for w, g in zip(torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
            _close(g, w, 1e-3)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


@requires_cuda
def test_cuda_kernels_match_their_cpu_twins_bf16():
    # bf16 inputs, fp32 state on both: the kernel and the CPU twin agree to fp32 rounding.
    gru, x, lengths = _case(5, 60, 6, 20, seed=3, dtype=torch.float32, lengths=[60, 1, 33, 59, 12])
    xb, weights = x.detach().bfloat16(), [w.detach().bfloat16() for w in gru._flat_weights]
    cpu = persistent_bigru(xb.requires_grad_(), lengths, weights)
    xc = xb.detach().cuda().requires_grad_()
    gpu = persistent_bigru(xc, lengths.cuda(), [w.cuda() for w in weights])
    _close(gpu.float().cpu(), cpu.float(), 1e-2)
    g = torch.randn(cpu.shape, dtype=torch.float32).bfloat16()
    (dx_cpu,) = torch.autograd.grad(cpu, [xb], g)
    (dx_gpu,) = torch.autograd.grad(gpu, [xc], g.cuda())
    _close(dx_gpu.float().cpu(), dx_cpu.float(), 2e-2)


def test_ops_bigru_routes_persistent_and_rejects_unknown_impl():
    gru, x, lengths = _case(3, 9, 4, 5, seed=11, lengths=[9, 4, 2])
    from marn_fast import ops
    torch.testing.assert_close(ops.bigru(x, lengths, gru._flat_weights, impl="persistent"),
                               persistent_bigru(x, lengths, gru._flat_weights), atol=0, rtol=0)
    with pytest.raises(ValueError, match="impl"):
        ops.bigru(x, lengths, gru._flat_weights, impl="cudnn")
