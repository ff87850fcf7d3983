"""Trainer, checkpoints, evaluation and prediction on a tiny synthetic corpus (CPU, seconds)."""
import warnings

import pytest
import torch

from marn_fast import MARN, MARNConfig
from marn_fast.data import SYNTHETIC_PRESETS, write_synthetic_corpus
from marn_fast.predict import Predictor
from marn_fast.training import (
    DataSettings,
    Experiment,
    TrainConfig,
    Trainer,
    load_checkpoint,
    predict_loader,
    save_checkpoint,
)
from marn_fast.training.evaluation import evaluate_checkpoint

HIDDEN = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    write_synthetic_corpus(folder, seed=3, **SYNTHETIC_PRESETS["test"])
    return folder


@pytest.fixture(scope="module")
def experiment(corpus):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Experiment(DataSettings(str(corpus), batch_size=8))


def make_model(exp, backend="auto", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), num_ccs=exp.num_ccs,
                     hidden_size=HIDDEN, **overrides)
    return MARN(cfg, backend=backend)


def fit(exp, out, backend="auto", resume=False, model=None, **train):
    values = dict(max_epochs=3, patience=10, progress=False, seed=0)
    values.update(train)
    trainer = Trainer(model or make_model(exp, backend), TrainConfig(**values), out, exp.metadata())
    state = trainer.fit(exp.loader("train"), exp.loader("dev"), resume=resume)
    return trainer, state


def test_loss_decreases_and_checkpoints_are_written(experiment, tmp_path):
    trainer, state = fit(experiment, tmp_path, max_epochs=4, lr=3e-3)
    losses = [r["train_loss"] for r in state.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    for name in ("best.pt", "last.pt"):
        payload = load_checkpoint(tmp_path / name)
        assert payload["icd_labels"] == experiment.icd_space.codes
        assert len(payload["vocab"]) + 2 == len(experiment.vocab)
    assert "train" in load_checkpoint(tmp_path / "last.pt") and "train" not in load_checkpoint(tmp_path / "best.pt")


def test_early_stopping_stops_after_patience(experiment, tmp_path):
    # A learning rate too small to move any metric: no epoch improves on the first.
    _, state = fit(experiment, tmp_path, max_epochs=20, patience=2, lr=1e-12)
    assert state.best_epoch == 0 and len(state.history) == 3


@pytest.mark.parametrize("matrices_only", [False, True])
def test_weight_decay_groups(experiment, tmp_path, matrices_only):
    """One AdamW step with zero gradients is pure decoupled decay, p <- p (1 - lr wd): every
    parameter shrinks by default; with decay_matrices_only, biases and BatchNorm affines keep
    their values (random non-zero ones here) while matrices and conv kernels shrink."""
    lr, wd = 0.1, 0.5
    model = make_model(experiment)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    config = TrainConfig(lr=lr, weight_decay=wd, decay_matrices_only=matrices_only, progress=False)
    trainer = Trainer(model, config, tmp_path, experiment.metadata())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None if not p.requires_grad else torch.zeros_like(p)
    trainer.optimizer.step()
    norm_affines = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)
                    for k in ("weight", "bias")}
    assert norm_affines  # the RAM's BatchNorms are there to be checked
    for name, p in model.named_parameters():
        if name not in before:
            continue
        kept = matrices_only and p.dim() < 2
        expected = before[name] if kept else before[name] * (1 - lr * wd)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)
        if name in norm_affines:
            assert kept == matrices_only


def test_resume_after_interruption_equals_an_uninterrupted_run(experiment, tmp_path):
    full, _ = fit(experiment, tmp_path / "full", max_epochs=3)
    fit(experiment, tmp_path / "cut", max_epochs=2)
    resumed, state = fit(experiment, tmp_path / "cut", max_epochs=3, resume=True)
    assert [r["epoch"] for r in state.history] == [1, 2, 3]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)


def test_fused_and_reference_backends_reach_the_same_dev_metrics(experiment, tmp_path):
    results = {}
    for backend in ("reference", "auto"):
        trainer, state = fit(experiment, tmp_path / backend, backend=backend, max_epochs=2)
        results[backend] = state.history[-1]["dev"]
    ref, fused = results["reference"], results["auto"]
    # Threshold-free metrics: within 0.5 point. Thresholded and top-k metrics on this tiny dev split
    # move in steps of one decision (1/#gold positives, 1/(5·#docs)), so: within one step or 0.5 point.
    gold = int(experiment.datasets["dev"].collate([experiment.datasets["dev"][i] for i in
                                                   range(len(experiment.datasets["dev"]))]).icd_targets.sum())
    docs = len(experiment.datasets["dev"])
    for key, tol in (("auc_micro", 0.005), ("map", 0.005), ("loss", 0.005),
                     ("f1_micro", max(0.005, 2 / gold)), ("p@5", max(0.005, 1 / (5 * docs)))):
        assert abs(ref[key] - fused[key]) <= tol, (key, ref[key], fused[key])


def test_nan_loss_stops_training_naming_the_step(experiment, tmp_path):
    model = make_model(experiment)
    with torch.no_grad():
        model.icd_head.final.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 0"):
        fit(experiment, tmp_path, model=model, max_epochs=1)


def test_checkpoint_is_atomic_and_refuses_garbage(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"config": {}, "model": {}, "vocab": [], "icd_labels": [],
                                                 "ccs_labels": []})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["format"].startswith("marn_fast.checkpoint")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_evaluate_and_predict_from_a_checkpoint(experiment, corpus, tmp_path):
    trainer, _ = fit(experiment, tmp_path, max_epochs=1)
    report = evaluate_checkpoint(tmp_path / "best.pt", split="test", threshold=0.5)
    direct = predict_loader(trainer.model, experiment.loader("test"), torch.device("cpu"))
    assert report["metrics"]["auc_micro"] == pytest.approx(
        __import__("marn_fast").metrics.evaluate(direct.icd_scores, direct.icd_targets)["auc_micro"])
    doc = experiment.corpus.split("test")[0]
    predictor = Predictor(tmp_path / "best.pt")
    [result] = predictor.predict([doc.text], top=4, evidence=3)
    assert len(result["codes"]) == 4
    probs = [c.probability for c in result["codes"]]
    assert probs == sorted(probs, reverse=True)
    assert all(c.code in experiment.icd_space for c in result["codes"])
    assert all(len(c.evidence) == 3 and all(t in doc.tokens for t, _ in c.evidence) for c in result["codes"])
    with pytest.raises(ValueError, match="texts"):
        predictor.predict([])


def test_evaluate_refuses_data_with_another_label_space(experiment, tmp_path, tmp_path_factory):
    fit(experiment, tmp_path, max_epochs=1)
    other = tmp_path_factory.mktemp("other")
    write_synthetic_corpus(other, seed=11, **{**SYNTHETIC_PRESETS["test"], "num_codes": 25})
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        evaluate_checkpoint(tmp_path / "best.pt", data_dir=str(other))


def test_degenerate_run_alarms():
    import numpy as np

    from marn_fast.training.alarms import degenerate_run_warnings, trivial_baseline_f1

    rng = np.random.default_rng(0)
    targets = (rng.random((20, 6)) < 0.3).astype(np.float32)
    targets[:, 0] = 1  # one very frequent code
    counts = np.array([50, 5, 4, 3, 2, 1])
    with pytest.warns(RuntimeWarning, match="every prediction is positive"):
        found = degenerate_run_warnings(np.full((20, 6), 0.9), targets, 0.5)
    assert found and "positive" in found[0]
    with pytest.warns(RuntimeWarning, match="every prediction is negative"):
        degenerate_run_warnings(np.full((20, 6), 0.1), targets, 0.5)
    with pytest.warns(RuntimeWarning, match="edge of its range"):
        degenerate_run_warnings(rng.random((20, 6)), targets, 0.001, tuned=True)
    with pytest.warns(RuntimeWarning, match="below the trivial baseline"):
        degenerate_run_warnings(1 - targets * 0.8 - 0.1, targets, 0.5, counts)  # anti-correlated scores
    assert 0 < trivial_baseline_f1(counts, targets) <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert degenerate_run_warnings(targets * 0.8 + 0.1, targets, 0.5, counts, tuned=True) == []


def test_run_writes_manifest_and_metrics(corpus, tmp_path):
    import json

    from marn_fast.training.run import train_and_report

    settings = DataSettings(str(corpus), batch_size=8)
    report = train_and_report(settings, {"hidden_size": HIDDEN}, TrainConfig(max_epochs=1, progress=False),
                              tmp_path, log=lambda line: None)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["hidden_size"] == HIDDEN and manifest["seeds"]["train"] == 0
    assert manifest["label_spaces"]["icd"]["size"] == report["data"]["icd_labels"]
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["backend"] == "auto"
    ran = {(row["op"], row["mode"]) for row in manifest["dispatch"]}  # the implementation each op ran
    assert {("bigru", "train"), ("ram", "train"), ("label_attention", "train"), ("bigru", "infer")} <= ran
    assert all(row["impl"] and row["source"] for row in manifest["dispatch"])
    assert manifest["preprocessing"]["max_length"] == settings.max_length
    assert json.loads((tmp_path / "metrics.json").read_text())["warnings"] == report["warnings"]
