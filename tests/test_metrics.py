"""marn_fast.metrics against scikit-learn and against plain loops written from the definitions.

Random data has ties (scores rounded to 2 decimals), codes without positives, a code that is
always positive and documents without gold codes. Tolerance: 1e-12 (the same sums in another
order)."""
import math
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    label_ranking_average_precision_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from marn_fast import metrics
from marn_fast.metrics import codiesp_map, evaluate, format_table, frequency_buckets, tune_threshold

TOL = 1e-12


def _random_split(seed, n=80, num_codes=50, density=0.15, decimals=2):
    rng = np.random.default_rng(seed)
    targets = rng.random((n, num_codes)) < density
    # Informative scores so the metrics are far from their chance values.
    scores = np.clip(0.35 * targets + 0.65 * rng.random((n, num_codes)), 0.0, 1.0)
    if decimals is not None:
        scores = np.round(scores, decimals)                  # many ties
    targets[:, 0] = False                                    # code without positives
    targets[:, 2] = np.arange(n) == 5                        # code with a single positive
    targets[3] = False                                       # document without gold codes
    return scores, targets


def _naive_ranking(scores, targets, ks):
    """Plain per-document loops from the definitions (stable descending sort)."""
    num_codes = scores.shape[1]
    out = {f"p@{k}": [] for k in ks}
    out.update({f"r@{k}": [] for k in ks})
    out.update(r_precision=[], map=[])
    for s, y in zip(scores, targets):
        order = np.argsort(-s, kind="stable")
        rel = y[order]
        n_gold = int(y.sum())
        for k in ks:
            out[f"p@{k}"].append(rel[:k].sum() / min(k, num_codes))
            if n_gold:
                out[f"r@{k}"].append(rel[:k].sum() / n_gold)
        if n_gold:
            out["r_precision"].append(rel[:n_gold].sum() / n_gold)
            hits, total = 0, 0.0
            for rank, is_gold in enumerate(rel, start=1):
                if is_gold:
                    hits += 1
                    total += hits / rank
            out["map"].append(total / n_gold)
    return {key: float(np.mean(v)) for key, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_evaluate_matches_sklearn_and_definitions(seed, threshold):
    scores, targets = _random_split(seed)
    ks = (1, 5, 8, 15, 60)                                   # 60 > L: denominators min(k, L)
    m = evaluate(scores, targets, ks=ks, threshold=threshold)
    pred = scores > threshold

    valid = targets.any(axis=0) & (~targets).any(axis=0)
    assert valid.sum() == targets.shape[1] - 1
    assert m["auc_macro"] == pytest.approx(
        roc_auc_score(targets[:, valid], scores[:, valid], average="macro"), abs=TOL)
    assert m["auc_micro"] == pytest.approx(roc_auc_score(targets, scores, average="micro"), abs=TOL)

    p = precision_score(targets, pred, average="macro", zero_division=0)
    r = recall_score(targets, pred, average="macro", zero_division=0)
    assert m["prec_macro"] == pytest.approx(p, abs=TOL)
    assert m["rec_macro"] == pytest.approx(r, abs=TOL)
    assert m["f1_macro"] == pytest.approx(2 * p * r / (p + r), abs=TOL)
    # CAML's formula with its 1e-10 epsilon agrees to 1e-9.
    tp = (pred & targets).sum(0)
    caml_p = np.mean(tp / (pred.sum(0) + 1e-10))
    caml_r = np.mean(tp / (targets.sum(0) + 1e-10))
    assert m["f1_macro"] == pytest.approx(2 * caml_p * caml_r / (caml_p + caml_r), abs=1e-9)

    present = targets.any(axis=0)
    assert m["f1_macro_per_code"] == pytest.approx(
        f1_score(targets[:, present], pred[:, present], average="macro", zero_division=0), abs=TOL)
    assert m["f1_micro"] == pytest.approx(f1_score(targets, pred, average="micro"), abs=TOL)
    assert m["prec_micro"] == pytest.approx(precision_score(targets, pred, average="micro"), abs=TOL)
    assert m["rec_micro"] == pytest.approx(recall_score(targets, pred, average="micro"), abs=TOL)
    assert m["exact_match"] == pytest.approx(accuracy_score(targets, pred), abs=TOL)
    assert m["predicted_positive_rate"] == pytest.approx(pred.mean(), abs=TOL)

    naive = _naive_ranking(scores, targets, ks)
    for key, value in naive.items():
        assert m[key] == pytest.approx(value, abs=TOL), key
    assert 0.0 < m["map"] < 1.0 and m["auc_macro"] > 0.6     # informative, not degenerate


def test_map_equals_sklearn_label_ranking_ap_without_ties():
    scores, targets = _random_split(5, decimals=None)        # continuous scores: no ties
    has_gold = targets.any(axis=1)
    m = evaluate(scores, targets)
    assert m["map"] == pytest.approx(
        label_ranking_average_precision_score(targets[has_gold], scores[has_gold]), abs=TOL)


def test_hand_computed_cases():
    # gold {A, C}, ranking [A, B, C]: AP = (1/1 + 2/3) / 2.
    m = evaluate(np.array([[0.9, 0.8, 0.7]]), np.array([[1, 0, 1]]), ks=(1, 2, 5))
    assert m["map"] == pytest.approx((1 + 2 / 3) / 2, abs=TOL)
    assert m["p@1"] == 1.0 and m["p@2"] == 0.5 and m["p@5"] == pytest.approx(2 / 3)
    assert m["r@2"] == 0.5 and m["r_precision"] == 0.5
    assert m["exact_match"] == 0.0                           # predicted {A, B, C}
    assert codiesp_map([["A", "B", "C"]], [["A", "C"]]) == pytest.approx((1 + 2 / 3) / 2, abs=TOL)

    # Two documents; ties are ranked by lower code index first.
    scores = np.array([[0.9, 0.1, 0.8, 0.3],
                       [0.5, 0.5, 0.5, 0.5]])
    targets = np.array([[0, 1, 1, 0],
                        [0, 0, 0, 1]])
    m = evaluate(scores, targets, ks=(1, 2, 10), threshold=0.4)
    assert m["p@1"] == pytest.approx((0 + 0) / 2)
    assert m["p@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["p@10"] == pytest.approx((2 / 4 + 1 / 4) / 2)   # k > L: divided by L = 4
    assert m["map"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1 / 4) / 2)
    assert m["r_precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["exact_match"] == 0.0
    perfect = evaluate(scores, scores > 0.4, threshold=0.4)
    assert perfect["exact_match"] == 1.0 and perfect["f1_micro"] == 1.0


def test_auc_macro_skips_codes_without_negatives():
    scores, targets = _random_split(3)
    targets[:, 1] = True
    valid = targets.any(axis=0) & (~targets).any(axis=0)
    assert valid.sum() == targets.shape[1] - 2
    assert evaluate(scores, targets)["auc_macro"] == pytest.approx(
        roc_auc_score(targets[:, valid], scores[:, valid], average="macro"), abs=TOL)


def test_degenerate_predictions_and_missing_gold():
    scores, targets = _random_split(3)
    nothing = evaluate(scores, targets, threshold=1.0)
    assert nothing["predicted_positive_rate"] == 0.0
    assert nothing["f1_micro"] == 0.0 and nothing["f1_macro"] == 0.0
    everything = evaluate(scores, targets, threshold=-1.0)
    assert everything["predicted_positive_rate"] == 1.0
    no_gold = evaluate(scores, np.zeros_like(targets))
    for key in ("auc_macro", "auc_micro", "map", "r_precision", "f1_macro_per_code", "r@5"):
        assert math.isnan(no_gold[key]), key
    assert no_gold["p@5"] == 0.0


def test_blocked_computation_equals_unblocked(monkeypatch):
    scores, targets = _random_split(4, n=70, num_codes=45)
    whole = evaluate(scores, targets)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 100)    # a block of 1-2 rows/columns
    blocked = evaluate(scores, targets)
    for key, value in whole.items():
        assert blocked[key] == pytest.approx(value, abs=TOL, nan_ok=True), key


def test_numpy_and_torch_inputs_agree():
    scores, targets = _random_split(6)
    ref = evaluate(scores.astype(np.float32), targets)
    variants = [
        (torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(targets)),
        (torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(targets).long()),
        (scores.astype(np.float32), targets.astype(np.float64)),
        (scores.astype(np.float32), targets.astype(np.int8)),
        (torch.from_numpy(scores).half(), torch.from_numpy(targets).float()),
    ]
    for s, y in variants:
        if isinstance(s, torch.Tensor) and s.dtype == torch.float16:
            expected = evaluate(s.float().numpy(), targets)
        else:
            expected = ref
        got = evaluate(s, y)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=TOL, nan_ok=True), key


def test_moderate_size_runs_and_matches_sklearn_auc():
    rng = np.random.default_rng(7)
    targets = rng.random((500, 2000)) < 0.01
    scores = (0.3 * targets + 0.7 * rng.random((500, 2000))).astype(np.float32)
    m = evaluate(scores, targets)
    assert m["auc_micro"] == pytest.approx(roc_auc_score(targets.ravel(), scores.ravel()), abs=1e-10)
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("seed", [0, 1])
def test_tune_threshold_is_the_brute_force_optimum(seed):
    scores, targets = _random_split(seed, n=40, num_codes=20)

    def micro_f1(t):
        return f1_score(targets, scores > t, average="micro", zero_division=0)

    values = np.unique(scores)
    brute = max(micro_f1(t) for t in np.concatenate(([values[0] - 1.0], values)))
    t = tune_threshold(scores, targets)
    assert micro_f1(t) == pytest.approx(brute, abs=TOL)
    # The returned threshold sits strictly between two distinct dev score levels.
    assert not np.any(scores == t)

    grid = np.linspace(0.0, 1.0, 21)
    t_grid = tune_threshold(torch.from_numpy(scores), torch.from_numpy(targets), grid=grid)
    assert t_grid in grid
    assert micro_f1(t_grid) == pytest.approx(max(micro_f1(g) for g in grid), abs=TOL)
    assert micro_f1(t_grid) <= micro_f1(t) + TOL


def test_tune_threshold_hand_case():
    scores = np.array([[0.9, 0.6, 0.2], [0.7, 0.4, 0.1]])
    targets = np.array([[1, 1, 0], [1, 0, 0]])
    t = tune_threshold(scores, targets)                      # best: predict {>= 0.6}
    assert t == pytest.approx(0.5) and evaluate(scores, targets, threshold=t)["f1_micro"] == 1.0


def test_frequency_buckets_match_sklearn():
    scores, targets = _random_split(8, n=60, num_codes=40)
    rng = np.random.default_rng(8)
    counts = rng.choice([0, 1, 5, 10, 11, 30, 80, 600, 2000], size=40)
    report = frequency_buckets(counts, scores, targets, threshold=0.5)
    assert [b["label"] for b in report] == ["0", "1-10", "11-50", "51-100", "101-500",
                                            "501-1000", ">=1001"]
    assert sum(b["n_codes"] for b in report) == 40
    pred = scores > 0.5
    for b in report:
        lo, hi = b["range"]
        members = (counts >= lo) & (counts < (hi if hi is not None else np.inf))
        assert b["n_codes"] == members.sum()
        present = members & targets.any(axis=0)
        assert b["n_present"] == present.sum()
        if present.any():
            # Per-column binary F1 (sklearn reads a one-column matrix as a binary problem).
            per_code = [f1_score(targets[:, j], pred[:, j], zero_division=0)
                        for j in np.flatnonzero(present)]
            assert b["f1_macro_per_code"] == pytest.approx(np.mean(per_code), abs=TOL)
        else:
            assert math.isnan(b["f1_macro_per_code"])
        if members.any():
            assert b["f1_micro"] == pytest.approx(
                f1_score(targets[:, members].ravel(), pred[:, members].ravel(), zero_division=0),
                abs=TOL)
    assert sum(b["n_present"] for b in report) == targets.any(axis=0).sum()


def test_codiesp_map_official_rules():
    gold = [["n44.8", "R52"], ["a01"], [], ["z99"]]
    ranked = [
        ["N44.8", "XX", "n44.8", "r52"],   # dup keeps first; case-insensitive: (1 + 2/3) / 2
        ["bad", "A01"],                    # 'bad' invalid: dropped before ranking -> AP 1
        ["A01"],                           # no gold: skipped
        ["bad"],                           # no valid prediction: skipped (official scorer)
    ]
    valid = ["N44.8", "R52", "A01", "XX", "Z99"]
    expected = ((1 + 2 / 3) / 2 + 1.0) / 2
    assert codiesp_map(ranked, gold, valid) == pytest.approx(expected, abs=TOL)
    assert codiesp_map(ranked, gold, valid, empty_ranking_counts=True) == pytest.approx(
        ((1 + 2 / 3) / 2 + 1.0 + 0.0) / 3, abs=TOL)
    # Without a valid list 'bad' takes rank 1 in doc 2 (AP 1/2) and doc 4 counts as 0.
    assert codiesp_map(ranked, gold) == pytest.approx(((1 + 2 / 3) / 2 + 0.5 + 0.0) / 3, abs=TOL)
    # Depth cut-off: only the first code of each list is scored.
    assert codiesp_map(ranked, gold, valid, depth=1) == pytest.approx((0.5 + 1.0) / 2, abs=TOL)
    assert math.isnan(codiesp_map([["A"]], [[]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_codiesp_map_agrees_with_evaluate(seed):
    scores, targets = _random_split(seed)                    # ties: index order in both
    codes = [f"C{j:03d}" for j in range(scores.shape[1])]
    ranked = [[codes[j] for j in np.argsort(-s, kind="stable")] for s in scores]
    gold = [[codes[j] for j in np.flatnonzero(y)] for y in targets]
    assert codiesp_map(ranked, gold) == pytest.approx(evaluate(scores, targets)["map"], abs=TOL)


def test_format_table():
    table = format_table({"auc_macro": 0.91234, "p@8": 0.5, "map": float("nan"), "n_docs": 12})
    lines = table.splitlines()
    assert "AUC macro" in lines[2] and lines[2].endswith("91.2")
    assert "P@8" in lines[3] and lines[3].endswith("50.0")
    assert lines[4].endswith("n/a") and lines[5].endswith("12")


@pytest.mark.parametrize("call, name", [
    (lambda s, y: evaluate(s, y[:, :-1]), "targets"),
    (lambda s, y: evaluate(s[0], y[0]), "scores"),
    (lambda s, y: evaluate(np.where(np.eye(*s.shape, dtype=bool), np.nan, s), y), "scores"),
    (lambda s, y: evaluate(s * 4 - 2, y), "scores"),                 # logits, not probabilities
    (lambda s, y: evaluate((s > 0.5).astype(np.int64), y), "scores"),
    (lambda s, y: evaluate(s, y * 2), "targets"),
    (lambda s, y: evaluate(s, y, ks=(0, 5)), "ks"),
    (lambda s, y: evaluate(s, y, threshold=float("nan")), "threshold"),
    (lambda s, y: evaluate(torch.from_numpy(s)[:0], y[:0]), "scores"),
    (lambda s, y: tune_threshold(np.where(np.eye(*s.shape, dtype=bool), np.nan, s), y),
     "dev_scores"),
    (lambda s, y: tune_threshold(s, np.zeros_like(y)), "dev_targets"),
    (lambda s, y: tune_threshold(s, y, grid=[]), "grid"),
    (lambda s, y: frequency_buckets(np.ones(3, dtype=int), s, y), "train_code_counts"),
    (lambda s, y: frequency_buckets(np.ones(s.shape[1], dtype=int), s, y, edges=(5, 1)), "edges"),
    (lambda s, y: codiesp_map([["A"]], [["A"], ["B"]]), "ranked_codes_per_doc"),
    (lambda s, y: codiesp_map(["AB"], [["A"]]), "ranked_codes_per_doc[0]"),
    (lambda s, y: codiesp_map([["A"]], [["A"]], depth=0), "depth"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    scores, targets = _random_split(0, n=10, num_codes=6)
    with pytest.raises(ValueError, match="^" + re.escape(name) + ":") as info:
        call(scores, targets)
    assert "expected" in str(info.value)
