"""`marn-fast evaluate --out`: the manifest beside the metrics, and the refusal of a checkpoint whose
label space or vocabulary differs from the data's (naming the difference)."""
import json
import warnings

import pytest
import torch

from marn_fast import MARN, MARNConfig
from marn_fast.data import SYNTHETIC_PRESETS, write_synthetic_corpus
from marn_fast.training import DataSettings, Experiment, save_checkpoint
from marn_fast.training.evaluation import evaluate_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    write_synthetic_corpus(folder, seed=3, **SYNTHETIC_PRESETS["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = Experiment(DataSettings(str(folder), batch_size=8))
    torch.manual_seed(0)
    model = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), num_ccs=exp.num_ccs,
                            hidden_size=8), backend="reference")
    return exp, model


def _checkpoint(path, exp, model, **metadata):
    return save_checkpoint(path, {"config": model.config.to_dict(), "model": model.state_dict(),
                                  **{**exp.metadata(), **metadata}})


def test_evaluate_writes_a_manifest_beside_its_metrics(setup, tmp_path):
    exp, model = setup
    ckpt = _checkpoint(tmp_path / "best.pt", exp, model)
    out = tmp_path / "eval" / "test.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate_checkpoint(ckpt, split="test", threshold=0.4, backend="reference", out=str(out))
    metrics = json.loads(out.read_text())
    assert metrics["threshold"] == 0.4 and "f1_micro" in metrics["metrics"]
    manifest = json.loads((tmp_path / "eval" / "test.manifest.json").read_text())
    assert report["manifest"] == str(tmp_path / "eval" / "test.manifest.json")
    assert manifest["kind"] == "evaluate" and manifest["checkpoint"] == str(ckpt.resolve())
    assert manifest["model"] == json.loads(json.dumps(model.config.to_dict())) and manifest["backend"] == "reference"
    assert manifest["threshold"] == 0.4 and manifest["threshold_source"] == "given" and manifest["split"] == "test"
    assert manifest["data"]["data_dir"] == exp.settings.data_dir and manifest["data"]["top50"] == "caml"
    assert manifest["label_spaces"]["icd"]["size"] == len(exp.icd_space)
    assert manifest["label_spaces"]["ccs"]["size"] == exp.num_ccs
    assert manifest["vocabulary"]["size"] == len(exp.vocab)
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["device"] and "commit" in manifest
    assert manifest["documents"]["test"] == len(exp.datasets["test"])


def test_evaluate_refuses_a_checkpoint_with_another_label_space_naming_it(setup, tmp_path):
    exp, model = setup
    codes = list(exp.icd_space.codes)
    fewer = codes[:-2]  # the data has two codes the checkpoint lacks
    small = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(fewer), num_ccs=exp.num_ccs, hidden_size=8),
                 backend="reference")
    ckpt = _checkpoint(tmp_path / "best.pt", exp, small, icd_labels=fewer)
    with pytest.raises(ValueError) as info:
        evaluate_checkpoint(ckpt, backend="reference")
    message = str(info.value)
    assert "does not match the checkpoint" in message and "ICD labels" in message
    assert f"the checkpoint has {len(fewer)}, the data {len(codes)}" in message
    assert str(codes[-2:]) in message  # the codes only in the data are named
    assert not (tmp_path / "best.manifest.json").exists()


def test_evaluate_refuses_a_checkpoint_with_another_vocabulary_naming_it(setup, tmp_path):
    exp, model = setup
    vocab = list(exp.metadata()["vocab"])
    vocab[0] = "zzzunseenword"
    ckpt = _checkpoint(tmp_path / "best.pt", exp, model, vocab=vocab)
    with pytest.raises(ValueError, match=r"words: the checkpoint has .*\['zzzunseenword'\]"):
        evaluate_checkpoint(ckpt, backend="reference")


def test_evaluate_cli_prints_the_manifest_path(setup, tmp_path, capsys):
    from marn_fast.cli import main

    exp, model = setup
    ckpt = _checkpoint(tmp_path / "best.pt", exp, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["evaluate", str(ckpt), "--backend", "reference", "--out", str(tmp_path / "m.json")]) == 0
    assert "m.manifest.json" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    assert manifest["threshold_source"] == "tuned on dev"
