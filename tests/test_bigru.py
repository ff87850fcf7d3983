"""ops.bigru's implementations (reference, split, packed, persistent, cudnn_persistent) against
nn.GRU on a PackedSequence, forward and backward, each forced in turn (available_impls).

Tolerances: float64 1e-10 (the paths differ only in summation order; cudnn_persistent computes in
float64 on the CPU for float64 inputs, and its zero padding adds exact zeros); float32 2e-5 of the
largest value (cudnn_persistent's padding test on the CPU computes in fp32). On a GPU (TF32 off):
fp32 1e-4, except cudnn_persistent, which computes in fp16 there: 1e-2 of the largest value. bf16
(autocast and bf16 tensors) on the CPU: tests/test_bigru_bf16.py; under CUDA autocast below: 3e-2
(bf16 GEMMs, 8 significand bits, through 50 steps; cuDNN's own bf16 error is of that order).
"""
import pytest
import torch
from conftest import requires_cuda
from torch import nn

from marn_fast import ops
from marn_fast.ops.bigru import (
    IMPLS,
    PERSIST_MULTIPLE,
    _pad_gates,
    available_impls,
    packed_bigru,
    reverse_within_lengths_index,
    split_bigru,
)
from marn_fast.reference import packed_bigru as reference_bigru

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _case(batch, n, d_in, hidden, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = nn.GRU(d_in, hidden, batch_first=True, bidirectional=True).to(device, dtype)
    x = torch.randn(batch, n, d_in, generator=g, dtype=dtype).to(device).requires_grad_()
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    lengths[0] = n  # one full document, so the batch's n is really used
    return gru, x, lengths.to(device)


def _close(got, want, rel, what):
    scale = max(want.abs().max().item(), 1e-30)
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"


def _compare(fn, gru, x, lengths, rel):
    want = reference_bigru(gru, x, lengths)
    got = fn(x, lengths, gru._flat_weights)
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want, rel, "forward")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype).to(want.device)
    leaves = [x, *gru.parameters()]
    names = ["x"] + [name for name, _ in gru.named_parameters()]
    for name, w, g in zip(names, torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
        _close(g, w, rel, f"grad {name}")


_gru, _x, _lengths = _case(2, 3, 2, 2, seed=0)
CPU_IMPLS = available_impls(_x, _lengths, _gru._flat_weights)


def test_available_impls_on_the_cpu():
    assert set(CPU_IMPLS) == {"reference", "split", "persistent", "cudnn_persistent"}
    gru, x, lengths = _case(2, 5, 3, 4, seed=1)
    with pytest.raises(ValueError, match="packed.*CUDA"):
        ops.bigru(x, lengths, gru._flat_weights, impl="packed")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n,d_in,hidden", [(1, 1, 3, 2), (4, 9, 5, 3), (5, 17, 4, 6)])
def test_each_impl_matches_packed_nn_gru(impl, dtype, batch, n, d_in, hidden):
    gru, x, lengths = _case(batch, n, d_in, hidden, seed=batch * 100 + n, dtype=dtype)
    _compare(lambda *a: ops.bigru(*a, impl=impl), gru, x, lengths, TOL[dtype])


@pytest.mark.parametrize("impl", ["auto", *CPU_IMPLS])
def test_no_lengths_means_full_documents(impl):
    gru, x, _ = _case(2, 6, 3, 4, seed=3)
    full = torch.full((2,), 6, dtype=torch.int64)
    torch.testing.assert_close(ops.bigru(x, full, gru._flat_weights, impl=impl),
                               ops.bigru(x, None, gru._flat_weights, impl=impl), atol=TOL[torch.float64], rtol=0)


def test_auto_is_split_on_the_cpu_and_packed_helper_is_the_reference():
    gru, x, lengths = _case(3, 8, 4, 5, seed=2)
    torch.testing.assert_close(ops.bigru(x, lengths, gru._flat_weights),
                               split_bigru(x, lengths, gru._flat_weights), atol=0, rtol=0)
    torch.testing.assert_close(packed_bigru(x, lengths, gru._flat_weights), reference_bigru(gru, x, lengths),
                               atol=0, rtol=0)


def test_padded_weights_keep_each_gate_block_in_place():
    hidden, padded, d_in, padded_in = 3, 8, 2, 5
    w = torch.randn(3 * hidden, d_in)
    p = _pad_gates(w, hidden, padded, padded_in)
    assert p.shape == (3 * padded, padded_in)
    for gate in range(3):
        block = p[gate * padded:(gate + 1) * padded]
        torch.testing.assert_close(block[:hidden, :d_in], w[gate * hidden:(gate + 1) * hidden], atol=0, rtol=0)
        assert torch.all(block[hidden:] == 0) and torch.all(block[:, d_in:] == 0)
    b = torch.randn(3 * hidden)
    assert torch.equal(_pad_gates(b, hidden, padded).reshape(3, padded)[:, :hidden], b.reshape(3, hidden))


def test_cudnn_persistent_pads_to_multiples_of_128():
    # hidden 130 → 256 and input 3 → 128: padded units stay exactly 0, the real ones are unchanged.
    # (Under autocast it follows autocast on the CPU like "split": tests/test_bigru_bf16.py.)
    gru, x, lengths = _case(2, 4, 3, 130, seed=4, dtype=torch.float32)
    assert PERSIST_MULTIPLE == 128
    want = reference_bigru(gru, x, lengths)
    got = ops.bigru(x, lengths, gru._flat_weights, impl="cudnn_persistent")
    _close(got, want, TOL[torch.float32], "forward")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_padding_is_zero_and_never_read(impl):
    gru, x, lengths = _case(3, 8, 4, 5, seed=7)
    lengths = torch.tensor([8, 3, 1])
    out = ops.bigru(x, lengths, gru._flat_weights, impl=impl)
    poisoned = x.detach().clone()
    for b, length in enumerate(lengths.tolist()):
        poisoned[b, length:] = 1e6
    again = ops.bigru(poisoned, lengths, gru._flat_weights, impl=impl)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(out[b, length:] == 0)


def test_reverse_starts_at_each_documents_last_token():
    index = reverse_within_lengths_index(torch.tensor([4, 2]), 5)
    assert index.tolist() == [[3, 2, 1, 0, 4], [1, 0, 2, 3, 4]]


def test_bad_input():
    gru, x, lengths = _case(2, 5, 3, 4, seed=1)
    with pytest.raises(ValueError, match="weights"):
        ops.bigru(x, lengths, gru._flat_weights[:4])
    with pytest.raises(ValueError, match="lengths"):
        ops.bigru(x, torch.tensor([0, 5]), gru._flat_weights)
    with pytest.raises(ValueError, match="x"):
        ops.bigru(x[0], lengths, gru._flat_weights)
    with pytest.raises(ValueError, match="impl"):
        ops.bigru(x, lengths, gru._flat_weights, impl="cudnn")
    with pytest.raises(ValueError, match="weights"):
        available_impls(x, lengths, gru._flat_weights[:4])
    assert "auto" in IMPLS and "auto" not in available_impls(x, lengths, gru._flat_weights)


# ----------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("batch,n,d_in,hidden", [(3, 37, 5, 7), (16, 300, 100, 300)])
def test_each_cuda_impl_matches_packed_nn_gru(no_tf32, batch, n, d_in, hidden):
    gru, x, lengths = _case(batch, n, d_in, hidden, seed=n, dtype=torch.float32, device="cuda")
    impls = available_impls(x, lengths, gru._flat_weights)
    assert {"reference", "split", "packed", "cudnn_persistent"} <= set(impls)
    for impl in impls:
        rel = 1e-2 if impl == "cudnn_persistent" else 1e-4
        x.grad = None
        _compare(lambda *a: ops.bigru(*a, impl=impl), gru, x, lengths, rel)


@requires_cuda
@pytest.mark.parametrize("impl", ["reference", "split", "packed", "cudnn_persistent", "persistent"])
def test_cuda_impls_under_autocast_match_fp32_nn_gru(no_tf32, impl):
    gru, x, lengths = _case(4, 50, 6, 67, seed=6, dtype=torch.float32, device="cuda")
    want = reference_bigru(gru, x, lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ops.bigru(x, lengths, gru._flat_weights, impl=impl)
    _close(got.float(), want, 3e-2, f"{impl} forward")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).cuda()
    leaves = [x, *gru.parameters()]
    pairs = zip(torch.autograd.grad(got.float(), leaves, grad), torch.autograd.grad(want, leaves, grad))
    for i, (g, w) in enumerate(pairs):
        assert g.dtype == torch.float32
        _close(g, w, 3e-2, f"{impl} gradient {i}")


@requires_cuda
@pytest.mark.parametrize("impl", ["split", "packed", "cudnn_persistent", "persistent"])
def test_cuda_impls_take_bf16(impl):
    gru, x, lengths = _case(4, 50, 6, 20, seed=5, dtype=torch.float32, device="cuda")
    xb, weights = x.detach().bfloat16().requires_grad_(), [w.detach().bfloat16() for w in gru._flat_weights]
    out = ops.bigru(xb, lengths, weights, impl=impl)
    assert out.dtype == torch.bfloat16
    _close(out.float(), packed_bigru(xb.float(), lengths, [w.float() for w in weights]), 2e-2, impl)
    out.float().pow(2).sum().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()
