"""The reference MARN and marn_fast.MARN: shapes, gradients, ablations, masking, losses,
bad input and state_dict interchange."""
import math

import pytest
import torch

import marn_fast
from marn_fast import MARN, MARNConfig, MARNOutput, reference

VOCAB = 60


def small_config(**overrides):
    values = dict(vocab_size=VOCAB, num_icd=7, num_ccs=4, embed_dim=6, hidden_size=8, dropout=0.0)
    values.update(overrides)
    return MARNConfig(**values)


def batch(b=3, n=13, vocab=VOCAB, seed=0, lengths=(13, 6, 1)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (b, n), generator=g)
    lengths = torch.tensor(lengths[:b])
    for i, length in enumerate(lengths.tolist()):
        tokens[i, length:] = 0
    return tokens, lengths


def targets(b, num, seed=0):
    g = torch.Generator().manual_seed(seed + 99)
    return (torch.rand(b, num, generator=g) < 0.3).float()


def both_models(cfg, seed=0):
    torch.manual_seed(seed)
    ref = reference.MARN(cfg)
    fused = MARN(cfg, backend="auto")
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_official_sizes_shapes_and_ram_channels():
    cfg = MARNConfig(vocab_size=VOCAB, num_icd=50, num_ccs=38)
    model = reference.MARN(cfg).eval()
    tokens, lengths = batch(2, 9, lengths=(9, 4))
    out = model(tokens, lengths)
    assert isinstance(out, MARNOutput)
    assert out.icd_logits.shape == (2, 50) and out.ccs_logits.shape == (2, 38)
    assert out.icd_logits.dtype == torch.float32
    ram = model.ram
    # 600→300→300, 300→150→150, 150→150→150, up 150→300→300, up 300→600→600.
    assert ram.down1[0].weight.shape == (300, 600, 3) and ram.down1[3].weight.shape == (300, 300, 3)
    assert ram.down2[0].weight.shape == (150, 300, 3) and ram.down2[3].weight.shape == (150, 150, 3)
    assert ram.lateral[0].weight.shape == (150, 150, 3) and ram.lateral[3].weight.shape == (150, 150, 3)
    assert isinstance(ram.up1[0], torch.nn.ConvTranspose1d) and ram.up1[0].weight.shape == (150, 300, 3)
    assert ram.up2[0].weight.shape == (300, 600, 3) and ram.up2[3].weight.shape == (600, 600, 3)
    assert all(m.bias is None for block in (ram.down1, ram.up2) for m in (block[0], block[3]))
    assert model.icd_head.U.weight.shape == (50, 600) and model.icd_head.final.weight.shape == (50, 600)
    assert model.icd_head.U.bias is None and model.icd_head.final.bias.shape == (50,)
    assert model.encoder.hidden_size == 300 and model.encoder.bidirectional


@pytest.mark.parametrize("freeze", [True, False])
def test_gradients_reach_every_trainable_parameter(freeze):
    cfg = small_config(freeze_embeddings=freeze)
    model = reference.MARN(cfg).train()
    tokens, lengths = batch()
    out = model(tokens, lengths)
    loss = model.compute_loss(out, targets(3, 7), targets(3, 4, seed=1))
    loss.backward()
    for name, p in model.named_parameters():
        if name == "embedding.weight":
            assert p.requires_grad is (not freeze)
            assert (p.grad is None) is freeze
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_ablation_switches():
    tokens, lengths = batch()
    no_mtl = reference.MARN(small_config(num_ccs=0))
    assert no_mtl.ccs_head is None and not any(k.startswith("ccs_head") for k in no_mtl.state_dict())
    assert no_mtl(tokens, lengths).ccs_logits is None
    no_ram = reference.MARN(small_config(use_ram=False))
    assert no_ram.ram is None and not any(k.startswith("ram.") for k in no_ram.state_dict())
    # Without RAM the heads read H itself: check against the encoder directly.
    no_ram.eval()
    h = reference.packed_bigru(no_ram.encoder, no_ram.embedding(tokens), lengths)
    want = reference.label_attention(h, no_ram.icd_head.U.weight, no_ram.icd_head.final.weight,
                                     no_ram.icd_head.final.bias, lengths)
    torch.testing.assert_close(no_ram(tokens, lengths).icd_logits, want)
    # RAM output: tanh(up2(U1) ⊙ H) by default, up2(U1) ⊙ H in the paper's form.
    torch.manual_seed(0)
    official = reference.MARN(small_config()).eval()
    paper = reference.MARN(small_config(ram_output_tanh=False)).eval()
    paper.load_state_dict(official.state_dict())
    h = torch.randn(2, 16, 5)
    torch.testing.assert_close(official.ram(h), torch.tanh(paper.ram(h)))
    assert not torch.allclose(official.ram(h), paper.ram(h))


def test_ram_works_with_and_without_the_ccs_branch():
    for num_ccs in (0, 4):
        model = reference.MARN(small_config(num_ccs=num_ccs)).train()
        tokens, lengths = batch()
        out = model(tokens, lengths)
        loss = model.compute_loss(out, targets(3, 7), targets(3, 4) if num_ccs else None)
        loss.backward()
        assert model.ram.down1[0].weight.grad is not None


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_tokens_beyond_lengths_do_not_change_logits(mode, backend):
    cfg = small_config()
    torch.manual_seed(1)
    model = reference.MARN(cfg) if backend == "reference" else MARN(cfg, backend=backend)
    getattr(model, mode)()
    tokens, lengths = batch()
    other = tokens.clone()
    for i, length in enumerate(lengths.tolist()):
        other[i, length:] = torch.randint(1, VOCAB, (tokens.shape[1] - length,))
    a, b = model(tokens, lengths), model(other, lengths)
    torch.testing.assert_close(a.icd_logits, b.icd_logits, atol=0, rtol=0)
    torch.testing.assert_close(a.ccs_logits, b.ccs_logits, atol=0, rtol=0)


def test_none_lengths_means_full_documents():
    model = reference.MARN(small_config()).eval()
    tokens, _ = batch(lengths=(13, 13, 13))
    full = torch.full((3,), 13, dtype=torch.int64)
    torch.testing.assert_close(model(tokens).icd_logits, model(tokens, full).icd_logits)


# ---------------------------------------------------------------- losses, hand-computed
LOGITS = [[0.0, 2.0, -1.5]]
TARGETS = [[1.0, 0.0, 1.0]]


def _bce(x, y):
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _official_focal(x, y, alpha, gamma):
    bce = _bce(x, y)
    return alpha * (1 - math.exp(-bce)) ** gamma * bce


def _balanced_focal(x, y, alpha, gamma):
    p = 1 / (1 + math.exp(-x))
    return -y * alpha * (1 - p) ** gamma * math.log(p) - (1 - y) * (1 - alpha) * p ** gamma * math.log(1 - p)


@pytest.mark.parametrize("form", ["focal", "balanced", "bce"])
def test_loss_forms_against_hand_computed_values(form):
    alpha, gamma = 0.25, 2.0
    cfg = small_config(num_icd=3, num_ccs=0, loss="bce" if form == "bce" else "focal",
                       focal_alpha=alpha, focal_gamma=gamma, focal_balanced=form == "balanced")
    per_element = {"focal": lambda x, y: _official_focal(x, y, alpha, gamma),
                   "balanced": lambda x, y: _balanced_focal(x, y, alpha, gamma),
                   "bce": _bce}[form]
    want = sum(per_element(x, y) for x, y in zip(LOGITS[0], TARGETS[0])) / 3
    out = MARNOutput(icd_logits=torch.tensor(LOGITS, dtype=torch.float64))
    y = torch.tensor(TARGETS, dtype=torch.float64)
    for model in both_models(cfg):
        assert model.compute_loss(out, y).item() == pytest.approx(want, rel=1e-12)


def test_multitask_loss_is_the_weighted_sum():
    cfg = small_config(lambda_icd=0.6, lambda_ccs=0.4)
    tokens, lengths = batch()
    y_icd, y_ccs = targets(3, 7), targets(3, 4, seed=5)
    for model in both_models(cfg):
        model.eval()
        out = model(tokens, lengths)
        icd_only = reference.focal_loss(out.icd_logits, y_icd)
        ccs_only = reference.focal_loss(out.ccs_logits, y_ccs)
        torch.testing.assert_close(model.compute_loss(out, y_icd, y_ccs), 0.6 * icd_only + 0.4 * ccs_only)


def test_official_focal_default_alpha_gamma():
    x = torch.tensor([[3.0, -2.0]])
    y = torch.tensor([[1.0, 1.0]])
    want = sum(_official_focal(a, b, 0.999, 2.0) for a, b in zip([3.0, -2.0], [1.0, 1.0])) / 2
    assert reference.focal_loss(x, y).item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda t, l: (t.float(), l), "tokens"),
    (lambda t, l: (t[0], l), "tokens"),
    (lambda t, l: (t.clone().fill_(VOCAB), l), "tokens"),
    (lambda t, l: (t.clone().fill_(-1), l), "tokens"),
    (lambda t, l: (t, l.int()), "lengths"),
    (lambda t, l: (t, l[:2]), "lengths"),
    (lambda t, l: (t, torch.tensor([13, 0, 1])), "lengths"),
    (lambda t, l: (t, torch.tensor([14, 6, 1])), "lengths"),
    (lambda t, l: (t, l[:, None]), "lengths"),
    (lambda t, l: (t[:, :0], None), "tokens"),
])
def test_bad_forward_input_raises_value_error(make, match):
    model = reference.MARN(small_config())
    tokens, lengths = batch()
    with pytest.raises(ValueError, match=match):
        model(*make(tokens, lengths))


def test_documents_longer_than_max_length_are_refused_not_truncated():
    model = reference.MARN(small_config(max_length=10))
    tokens, _ = batch(lengths=(13, 13, 13))
    with pytest.raises(ValueError, match="max_length"):
        model(tokens)


def test_bad_targets_raise_value_error():
    model = reference.MARN(small_config())
    tokens, lengths = batch()
    out = model(tokens, lengths)
    y_icd, y_ccs = targets(3, 7), targets(3, 4)
    with pytest.raises(ValueError, match="icd_targets"):
        model.compute_loss(out, y_icd[:, :5], y_ccs)
    with pytest.raises(ValueError, match="icd_targets"):
        model.compute_loss(out, y_icd * 2, y_ccs)
    with pytest.raises(ValueError, match="icd_targets"):
        model.compute_loss(out, y_icd.long(), y_ccs)
    with pytest.raises(ValueError, match="ccs_targets"):
        model.compute_loss(out, y_icd, y_ccs[:2])
    with pytest.raises(ValueError, match="ccs_targets"):
        model.compute_loss(out, y_icd, None)
    no_mtl = reference.MARN(small_config(num_ccs=0))
    with pytest.raises(ValueError, match="ccs_targets"):
        no_mtl.compute_loss(no_mtl(tokens, lengths), y_icd, y_ccs)
    with pytest.raises(ValueError, match="output"):
        model.compute_loss(out.icd_logits, y_icd, y_ccs)


def test_bool_and_uint8_targets_equal_float_targets():
    model = reference.MARN(small_config()).eval()
    tokens, lengths = batch()
    out = model(tokens, lengths)
    y_icd, y_ccs = targets(3, 7), targets(3, 4)
    want = model.compute_loss(out, y_icd, y_ccs)
    for dtype in (torch.bool, torch.uint8):
        torch.testing.assert_close(model.compute_loss(out, y_icd.to(dtype), y_ccs.to(dtype)), want)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="backend"):
        MARN(small_config(), backend="cuda")
    with pytest.raises(ValueError, match="config"):
        reference.MARN({"vocab_size": 10})


# ---------------------------------------------------------------- embeddings
def test_from_pretrained_normalises_rows_and_freezes():
    cfg = small_config()
    matrix = torch.randn(VOCAB, 6) * 5
    matrix[0] = 0
    model = MARN.from_pretrained(cfg, matrix)
    w = model.embedding.weight
    assert not w.requires_grad
    torch.testing.assert_close(w[1:].norm(dim=1), torch.ones(VOCAB - 1))
    assert torch.all(w[0] == 0)
    torch.testing.assert_close(w[5], matrix[5] / matrix[5].norm())
    with pytest.raises(ValueError, match="matrix"):
        model.set_embeddings(torch.randn(VOCAB, 7))


# ---------------------------------------------------------------- backends and state_dicts
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_loads_reference_state_dict_and_gives_the_same_logits(mode):
    cfg = small_config()
    ref, fused = both_models(cfg, seed=3)
    assert list(ref.state_dict()) == list(fused.state_dict())
    getattr(ref, mode)(), getattr(fused, mode)()
    tokens, lengths = batch(seed=4)
    a, b = ref(tokens, lengths), fused(tokens, lengths)
    # float32, different summation order on the fused paths: 1e-5.
    torch.testing.assert_close(b.icd_logits, a.icd_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.ccs_logits, a.ccs_logits, atol=1e-5, rtol=1e-5)
    y_icd, y_ccs = targets(3, 7), targets(3, 4)
    la, lb = ref.compute_loss(a, y_icd, y_ccs), fused.compute_loss(b, y_icd, y_ccs)
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-5)
    la.backward(), lb.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    if mode == "train":  # BatchNorm running statistics moved the same way
        for (name, buf), other in zip(ref.named_buffers(), fused.buffers()):
            torch.testing.assert_close(other, buf, atol=1e-6, rtol=1e-5, msg=name)


def test_state_dict_round_trip_fused_to_reference():
    cfg = small_config()
    torch.manual_seed(8)
    fused = MARN(cfg, backend="auto")
    ref = reference.MARN(cfg)
    ref.load_state_dict(fused.state_dict())
    tokens, lengths = batch(seed=9)
    torch.testing.assert_close(ref.eval()(tokens, lengths).icd_logits, fused.eval()(tokens, lengths).icd_logits,
                               atol=1e-5, rtol=1e-5)


def test_backend_is_kept_as_given():
    assert MARN(small_config()).backend == "auto"
    assert MARN(small_config(), backend="reference").backend == "reference"
    if marn_fast.ops.cpu_extension_available():
        assert MARN(small_config(), backend="fused").backend == "fused"


def test_backends_draw_the_same_dropout_masks_for_the_same_seed():
    cfg = small_config(dropout=0.3)
    ref, fused = both_models(cfg, seed=6)
    ref.train(), fused.train()
    tokens, lengths = batch(seed=2)
    torch.manual_seed(11)
    a = ref(tokens, lengths)
    torch.manual_seed(11)
    b = fused(tokens, lengths)
    torch.testing.assert_close(b.icd_logits, a.icd_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(encoder="cnn", num_filter_maps=10, filter_size=5),
    dict(encoder="multirescnn", num_filter_maps=6, multirescnn_filter_sizes=(3, 5)),
    dict(hidden_size=7),  # odd channel counts in RAM: 14 → 7 → 3, as the official int(C/2)
])
def test_other_encoders_and_odd_ram_channels(overrides):
    cfg = small_config(**overrides)
    ref, fused = both_models(cfg, seed=2)
    tokens, lengths = batch(seed=3)
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(fused, mode)()
        torch.manual_seed(4)
        a = ref(tokens, lengths)
        torch.manual_seed(4)
        b = fused(tokens, lengths)
        assert a.icd_logits.shape == (3, 7)
        torch.testing.assert_close(b.icd_logits, a.icd_logits, atol=1e-5, rtol=1e-5)
    # Tokens past each document's length are never read by the convolutions either.
    other = tokens.clone()
    other[1, 6:] = 5
    ref.eval()
    torch.testing.assert_close(ref(other, lengths).icd_logits, ref(tokens, lengths).icd_logits, atol=0, rtol=0)
    ref.train()
    loss = ref.compute_loss(ref(tokens, lengths), targets(3, 7), targets(3, 4))
    loss.backward()
    assert all(p.grad is not None for n, p in ref.named_parameters() if p.requires_grad), "every parameter trains"


def test_bf16_autocast_runs_on_every_backend():
    # bf16 autocast (the trainer's GPU default) on the CPU: both backends run forward and
    # backward; logits agree to bf16 precision (2e-2 absolute at these magnitudes).
    cfg = small_config()
    ref, fused = both_models(cfg, seed=5)
    tokens, lengths = batch(seed=6)
    logits = []
    for model in (ref, fused):
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, lengths)
            loss = model.compute_loss(out, targets(3, 7), targets(3, 4))
        loss.backward()
        assert torch.isfinite(loss) and model.icd_head.U.weight.grad is not None
        logits.append(out.icd_logits.float())
    torch.testing.assert_close(logits[1], logits[0], atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- the whole model on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_matches_reference_on_cuda_fp32(mode, no_tf32):
    # Odd sizes everywhere (n=45, C=2·11, L=131/17) and ragged lengths; TF32 off, so float32
    # agreement is to summation order: 1e-4 on logits and gradients.
    cfg = small_config(num_icd=131, num_ccs=17, embed_dim=10, hidden_size=11)
    ref, fused = both_models(cfg, seed=12)
    ref, fused = ref.cuda(), fused.cuda()
    getattr(ref, mode)(), getattr(fused, mode)()
    tokens, lengths = batch(b=5, n=45, seed=13, lengths=(45, 30, 1, 44, 7))
    tokens, lengths = tokens.cuda(), lengths.cuda()
    a, b = ref(tokens, lengths), fused(tokens, lengths)
    torch.testing.assert_close(b.icd_logits, a.icd_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.ccs_logits, a.ccs_logits, atol=1e-4, rtol=1e-4)
    y_icd, y_ccs = targets(5, 131).cuda(), targets(5, 17).cuda()
    la, lb = ref.compute_loss(a, y_icd, y_ccs), fused.compute_loss(b, y_icd, y_ccs)
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-4)
    lb.backward()  # the fused BiGRU asks cuDNN for a backward-capable forward even in eval mode
    if mode == "train":  # nn.GRU in eval mode on CUDA has no backward (cuDNN inference forward)
        la.backward()
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_matches_reference_on_cuda_bf16_autocast():
    # The trainer's GPU default. Both run under bf16 autocast; logits agree to bf16 rounding
    # (relative error of the logits below 2e-2 of their norm) and the losses within 2e-2.
    cfg = small_config(num_icd=131, num_ccs=17, embed_dim=10, hidden_size=11)
    ref, fused = both_models(cfg, seed=14)
    ref, fused = ref.cuda().train(), fused.cuda().train()
    tokens, lengths = batch(b=5, n=45, seed=15, lengths=(45, 30, 1, 44, 7))
    tokens, lengths = tokens.cuda(), lengths.cuda()
    y_icd, y_ccs = targets(5, 131).cuda(), targets(5, 17).cuda()
    outs, losses = [], []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens, lengths)
            loss = model.compute_loss(out, y_icd, y_ccs)
        loss.backward()
        assert torch.isfinite(loss)
        outs.append(out.icd_logits.float()), losses.append(loss.float())
    err = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert err < 2e-2, f"relative logit error {err:.3e}"
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)
    g_ref, g_fused = ref.icd_head.U.weight.grad, fused.icd_head.U.weight.grad
    assert (g_fused - g_ref).norm() / g_ref.norm() < 5e-2
