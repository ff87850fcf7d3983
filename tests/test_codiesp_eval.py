"""CodiEsp evaluation: MAP against hand-computed cases, the evidence scorer against hand-made
spans, the torch TF-IDF + logistic-regression baseline against scikit-learn (test oracle), and
a one-epoch training smoke run on a 40-case subset of the real data (skips without it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from marn_fast.data.codiesp import EvidenceSpan
from marn_fast.training.codiesp import (
    codiesp_map_of,
    collect_runs,
    fit_logreg,
    map_report,
    merge_positions,
    ranked_labels,
    row_space,
    score_evidence,
    summarize_runs,
    tfidf_matrices,
)

TOL = 1e-9


# ----------------------------------------------------------------------------- MAP
def test_map_hand_computed_case():
    labels = ["A01", "B02", "C03", "D04"]
    scores = np.array([[0.9, 0.1, 0.8, 0.2],     # ranking A01, C03, D04, B02
                       [0.1, 0.2, 0.3, 0.4]])    # ranking D04, C03, B02, A01
    assert ranked_labels(scores, labels) == [["A01", "C03", "D04", "B02"], ["D04", "C03", "B02", "A01"]]
    # case 1: gold A01 (rank 1), D04 (rank 3), Z99 (outside the label space, never ranked):
    #   (1/1 + 2/3) / 3;  case 2: gold B02 (rank 3): (1/3) / 1
    gold = [["A01", "D04", "Z99"], ["B02"]]
    expected = ((1 + 2 / 3) / 3 + 1 / 3) / 2
    assert codiesp_map_of(scores, labels, gold, "D") == pytest.approx(expected, abs=TOL)
    # a case without gold codes does not count
    assert codiesp_map_of(np.vstack([scores, scores[:1]]), labels, gold + [[]], "D") == pytest.approx(expected, abs=TOL)


def test_map_dp_scores_each_type_apart():
    labels = ["D:A01", "D:B02", "P:0DT", "P:BW0"]
    scores = np.array([[0.9, 0.2, 0.95, 0.1]])
    gold = [["D:B02", "P:BW0"]]
    # D ranking: A01, B02 → gold B02 at rank 2: 1/2;  P ranking: 0DT, BW0 → BW0 at rank 2: 1/2
    assert map_report(scores, labels, gold, "DP") == {"CodiEsp-D": pytest.approx(0.5), "CodiEsp-P": pytest.approx(0.5)}


# ----------------------------------------------------------------------------- evidence
def test_merge_positions_joins_adjacent_tokens():
    offsets = [(0, 5), (6, 8), (9, 13), (14, 20), (21, 25)]
    assert merge_positions([3, 1, 2], offsets) == [(6, 20)]
    assert merge_positions([4, 0, 2, -1], offsets) == [(0, 5), (9, 13), (21, 25)]
    assert merge_positions([], offsets) == []


def test_score_evidence_hand_made_spans():
    gold = [EvidenceSpan("c1", "N10", "D", ((10, 20),)),
            EvidenceSpan("c1", "R50.9", "D", ((30, 36), (50, 55))),
            EvidenceSpan("c2", "N10", "D", ((0, 5),))]
    predicted = {
        "c1": [("N10", 15, 25),      # overlaps the N10 span: correct
               ("N10", 20, 30),      # touches [10, 20) only at its end: no overlap
               ("R50.9", 52, 53),    # overlaps the second R50.9 segment: correct
               ("A01", 10, 20)],     # wrong code on a gold span: wrong
        "c2": [("R50.9", 0, 5)],     # right span, wrong code
    }
    scores = score_evidence(predicted, gold)
    assert scores["predicted_pairs"] == 5 and scores["correct_pairs"] == 2
    assert scores["gold_rows"] == 3 and scores["gold_found"] == 2
    assert scores["precision"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    # restricting to a set of documents drops the others' gold and predictions
    only_c2 = score_evidence(predicted, gold, doc_ids=["c2"])
    assert (only_c2["predicted_pairs"], only_c2["gold_rows"], only_c2["f1"]) == (1, 1, 0.0)
    assert score_evidence({}, [])["f1"] == 0.0


# ----------------------------------------------------------------------------- baseline
def test_tfidf_matches_definition():
    train = ["fiebre alta fiebre", "tos seca", "fiebre tos"]
    x_train, (x_other,) = tfidf_matrices(train, [["fiebre desconocida"]], min_df=2)
    # vocabulary: words in >= 2 training texts: fiebre (df 2), tos (df 2)
    idf = np.log(4 / 3) + 1
    row0 = np.array([(1 + np.log(2)) * idf, 0.0])
    np.testing.assert_allclose(x_train[0].numpy(), row0 / np.linalg.norm(row0), atol=1e-12)
    np.testing.assert_allclose(x_other[0].numpy(), [1.0, 0.0], atol=1e-12)


def test_logreg_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 60))                      # more features than rows, as TF-IDF
    y = (rng.random((40, 3)) < [[0.2, 0.5, 0.1]]).astype(np.float64)
    x_t, test_t = row_space(torch.tensor(x), torch.tensor(x[:5] + 0.1))
    weight, bias = fit_logreg(x_t, torch.tensor(y), c=2.0)
    ours = torch.sigmoid(test_t @ weight + bias).numpy()
    for label in range(3):
        ref = sklearn.LogisticRegression(C=2.0, tol=1e-10, max_iter=10_000).fit(x, y[:, label])
        np.testing.assert_allclose(ours[:, label], ref.predict_proba(x[:5] + 0.1)[:, 1], atol=1e-4)


# ----------------------------------------------------------------------------- training smoke run
def _subset(codiesp_dir: Path, out: Path, sizes=(40, 20, 20)) -> Path:
    """A CodiEsp-layout folder of the first cases of each split: symbolic links to the text
    files (nothing copied) and the matching rows of the code tables."""
    for split, size in zip(("train", "dev", "test"), sizes):
        ids = sorted(p.stem for p in (codiesp_dir / split / "text_files").glob("*.txt"))[:size]
        keep = set(ids)
        for sub in ("text_files", "text_files_en"):
            (out / split / sub).mkdir(parents=True)
            for case in ids:
                os.symlink(codiesp_dir / split / sub / f"{case}.txt", out / split / sub / f"{case}.txt")
        for suffix in ("D", "P", "X"):
            rows = (codiesp_dir / split / f"{split}{suffix}.tsv").read_text(encoding="utf-8").splitlines()
            (out / split / f"{split}{suffix}.tsv").write_text(
                "\n".join(r for r in rows if r.split("\t")[0] in keep) + "\n", encoding="utf-8")
    return out


@pytest.mark.filterwarnings("ignore")
def test_training_smoke_on_40_cases(codiesp_dir, tmp_path):
    pytest.importorskip("gensim")
    from marn_fast.cli import main

    data = _subset(codiesp_dir, tmp_path / "codiesp")
    out = tmp_path / "run"
    rc = main(["train", "--data", "codiesp", "--data-dir", str(data), "--language", "es", "--codes", "DP",
               "--aux", "chapter", "--hidden-size", "8", "--epochs", "1", "--out", str(out), "--no-progress",
               "--max-length", "300"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    cs = report["codiesp"]
    assert report["history"][0]["map"] == report["dev_map"]          # early stopping on dev MAP
    assert set(cs["marn"]["map"]) == {"CodiEsp-D", "CodiEsp-P"}
    assert all(0.0 <= v <= 1.0 for v in cs["marn"]["map"].values())
    assert set(cs["baseline"]["map"]) == {"CodiEsp-D", "CodiEsp-P"}
    for which in ("predicted_codes", "gold_codes"):
        for system in ("attention", "random"):
            assert 0.0 <= cs["evidence"][which][system]["f1"] <= 1.0
    assert cs["evidence"]["gold_codes"]["codes_explained"] > 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["data"]["source"] == "codiesp" and config["data"]["codes"] == "DP"
    table = summarize_runs(collect_runs([out]))
    assert "CodiEsp-D MAP" in table and "run" in table.splitlines()[0]
    assert main(["codiesp-report", str(out), "--out", str(tmp_path / "r.json")]) == 0


def test_summarize_runs_columns_stay_apart_with_spreads():
    """Mean ± spread cells (the widest the table prints) keep their columns: every row as long as
    the header, and cells separated by blanks (a squeezed '-' once read as a negative time)."""
    def run(group, value, seconds, evidence=True):
        cs = {"marn": {"map": {"CodiEsp-D": value}}, "baseline": {"map": {"CodiEsp-D": 0.291}}}
        if evidence:
            cs["evidence"] = {"predicted_codes": {"attention": {"f1": value / 2}, "random": {"f1": value / 20}}}
        return {"group": group, "report": {"codiesp": cs}, "seconds": seconds}

    runs = [run("with-evidence", v, s) for v, s in ((0.1, 500.0), (0.12, 560.0), (0.15, 610.0))]
    runs += [run("no-evidence", v, s, evidence=False) for v, s in ((0.158, 400.0), (0.162, 480.0))]
    lines = summarize_runs(runs).splitlines()
    header, rows = lines[0], lines[1:3]
    assert all(len(row) == len(header) for row in rows)
    no_evidence = rows[1]
    assert " - " in no_evidence and "-" not in no_evidence.split(" - ")[1]  # the time is not "-7.333"
    assert "7.333 ± 0.943" in no_evidence and "0.160 ± 0.003" in no_evidence
