"""The marn-fast command line: demo --quick end to end (its log redirected to files, as a batch
job's), predict/evaluate on its checkpoint, the shipped recipes a run applies, and bad input
turned into a one-line error with a non-zero exit (no traceback)."""
import io
import json
import re
import subprocess
import sys

import pytest

from marn_fast.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`marn-fast demo --quick > stdout.log 2> stderr.log`, run from outside the source tree (so
    it imports the installed package), progress bars left on."""
    out = tmp_path_factory.mktemp("demo")
    with open(out / "stdout.log", "wb") as stdout, open(out / "stderr.log", "wb") as stderr:
        done = subprocess.run([sys.executable, "-m", "marn_fast", "demo", "--quick", "--out", str(out)],
                              stdout=stdout, stderr=stderr, cwd=out, timeout=900)
    assert done.returncode == 0, (out / "stderr.log").read_text()
    return out


def test_redirected_log_has_one_line_per_epoch_and_no_bar_refreshes(quick_run):
    stdout = (quick_run / "stdout.log").read_bytes().decode()
    stderr = (quick_run / "stderr.log").read_bytes().decode()
    assert "\r" not in stdout and "\r" not in stderr  # tqdm refreshes write carriage returns
    report = json.loads((quick_run / "metrics.json").read_text())
    epochs = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == report["epochs_run"] >= 1
    for i, line in enumerate(epochs, 1):
        assert re.match(rf"epoch +{i}/\d+  train loss [0-9.]+  [0-9.]+ docs/s  dev loss [0-9.]+  "
                        rf"dev f1_micro [0-9.]+ \(best: \d+\)  [0-9.]+ s  elapsed \d+:\d\d:\d\d$", line), line


def test_progress_bars_only_on_a_terminal():
    from marn_fast.training.trainer import show_progress_bars

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    assert show_progress_bars(True, Stream(True))
    assert not show_progress_bars(True, Stream(False))
    assert not show_progress_bars(False, Stream(True))  # --no-progress
    assert not show_progress_bars(True, object())  # a stream without isatty


def test_demo_applies_its_shipped_config_and_the_manifest_names_it(quick_run):
    assert "config: demo.yaml (shipped recipe" in (quick_run / "stdout.log").read_text()
    record = json.loads((quick_run / "manifest.json").read_text())["config_file"]
    assert record["name"] == "demo.yaml" and record["shipped"] and record["values"]["epochs"] == 16
    assert record["overridden_by_flags"] == {}  # --quick is applied after the config, not a flag override


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
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "last.pt").write_bytes(b"not a checkpoint")  # (no last.pt at all: a fresh start)
    assert "last.pt" in _one_line_error(capsys, ["train", "--resume", "--out", str(tmp_path / "fresh"),
                                                 "--data-dir", str(other), "--synth-preset", "test"])


def test_unknown_flag_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--no-such-flag"])
    assert info.value.code == 2


def test_training_flags_map_to_the_configs(tmp_path):
    from marn_fast.cli import _train_settings, build_parser
    from marn_fast.data import MIN_DOC_FREQ
    from marn_fast.data.embeddings import WORD2VEC_DEFAULTS

    base = ["train", "--data", "synth", "--data-dir", str(tmp_path / "data"), "--synth-preset", "test",
            "--out", str(tmp_path / "run")]
    settings, train, options = _train_settings(build_parser().parse_args(base))
    assert "freeze_embeddings" not in options and train.bn_recalibrate is False  # official defaults kept
    assert settings.min_doc_freq == MIN_DOC_FREQ
    assert _train_settings(build_parser().parse_args(base + ["--min-doc-freq", "2"]))[0].min_doc_freq == 2
    assert settings.word2vec_epochs == WORD2VEC_DEFAULTS["epochs"]
    assert _train_settings(build_parser().parse_args(base + ["--word2vec-epochs", "30"]))[0].word2vec_epochs == 30
    with pytest.raises(ValueError, match="min_doc_freq"):
        _train_settings(build_parser().parse_args(base + ["--min-doc-freq", "0"]))
    assert train.decay_matrices_only is False
    _, train, options = _train_settings(build_parser().parse_args(base + ["--train-embeddings", "--bn-recalibrate",
                                                                          "--decay-matrices-only"]))
    assert options["freeze_embeddings"] is False and train.bn_recalibrate is True and train.decay_matrices_only


def test_recalibrate_batchnorm_sets_exact_training_statistics(tmp_path):
    import torch

    from marn_fast import MARN, MARNConfig
    from marn_fast.data.batching import Batch
    from marn_fast.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = MARN(MARNConfig(vocab_size=20, num_icd=3, hidden_size=4, dropout=0.5), backend="reference")
    batches = [Batch(torch.randint(2, 20, (2, n)), torch.tensor([n, n]), torch.zeros(2, 3), None, ["a", "b"])
               for n in (5, 7)]
    trainer = Trainer(model, TrainConfig(bn_recalibrate=True), tmp_path, {}, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert trainer.recalibrate_batchnorm(batches) == 10  # 5 RAM blocks x 2 BatchNorms
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # parameters untouched
    bn = model.ram.down1[1]
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2
    recalibrated = bn.running_mean.clone()
    # the exact average of the two batches' statistics of the layer's input (dropout off)
    seen = []
    hook = model.ram.down1[0].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        for b in batches:
            model(b.tokens, b.lengths)
    hook.remove()
    means = torch.stack([o.mean(dim=(0, 2)) for o in seen])
    assert torch.allclose(recalibrated, means.mean(0), atol=1e-6)


def _applied(argv, capsys):
    """The options as `main` hands them to a command: the config applied, the model's defaults filled."""
    from marn_fast.cli import build_parser, resolve_model_options
    from marn_fast.config_files import apply_config

    parser = build_parser()
    args = parser.parse_args(argv)
    record = apply_config(parser, args, argv)
    resolve_model_options(args)
    return args, record, capsys.readouterr().out


def test_train_on_codiesp_applies_the_recipe_of_its_language(capsys):
    base = ["train", "--data", "codiesp", "--data-dir", "CODIESP", "--seed", "0"]
    args, record, out = _applied(base, capsys)
    assert record["name"] == "codiesp-en-D.yaml" and record["applied"].startswith("the default for --data codiesp")
    assert "config: codiesp-en-D.yaml" in out and "--recipe official" in out
    assert (args.lr, args.hidden_size, args.word2vec_epochs, args.patience, args.epochs) == (3e-2, 64, 100, 15, 100)
    assert args.decay_matrices_only and args.bn_recalibrate and args.seed == 0
    args, record, _ = _applied(base + ["--language", "es"], capsys)
    assert record["name"] == "codiesp-es-D.yaml" and args.language == "es"
    # flags override the recipe, and the record says which
    args, record, out = _applied(base + ["--lr", "0.01", "--patience", "15", "--codes", "P"], capsys)
    assert args.lr == 0.01 and args.codes == "P" and record["overridden_by_flags"] == {"lr": 0.01, "codes": "P"}
    assert "--lr 0.01" in out and "measured on diagnoses" in out
    # the official recipe stays one flag away; --config replaces the recipe
    args, record, out = _applied(base + ["--recipe", "official"], capsys)
    assert record is None and out == "" and (args.lr, args.hidden_size, args.epochs) == (1e-3, 300, 50)
    args, record, _ = _applied(base + ["--config", "mimic3-full"], capsys)
    assert record["name"] == "mimic3-full.yaml" and record["applied"] == "--config" and args.lr == 1e-3
    # other data take no config: the package defaults are the official recipe
    args, record, out = _applied(["train", "--data", "caml", "--data-dir", "D"], capsys)
    assert record is None and out == "" and args.lr == 1e-3


def test_info_reports_the_build(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("marn_fast ") and "torch" in out and "marn_fast._C " in out and "focal_loss" in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ops"]["label_attention"]["cpu"]
