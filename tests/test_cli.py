"""The marn-fast command line: demo --quick end to end, predict/evaluate on its checkpoint, and
bad input turned into a one-line error with a non-zero exit (no traceback)."""
import io
import json
import sys

import pytest

from marn_fast.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_quick_writes_the_report(quick_run):
    for name in ("metrics.json", "config.json", "best.pt", "last.pt", "loss_curve.png", "f1_by_frequency.png"):
        assert (quick_run / name).is_file(), name
    report = json.loads((quick_run / "metrics.json").read_text())
    assert 0.0 <= report["test"]["f1_micro"] <= 1.0 and report["epochs_run"] >= 1
    resolved = json.loads((quick_run / "config.json").read_text())
    assert resolved["model"]["hidden_size"] == 16 and resolved["train"]["lr"] == 1e-3


def test_predict_table_and_json(quick_run, tmp_path, capsys):
    note = tmp_path / "note.txt"
    note.write_text("patient with essential hypertension and atrial fibrillation, chronic kidney disease")
    assert main(["predict", str(quick_run / "best.pt"), str(note), "--top", "3"]) == 0
    assert str(note) in capsys.readouterr().out
    assert main(["predict", str(quick_run / "best.pt"), str(note), "--top", "2", "--format", "json"]) == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert len(doc["codes"]) == 2 and all("evidence" in c and "description" in c for c in doc["codes"])


def test_evaluate_on_the_training_data(quick_run, capsys):
    assert main(["evaluate", str(quick_run / "best.pt"), "--split", "dev"]) == 0
    assert "f1_micro" in capsys.readouterr().out


def _one_line_error(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("marn-fast")
    return err


def test_bad_input_gives_one_line_errors(quick_run, tmp_path, capsys, monkeypatch):
    ckpt = str(quick_run / "best.pt")
    assert "no input text" in _one_line_error(capsys, ["predict", ckpt], stdin=b"   ", monkeypatch=monkeypatch)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("fi\xe8vre".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(capsys, ["predict", ckpt, str(latin)])
    note = tmp_path / "note.txt"
    note.write_text("chest pain")
    assert "checkpoint" in _one_line_error(capsys, ["predict", str(tmp_path / "missing.pt"), str(note)])
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"hiden_size": 3}))
    assert "unknown keys" in _one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path)])
    other = tmp_path / "other"
    assert main(["synth", "--out", str(other), "--preset", "test", "--seed", "9"]) == 0
    capsys.readouterr()
    assert "does not match" in _one_line_error(capsys, ["evaluate", ckpt, "--data-dir", str(other)])
    assert "last.pt" in _one_line_error(capsys, ["train", "--resume", "--out", str(tmp_path / "fresh"),
                                                 "--data-dir", str(other), "--synth-preset", "test"])


def test_unknown_flag_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--no-such-flag"])
    assert info.value.code == 2
