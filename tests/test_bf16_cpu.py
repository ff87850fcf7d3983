"""bf16 on the CPU: each fused op with bf16 inputs against the fp32 reference.

What runs: for CPU tensors the ops take their CPU paths (C++ extension or PyTorch, never
Triton, so the interpreter's bf16 `tl.dot` problem does not apply): they accept bf16 inputs,
accumulate in fp32, and return fp32 logits / loss (label attention, focal loss) or bf16 (RAM,
mul_tanh, in the parameters' dtype). The reference
gets the same bf16-rounded inputs upcast to fp32, so the tolerances bound the precision of the
computation alone: label attention and focal loss 2e-2 (relative, forward and gradients), the RAM
in bf16 end to end 6e-2, the whole model under bf16 autocast 5e-2 on the logits.
"""
import pytest
import torch

from marn_fast import MARN, MARNConfig, ops, reference
from marn_fast.ops.ram import ram_forward

BF16 = torch.bfloat16


def _rounded(*tensors):
    """(bf16 leaves, their fp32 copies) with the same values."""
    low = [t.to(BF16).requires_grad_(t.is_floating_point()) for t in tensors]
    high = [t.detach().float().requires_grad_(t.is_floating_point()) for t in low]
    return low, high


def _close(actual, expected, tol, what):
    actual = actual.float()
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.3g} (relative to {scale:.3g}) above {tol}"


def test_label_attention_bf16_matches_fp32_reference():
    torch.manual_seed(0)
    B, n, C, L = 3, 40, 32, 24
    lengths = torch.tensor([40, 23, 7])
    (f, q, w, b), (f32, q32, w32, b32) = _rounded(torch.randn(B, n, C), 0.3 * torch.randn(L, C),
                                                  0.3 * torch.randn(L, C), torch.randn(L))
    out = ops.label_attention(f, q, w, b, lengths)
    assert out.dtype == torch.float32  # fp32 logits from bf16 inputs (fp32 accumulation)
    ref = reference.label_attention(f32, q32, w32, b32, lengths)
    _close(out, ref, 2e-2, "logits")
    grad = torch.randn(B, L)
    out.backward(grad)
    ref.backward(grad)
    for name, low, high in (("features", f, f32), ("queries", q, q32), ("weights", w, w32), ("bias", b, b32)):
        assert low.grad.dtype == BF16
        _close(low.grad, high.grad, 2e-2, f"grad {name}")


@pytest.mark.parametrize("targets_dtype", [torch.float32, BF16, torch.bool])
@pytest.mark.parametrize("balanced", [False, True])
def test_focal_loss_bf16_matches_fp32_reference(targets_dtype, balanced):
    torch.manual_seed(1)
    (logits,), (logits32,) = _rounded(3 * torch.randn(8, 300))
    targets = torch.rand(8, 300) < 0.05
    loss = ops.focal_loss(logits, targets.to(targets_dtype), balanced=balanced)
    assert loss.dtype == torch.float32
    ref = reference.focal_loss(logits32, targets.float(), balanced=balanced)
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    loss.backward()
    ref.backward()
    assert logits.grad.dtype == BF16
    _close(logits.grad / logits32.grad.abs().max(), logits32.grad / logits32.grad.abs().max(), 2e-2, "grad")


def test_ram_bf16_matches_fp32_reference():
    torch.manual_seed(2)
    ram = reference.RAM(32).eval()
    for m in ram.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    h = torch.randn(2, 32, 30).to(BF16)
    expected = ram(h.float())
    out = ram_forward(ram.to(BF16), h)
    assert out.dtype == BF16
    _close(out, expected, 6e-2, "RAM output")


def test_mul_tanh_bf16_matches_fp32():
    torch.manual_seed(3)
    u, h = torch.randn(2, 16, 9).to(BF16), torch.randn(2, 16, 9).to(BF16)
    _close(ops.mul_tanh(u, h), torch.tanh(u.float() * h.float()), 2e-2, "mul_tanh")


def test_fused_model_under_bf16_autocast_matches_fp32_reference():
    torch.manual_seed(4)
    cfg = MARNConfig(vocab_size=60, num_icd=7, num_ccs=4, hidden_size=8, embed_dim=12, dropout=0.0)
    ref = reference.MARN(cfg).eval()
    fused = MARN(cfg, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    tokens = torch.randint(2, 60, (3, 20))
    lengths = torch.tensor([20, 13, 5])
    for b, length in enumerate(lengths.tolist()):
        tokens[b, length:] = 0
    with torch.no_grad():
        expected = ref(tokens, lengths)
        with torch.autocast("cpu", dtype=BF16):
            out = fused(tokens, lengths)
    _close(out.icd_logits, expected.icd_logits, 5e-2, "ICD logits")
    _close(out.ccs_logits, expected.ccs_logits, 5e-2, "CCS logits")


# The whole model under CPU autocast, every BiGRU implementation with each RAM and label-attention
# implementation that takes bf16 on the CPU (forced through MARN_FAST_IMPL), train and eval mode.
BIGRU_IMPLS = ("reference", "split", "persistent")
PATH_COMBOS = [(g, r, a) for g in BIGRU_IMPLS for r, a in (("vendor_conv", "gemm_saved"), ("reference", "torch"),
                                                        ("vendor_conv", "gemm"))]


@pytest.mark.parametrize("bigru,ram,attention", PATH_COMBOS)
@pytest.mark.parametrize("training", [True, False])
def test_fused_model_under_autocast_forward_and_backward(monkeypatch, bigru, ram, attention, training):
    """marn_fast.MARN under torch.autocast("cpu", bf16) at the tests' odd shapes (C = 18: RAM
    channels 18 → 9 → 4; lengths 20, 13, 1): logits within 5e-2 (relative to max(1, max|logit|),
    as above) of the fp32 reference on the same weights and batch, the loss within 5e-2, every
    trainable parameter's gradient finite and within 0.1 of the fp32 reference's (relative to its
    largest value: the RAM's BatchNorm over few tokens amplifies bf16 rounding)."""
    monkeypatch.setenv("MARN_FAST_IMPL", f"bigru={bigru},ram={ram},label_attention={attention}")
    torch.manual_seed(7)
    cfg = MARNConfig(vocab_size=60, num_icd=11, num_ccs=5, hidden_size=9, embed_dim=12, dropout=0.0)
    ref = reference.MARN(cfg).train(training)
    fused = MARN(cfg).train(training)
    fused.load_state_dict(ref.state_dict())
    tokens = torch.randint(2, 60, (3, 20))
    lengths = torch.tensor([20, 13, 1])
    for b, length in enumerate(lengths.tolist()):
        tokens[b, length:] = 0
    y_icd, y_ccs = (torch.rand(3, 11) < 0.3).float(), (torch.rand(3, 5) < 0.3).float()
    expected = ref(tokens, lengths)
    ref_loss = ref.compute_loss(expected, y_icd, y_ccs)
    ref_loss.backward()
    with torch.autocast("cpu", dtype=BF16):
        out = fused(tokens, lengths)
        loss = fused.compute_loss(out, y_icd, y_ccs)
    loss.backward()
    assert out.icd_logits.dtype == torch.float32 and loss.dtype == torch.float32
    _close(out.icd_logits, expected.icd_logits.detach(), 5e-2, "ICD logits")
    _close(out.ccs_logits, expected.ccs_logits.detach(), 5e-2, "CCS logits")
    assert abs(loss.item() - ref_loss.item()) <= 5e-2 * max(1.0, abs(ref_loss.item()))
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        if not p.requires_grad:
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        scale = q.grad.abs().max().clamp_min(1e-6)
        err = (p.grad - q.grad).abs().max() / scale
        assert err <= 0.1, f"grad {name}: error {err:.3g} relative to {scale:.3g}"
