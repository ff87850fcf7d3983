"""`train --seeds`: one run per seed and the spread (mean ± sample std) of every metric."""
import json
import math
import warnings

import pytest
import torch

from marn_fast.training.seeds import SUMMARY_FILE, aggregate, format_table, mean_std, train_seeds


def _report(f1, tuned_f1, dev, ccs_f1=0.3, epoch=2):
    return {"test": {"f1_micro": f1, "p@5": 2 * f1 / 2, "loss": 0.1, "ccs": {"f1_micro": ccs_f1}},
            "test_at_tuned_threshold": {"f1_micro": tuned_f1}, "dev_f1_micro": dev, "tuned_threshold": 0.3,
            "best_epoch": epoch, "warnings": []}


def test_mean_and_sample_std_of_hand_made_numbers():
    stat = mean_std([0.5, 0.6, 0.7])
    assert stat["mean"] == pytest.approx(0.6) and stat["std"] == pytest.approx(0.1)  # ddof=1 (ddof=0: 0.0816)
    assert stat["n"] == 3 and stat["values"] == [0.5, 0.6, 0.7]
    assert mean_std([0.25])["std"] is None
    assert math.isnan(mean_std([0.5, float("nan")])["mean"])
    with pytest.raises(ValueError):
        mean_std([])


def test_aggregate_over_seeds():
    reports = {3: _report(0.7, 0.75, 0.65, epoch=4), 1: _report(0.5, 0.55, 0.45), 2: _report(0.6, 0.65, 0.55)}
    summary = aggregate(reports, "f1_micro")
    assert summary["seeds"] == [1, 2, 3] and "ddof=1" in summary["std"]
    assert summary["test"]["f1_micro"]["mean"] == pytest.approx(0.6)
    assert summary["test"]["f1_micro"]["std"] == pytest.approx(0.1)
    assert summary["test"]["f1_micro"]["values"] == [0.5, 0.6, 0.7]  # in seed order
    assert summary["test"]["ccs.f1_micro"]["std"] == pytest.approx(0.0)
    assert summary["test_at_tuned_threshold"]["f1_micro"]["mean"] == pytest.approx(0.65)
    assert summary["dev_f1_micro"]["mean"] == pytest.approx(0.55)
    assert summary["dev_f1_micro"]["std"] == pytest.approx(0.1)
    assert summary["best_epoch"]["mean"] == pytest.approx(8 / 3)
    table = format_table(summary, "f1_micro")
    assert "60.00 ± 10.00" in table and "65.00 ± 10.00" in table and "dev f1_micro" in table and "ddof=1" in table


@pytest.fixture
def one_thread():
    # Two tiny runs: OpenMP across 2 threads on a shared 2-core machine is several times slower here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_seeds_from_the_cli(tmp_path, capsys, one_thread):
    from marn_fast.cli import main

    out = tmp_path / "run"
    args = ["train", "--data", "synth", "--synth-preset", "test", "--hidden-size", "8", "--epochs", "1",
            "--no-progress", "--out", str(out), "--seeds", "1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mean ± sample std" in printed and "f1_micro" in printed
    for seed in (1, 2):
        folder = out / f"seed-{seed}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["seeds"] == {"train": seed, "data": seed}
        assert (folder / "metrics.json").is_file() and (folder / "best.pt").is_file()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["seeds"] == [1, 2] and summary["test"]["f1_micro"]["n"] == 2
    assert summary["test"]["f1_micro"]["std"] is not None and summary["environment"]["versions"]["torch"]
    values = [json.loads((out / f"seed-{s}" / "metrics.json").read_text())["test"]["f1_micro"] for s in (1, 2)]
    assert summary["test"]["f1_micro"]["values"] == values
    # --resume: finished seeds are read back, not trained again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "seed 1: finished earlier" in printed and "seed 2: finished earlier" in printed
    assert json.loads((out / SUMMARY_FILE).read_text())["test"]["f1_micro"]["values"] == values


def test_resume_continues_each_seed(tmp_path):
    from marn_fast.training import DataSettings, TrainConfig

    (tmp_path / "seed-1").mkdir()
    (tmp_path / "seed-1" / "metrics.json").write_text(json.dumps(_report(0.5, 0.5, 0.5)))  # finished
    (tmp_path / "seed-2").mkdir()
    (tmp_path / "seed-2" / "last.pt").write_bytes(b"")  # interrupted
    calls = []

    def run(settings, model_options, train_config, folder, backend, resume, log):
        calls.append((settings.seed, train_config.seed, folder.name, resume))
        return _report(0.6, 0.6, 0.6)

    summary = train_seeds(DataSettings(str(tmp_path)), {}, TrainConfig(), tmp_path, [1, 2, 3], resume=True,
                          run=run, log=lambda line: None)
    assert calls == [(2, 2, "seed-2", True), (3, 3, "seed-3", False)]
    assert summary["test"]["f1_micro"]["values"] == [0.5, 0.6, 0.6]
    train_seeds(DataSettings(str(tmp_path)), {}, TrainConfig(), tmp_path, [1], run=run, log=lambda line: None)
    assert calls[-1] == (1, 1, "seed-1", False)  # without --resume every seed trains
    with pytest.raises(ValueError, match="distinct"):
        train_seeds(DataSettings(str(tmp_path)), {}, TrainConfig(), tmp_path, [1, 1], run=run)
