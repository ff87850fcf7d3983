"""marn_fast.LAAT: its BiLSTM paths against nn.LSTM on the packed sequence, its backends against
each other, its loss, checkpoints that load as LAAT, and `marn-fast train --model laat` end to end
on a tiny synthetic corpus (CPU, seconds).

Tolerances: the O(n) split BiLSTM against the packed one in float64, forward and backward:
1e-12 (the same operations in another order; observed ≤ 1e-15). LAAT backend "auto" against
"reference" in fp32: 2e-5 relative (the same sums in fp32; the head's two paths are the same
formula today)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from marn_fast import LAAT, MARN, LAATConfig, MARNConfig
from marn_fast.cli import build_parser, main, resolve_model_options, settings_from_args
from marn_fast.config import LAAT_TRAINING
from marn_fast.config_files import apply_config
from marn_fast.data import SYNTHETIC_PRESETS, write_synthetic_corpus
from marn_fast.laat import packed_bilstm, split_bilstm
from marn_fast.predict import Predictor
from marn_fast.training import (
    CheckpointError,
    DataSettings,
    Experiment,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from marn_fast.training.evaluation import evaluate_checkpoint


def small_config(**overrides) -> LAATConfig:
    values = dict(vocab_size=40, num_icd=9, embed_dim=6, hidden_size=5, d_a=4)
    values.update(overrides)
    return LAATConfig(**values)


def tokens_and_lengths(batch=4, n=11, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([n, 1, 7, 4][:batch])
    tokens = torch.randint(2, vocab, (batch, n), generator=g)
    tokens[torch.arange(n)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


# --------------------------------------------------------------------------------- the model
def test_split_bilstm_equals_the_packed_lstm_forward_and_backward():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, batch_first=True, bidirectional=True).double()
    x = torch.randn(4, 11, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([11, 1, 7, 4])
    grad = torch.randn(4, 11, 10, dtype=torch.float64)
    results = []
    for fn in (packed_bilstm, split_bilstm):
        out = fn(lstm, x, lengths)
        results.append((out,) + torch.autograd.grad((out * grad).sum(), [x, *lstm.parameters()]))
    for want, got in zip(*results):
        assert (want - got).abs().max() <= 1e-12
    assert (results[1][0][1, 1:] == 0).all()  # zero past each length
    assert torch.equal(split_bilstm(lstm, x, None), packed_bilstm(lstm, x, None))


def test_backends_agree_and_state_dict_names():
    torch.manual_seed(0)
    reference = LAAT(small_config(), backend="reference")
    fast = LAAT(small_config(), backend="auto")
    fast.load_state_dict(reference.state_dict())
    assert list(reference.state_dict())[-4:] == ["icd_head.first_linears.weight", "icd_head.second_linears.weight",
                                                 "icd_head.third_linears.weight", "icd_head.third_linears.bias"]
    assert not reference.embedding.weight.requires_grad  # frozen word2vec, as LAAT's "static" mode
    tokens, lengths = tokens_and_lengths()
    targets = (torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    grads = []
    for model in (reference, fast):
        model.eval()
        out = model(tokens, lengths)
        assert out.ccs_logits is None and out.icd_logits.shape == (4, 9) and out.icd_logits.dtype == torch.float32
        loss = model.compute_loss(out, targets)
        grads.append([out.icd_logits.detach(), loss.detach()] + list(torch.autograd.grad(
            loss, [p for p in model.parameters() if p.requires_grad])))
    for want, got in zip(*grads):
        assert (want - got).abs().max() <= 2e-5 * max(1.0, want.abs().max().item())


def test_loss_is_bce_by_default_and_focal_on_request():
    torch.manual_seed(0)
    model = LAAT(small_config(), backend="reference").eval()  # no dropout: the same logits every call
    tokens, lengths = tokens_and_lengths()
    targets = (torch.rand(4, 9, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    out = model(tokens, lengths)
    assert torch.allclose(model.compute_loss(out, targets), F.binary_cross_entropy_with_logits(out.icd_logits, targets))
    focal = LAAT(small_config(loss="focal"), backend="auto").eval()
    focal.load_state_dict(model.state_dict())
    bce = F.binary_cross_entropy_with_logits(out.icd_logits, targets, reduction="none")
    want = (0.999 * (1 - torch.exp(-bce)) ** 2 * bce).mean()  # the official MARN focal form
    assert torch.allclose(focal.compute_loss(focal(tokens, lengths), targets), want, rtol=1e-5)
    with pytest.raises(ValueError, match="ccs_targets"):
        model.compute_loss(out, targets, targets)


def test_unmasked_attention_reproduces_laats_padding():
    """attention_mask=False: padded positions (H = 0 there, so k = tanh(0) = 0, score 0) take part
    in the softmax, as in the LAAT code; masked, a longer padding changes nothing."""
    torch.manual_seed(0)
    masked = LAAT(small_config(), backend="reference").eval()
    unmasked = LAAT(small_config(attention_mask=False), backend="reference").eval()
    unmasked.load_state_dict(masked.state_dict())
    tokens, lengths = tokens_and_lengths()
    longer = torch.cat([tokens, torch.zeros(4, 5, dtype=torch.int64)], dim=1)
    assert torch.allclose(masked(tokens, lengths).icd_logits, masked(longer, lengths).icd_logits, atol=1e-6)
    assert not torch.allclose(unmasked(tokens, lengths).icd_logits, unmasked(longer, lengths).icd_logits)
    features = unmasked.encode(longer, lengths)
    want = unmasked.icd_head.reference_logits(features, None)  # every position attended
    assert torch.allclose(unmasked(longer, lengths).icd_logits, want, atol=1e-6)


def test_config_round_trip_and_bad_values():
    config = small_config(dropout=0.1)
    assert LAATConfig.from_dict(config.to_dict()) == config and config.to_dict()["model"] == "laat"
    assert config.num_ccs == 0 and config.feature_size == 10
    defaults = LAATConfig(vocab_size=10, num_icd=3)
    assert (defaults.hidden_size, defaults.d_a, defaults.dropout, defaults.loss, defaults.embed_dim,
            defaults.max_length, defaults.freeze_embeddings) == (256, 512, 0.3, "bce", 100, 4000, True)
    for bad, name in (({"d_a": 0}, "d_a"), ({"loss": "mse"}, "loss"), ({"dropout": 1.0}, "dropout"),
                      ({"attention_mask": 1}, "attention_mask")):
        with pytest.raises(ValueError, match=name):
            small_config(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        LAATConfig.from_dict({**config.to_dict(), "use_ram": True})
    with pytest.raises(ValueError, match="config: expected a LAATConfig"):
        LAAT(MARNConfig(vocab_size=10, num_icd=3))
    with pytest.raises(ValueError, match="tokens"):
        LAAT(small_config())(torch.full((2, 3), 99))


# --------------------------------------------------------------------------------- training, checkpoints
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    write_synthetic_corpus(folder, seed=3, **SYNTHETIC_PRESETS["test"])
    return folder


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """Four epochs of a small LAAT on the synthetic corpus, data without CCS labels."""
    out = tmp_path_factory.mktemp("laat-run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = Experiment(DataSettings(str(corpus), batch_size=8, ccs="none"))
    torch.manual_seed(0)
    model = LAAT(LAATConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), hidden_size=8, d_a=8))
    trainer = Trainer(model, TrainConfig(max_epochs=4, patience=10, progress=False, lr=3e-3), out, exp.metadata())
    state = trainer.fit(exp.loader("train"), exp.loader("dev"))
    return exp, out, state


def test_trains_and_its_checkpoint_loads_as_laat(trained):
    exp, out, state = trained
    losses = [r["train_loss"] for r in state.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    payload = load_checkpoint(out / "best.pt")
    assert payload["config"]["model"] == "laat"
    model, _ = load_model(out / "best.pt", backend="reference")
    assert isinstance(model, LAAT) and model.backend == "reference"
    with pytest.raises(CheckpointError, match="model MARNConfig here vs LAATConfig"):
        load_model(out / "best.pt", config=MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space)))
    marn = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), hidden_size=4))
    save_checkpoint(out / "bad.pt", {**payload, "model": marn.state_dict()})
    with pytest.raises(CheckpointError, match="its weights do not fit"):
        load_model(out / "bad.pt")


def test_evaluate_and_predict_with_evidence(trained):
    exp, out, _ = trained
    report = evaluate_checkpoint(out / "best.pt", split="test", threshold=0.5)
    assert 0.0 <= report["metrics"]["f1_micro"] <= 1.0 and "ccs" not in report["metrics"]
    predictor = Predictor(out / "best.pt")
    text = " ".join(exp.corpus.split("test")[0].tokens[:60])
    (result,) = predictor.predict([text], top=3, evidence=4)
    assert len(result["codes"]) == 3
    tokens = set(text.split())
    for code in result["codes"]:
        assert 0.0 < code.probability < 1.0 and len(code.evidence) == 4
        assert all(token in tokens for token, _ in code.evidence)
        weights = [w for _, w in code.evidence]
        assert weights == sorted(weights, reverse=True)


# --------------------------------------------------------------------------------- the command line
def _args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_config(parser, args, argv)
    resolve_model_options(args)
    return args


def test_model_flag_defaults_follow_the_model(tmp_path):
    laat = _args(["train", "--model", "laat", "--out", str(tmp_path)])
    settings, train, options = settings_from_args(laat, tmp_path)
    assert settings.batch_size == LAAT_TRAINING["batch_size"] and train.patience == LAAT_TRAINING["patience"]
    assert settings.ccs == "none" and train.lr == 1e-3 and settings.max_length == 4000
    assert options == {"model": "laat", "hidden_size": 256, "embed_dim": 100, "dropout": 0.3, "loss": "bce",
                       "focal_alpha": 0.999, "focal_gamma": 2.0, "focal_balanced": False, "attention_mask": True}
    given = _args(["train", "--model", "laat", "--loss", "focal", "--d-a", "64", "--hidden-size", "32",
                   "--batch-size", "4", "--no-attention-mask", "--train-embeddings", "--out", str(tmp_path)])
    settings, _, options = settings_from_args(given, tmp_path)
    assert settings.batch_size == 4 and options["loss"] == "focal" and options["d_a"] == 64
    assert options["hidden_size"] == 32 and options["attention_mask"] is False
    assert options["freeze_embeddings"] is False
    marn = _args(["train", "--out", str(tmp_path)])
    settings, train, options = settings_from_args(marn, tmp_path)
    assert (options["hidden_size"], options["dropout"], options["loss"], settings.batch_size, train.patience) == (
        300, 0.2, "focal", 16, 10)


def test_laat_on_codiesp_applies_its_own_recipe(capsys):
    args = _args(["train", "--model", "laat", "--data", "codiesp", "--data-dir", "CODIESP"])
    out = capsys.readouterr().out
    assert "config: laat-codiesp-en-D.yaml" in out and "LAAT's defaults" in out
    assert (args.word2vec_epochs, args.metric, args.hidden_size, args.lr, args.batch_size) == (100, "map", 256, 1e-3, 8)
    spanish = _args(["train", "--model", "laat", "--data", "codiesp", "--data-dir", "X", "--language", "es"])
    assert spanish.language == "es" and "config: laat-codiesp-es-D.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "laat", "--no-ram"], "--no-ram apply to --model marn only"),
    (["--model", "laat", "--encoder", "cnn"], "--encoder apply to --model marn only"),
    (["--d-a", "8"], "--d-a and --no-attention-mask apply to --model laat only"),
])
def test_options_of_the_other_model_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_train_model_laat_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "laat", "--data", "caml", "--data-dir", str(corpus), "--out", str(out),
            "--epochs", "1", "--hidden-size", "8", "--d-a", "8", "--no-progress"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "model: LAAT backend=auto, C=16" in log and "L_ccs=0" in log
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["model"] == "laat" and config["data"]["ccs"] == "none" and config["train"]["patience"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and "ccs" not in metrics["test"]
    assert json.loads((out / "manifest.json").read_text())["model"]["model"] == "laat"
    assert main(["evaluate", str(out / "best.pt"), "--split", "dev"]) == 0
    assert "dev @" in capsys.readouterr().out
