"""The RAM output fusion tanh(U ⊙ H), both implementations ("extension": the compiled op;
"torch", the CPU default), against a float64 PyTorch computation."""
import pytest
import torch

from marn_fast import ops

requires_ext = pytest.mark.skipif(not ops.cpu_extension_available(), reason="compiled extension not built")


@requires_ext
# Compared with a float64 PyTorch computation on the same inputs. float32: 1 − tanh² cancels near
# saturation, so gradients carry ~1e-7·|g·h| absolute error: atol 2e-5 at these magnitudes.
@pytest.mark.parametrize("impl", ["extension", "torch", "auto"])
@pytest.mark.parametrize("dtype,tol,rtol", [(torch.float64, 1e-12, 0.0), (torch.float32, 2e-5, 1e-5)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 1001), (2, 600, 37)])
def test_forward_backward_match_pytorch(impl, dtype, tol, rtol, shape):
    g = torch.Generator().manual_seed(sum(shape))
    u = (torch.randn(shape, generator=g, dtype=dtype) * 3).requires_grad_()
    h = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    u64, h64 = (t.detach().double().requires_grad_() for t in (u, h))
    got = ops.mul_tanh(u, h, impl=impl)
    want = torch.tanh(u64 * h64)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=rtol)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    got_grads = torch.autograd.grad(got, [u, h], grad)
    want_grads = torch.autograd.grad(want, [u64, h64], grad.double())
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=rtol)


@requires_ext
@pytest.mark.parametrize("impl", ["extension", "torch"])
def test_non_contiguous_inputs_and_expanded_gradient(impl):
    u = torch.randn(4, 9, 5, dtype=torch.float64).transpose(1, 2).requires_grad_()
    h = torch.randn(4, 5, 9, dtype=torch.float64).requires_grad_()
    out = ops.mul_tanh(u, h, impl=impl)
    torch.testing.assert_close(out, torch.tanh(u * h), atol=1e-12, rtol=0)
    du, dh = torch.autograd.grad(out.sum(), [u, h])  # expanded, stride-0 gradient
    t = torch.tanh(u * h)
    torch.testing.assert_close(du, (1 - t * t) * h, atol=1e-12, rtol=0)
    torch.testing.assert_close(dh, (1 - t * t) * u, atol=1e-12, rtol=0)


@requires_ext
def test_gradcheck_and_opcheck():
    u = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.mul_tanh(a, b, impl="extension"), (u, h))
    torch.library.opcheck(torch.ops.marn_fast.mul_tanh.default, (u, h))


def test_bad_input():
    u = torch.randn(2, 3)
    with pytest.raises(ValueError, match="u, h"):
        ops.mul_tanh(u, torch.randn(3, 2))
    with pytest.raises(ValueError, match="h"):
        ops.mul_tanh(u, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="u"):
        ops.mul_tanh(torch.ones(2, 3, dtype=torch.int64), u)
    with pytest.raises(ValueError, match="impl"):
        ops.mul_tanh(u, u, impl="cuda")
