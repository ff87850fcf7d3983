"""Importing official MARN checkpoints: the converted model gives the logits of a plain
re-statement of the official forward (full-length documents), and bad checkpoints are refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marn_fast.convert import from_official, import_official, official_config, official_embedding_to_ours

V, E, H, L, LC = 30, 6, 8, 5, 3  # vocabulary words, d_e, d_r, ICD and CCS labels


def _block(c_in, c_out, transposed):
    conv = nn.ConvTranspose1d if transposed else nn.Conv1d
    return nn.Sequential(conv(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm1d(c_out), nn.Tanh(),
                         conv(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm1d(c_out))


def official_state_dict(seed=0):
    """Exactly the official keys and shapes (RNNmodel_MTL with RAM), random values and BN stats."""
    g = torch.Generator().manual_seed(seed)
    c1, c2, c3 = 2 * H, H, H // 2
    modules = {"word_rep.embed": nn.Embedding(V + 2, E, padding_idx=0),
               "encoder": nn.GRU(E, H, batch_first=True, bidirectional=True),
               "output_layer.ram.down1": _block(c1, c2, False), "output_layer.ram.down2": _block(c2, c3, False),
               "output_layer.ram.lateral": _block(c3, c3, False), "output_layer.ram.up1": _block(c3, c2, True),
               "output_layer.ram.up2": _block(c2, c1, True),
               "output_layer.U": nn.Linear(c1, L), "output_layer.final": nn.Linear(c1, L),
               "output_layer.U_ccs": nn.Linear(c1, LC), "output_layer.final_ccs": nn.Linear(c1, LC)}
    sd = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                value = torch.randn(value.shape, generator=g) * 0.5
                if key.endswith("running_var"):
                    value = value.abs() + 0.5
            sd[f"{prefix}.{key}"] = value
    return sd


def official_forward(sd, x):
    """The official RNNmodel_MTL forward in eval mode, restated with functional calls."""
    emb = F.embedding(x, sd["word_rep.embed.weight"])
    gru = nn.GRU(E, H, batch_first=True, bidirectional=True)
    gru.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    h = gru(emb)[0].transpose(1, 2)

    def block(name, y, transposed):
        p = f"output_layer.ram.{name}."
        conv = F.conv_transpose1d if transposed else F.conv1d
        for conv_i, bn_i, act in ((0, 1, True), (3, 4, False)):
            y = conv(y, sd[p + f"{conv_i}.weight"], padding=1)
            y = F.batch_norm(y, sd[p + f"{bn_i}.running_mean"], sd[p + f"{bn_i}.running_var"],
                             sd[p + f"{bn_i}.weight"], sd[p + f"{bn_i}.bias"], training=False)
            y = torch.tanh(y) if act else y
        return y

    d1 = block("down1", h, False)
    l1 = block("lateral", block("down2", d1, False), False)
    u1 = block("up1", l1, True) + d1
    o = torch.tanh(block("up2", u1, True) * h).transpose(1, 2)

    def head(u, final):
        alpha = F.softmax(sd[u + ".weight"].matmul(o.transpose(1, 2)), dim=2)
        return sd[final + ".weight"].mul(alpha.matmul(o)).sum(dim=2).add(sd[final + ".bias"])

    return head("output_layer.U", "output_layer.final"), head("output_layer.U_ccs", "output_layer.final_ccs")


def to_our_ids(x):
    """Official ids (0 PAD, 1..V words, V+1 UNK) → marn_fast ids (0 PAD, 1 UNK, 2.. words)."""
    return torch.where(x == V + 1, torch.ones_like(x), torch.where(x > 0, x + 1, x))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_converted_model_gives_the_official_logits(backend):
    sd = official_state_dict()
    config = official_config(sd, num_icd=L, num_ccs=LC)
    model, unused = from_official(sd, config, backend=backend)
    assert unused == ["output_layer.U.bias", "output_layer.U_ccs.bias"]
    x = torch.randint(1, V + 2, (3, 11), generator=torch.Generator().manual_seed(1))
    want_icd, want_ccs = official_forward(sd, x)
    out = model.eval()(to_our_ids(x))
    # float32 with different summation orders: 1e-5.
    torch.testing.assert_close(out.icd_logits, want_icd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ccs_logits, want_ccs, atol=1e-5, rtol=1e-5)


def test_embedding_rows_are_permuted():
    w = torch.arange(5.0)[:, None]
    assert official_embedding_to_ours(w).flatten().tolist() == [0, 4, 1, 2, 3]


def test_refusals():
    sd = official_state_dict()
    with pytest.raises(ValueError, match="output_layer|icd_head.U.weight"):
        from_official(sd, official_config(sd, num_icd=L + 1, num_ccs=LC))
    partial = {k: v for k, v in sd.items() if not k.startswith("output_layer.final_ccs")}
    with pytest.raises(ValueError, match="lacks"):
        from_official(partial, official_config(sd, num_icd=L, num_ccs=LC))


def test_import_from_files(tmp_path):
    sd = official_state_dict(seed=3)
    torch.save(sd, tmp_path / "model.pth")
    (tmp_path / "vocab.csv").write_text("\n".join(f"w{i}" for i in range(V)) + "\n")
    (tmp_path / "labels.txt").write_text("\n".join(["401.9", "428.0", "99.10", "V45.81", "E878.8"]) + "\n")
    (tmp_path / "ccs.txt").write_text("98\n108\n216\n")
    model, meta, unused = import_official(tmp_path / "model.pth", tmp_path / "vocab.csv", tmp_path / "labels.txt",
                                          tmp_path / "ccs.txt")
    assert meta["icd_labels"][2] == "99.10" and model.config.num_ccs == 3 and len(unused) == 2
    (tmp_path / "short.csv").write_text("a\nb\n")
    with pytest.raises(ValueError, match="words"):
        import_official(tmp_path / "model.pth", tmp_path / "short.csv", tmp_path / "labels.txt", tmp_path / "ccs.txt")
