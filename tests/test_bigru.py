"""The O(n) CPU BiGRU path and the packed path against nn.GRU on a PackedSequence."""
import pytest
import torch
from torch import nn

from marn_fast import ops
from marn_fast.ops.bigru import packed_bigru, reverse_within_lengths_index
from marn_fast.reference import packed_bigru as reference_bigru

# float64 throughout: the paths differ only in summation order, so 1e-10 is generous.
TOL = 1e-10


def _case(batch, n, d_in, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    gru = nn.GRU(d_in, hidden, batch_first=True, bidirectional=True).double()
    x = torch.randn(batch, n, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    lengths[0] = n  # one full document, so the batch's n is really used
    return gru, x, lengths


@pytest.mark.parametrize("batch,n,d_in,hidden", [(1, 1, 3, 2), (4, 9, 5, 3), (5, 17, 4, 6)])
@pytest.mark.parametrize("path", ["bigru", "packed"])
def test_matches_packed_nn_gru_forward_and_backward(batch, n, d_in, hidden, path):
    gru, x, lengths = _case(batch, n, d_in, hidden, seed=batch * 100 + n)
    want = reference_bigru(gru, x, lengths)
    fn = ops.bigru if path == "bigru" else packed_bigru
    got = fn(x, lengths, gru._flat_weights)
    assert got.shape == (batch, n, 2 * hidden)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *gru.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x, *gru.parameters()], grad)
    for w, g in zip(want_grads, got_grads):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_padding_is_zero_and_never_read():
    gru, x, lengths = _case(3, 8, 4, 5, seed=7)
    lengths = torch.tensor([8, 3, 1])
    out = ops.bigru(x, lengths, gru._flat_weights)
    poisoned = x.detach().clone()
    for b, length in enumerate(lengths.tolist()):
        poisoned[b, length:] = 1e6
    again = ops.bigru(poisoned, lengths, gru._flat_weights)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(out[b, length:] == 0)


def test_reverse_starts_at_each_documents_last_token():
    index = reverse_within_lengths_index(torch.tensor([4, 2]), 5)
    assert index.tolist() == [[3, 2, 1, 0, 4], [1, 0, 2, 3, 4]]


def test_full_lengths_equal_no_lengths():
    gru, x, _ = _case(2, 6, 3, 4, seed=3)
    full = torch.full((2,), 6, dtype=torch.int64)
    torch.testing.assert_close(ops.bigru(x, full, gru._flat_weights), ops.bigru(x, None, gru._flat_weights),
                               atol=TOL, rtol=0)


def test_bad_input():
    gru, x, lengths = _case(2, 5, 3, 4, seed=1)
    with pytest.raises(ValueError, match="weights"):
        ops.bigru(x, lengths, gru._flat_weights[:4])
    with pytest.raises(ValueError, match="lengths"):
        ops.bigru(x, torch.tensor([0, 5]), gru._flat_weights)
    with pytest.raises(ValueError, match="x"):
        ops.bigru(x[0], lengths, gru._flat_weights)
