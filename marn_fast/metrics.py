"""Evaluation metrics for multi-label ICD coding, vectorised and matched to scikit-learn.

Inputs: ``scores`` are probabilities ``[N docs, L codes]`` (numpy or torch, floating, finite,
in [0, 1]); ``targets`` are the gold labels of the same shape (any dtype holding only 0/1).
A code is *predicted* when its score is strictly above the threshold (``score > t``): CAML's
``np.round(p)`` rounds 0.5 down, so this is the rule the MIMIC-III literature reports with.

Definitions (``P``/``R``/``F1`` of counts ``tp, fp, fn``; 0/0 is counted as 0 everywhere):

- ``auc_macro``: mean ROC-AUC over the codes that have at least one positive *and* at least
  one negative document in the split (AUC is undefined otherwise; CAML drops such codes too).
  Ties get average ranks (Mann-Whitney U), which is what ``sklearn.metrics.roc_auc_score``
  computes. NaN when no code qualifies.
- ``auc_micro``: ROC-AUC over all ``N * L`` (score, target) pairs flattened.
- ``prec_macro``, ``rec_macro``: mean over **all** ``L`` codes of ``tp / (tp + fp)`` and
  ``tp / (tp + fn)``. ``f1_macro`` = ``2 P R / (P + R)`` of those two means (CAML's macro-F1).
  CAML adds 1e-10 to each denominator instead of mapping 0/0 to 0; results differ by < 1e-9.
- ``f1_macro_per_code``: mean of per-code F1 over the codes with at least one positive in
  the split (the corrected macro-F1 of the MIMIC replicability study).
- ``prec_micro``, ``rec_micro``, ``f1_micro``: from ``tp, fp, fn`` summed over all codes.
- Ranking metrics rank each document's codes by descending score; ties are broken by the
  lower code index first (a stable sort), so results are deterministic.
- ``p@k``: mean over all documents of (#gold codes in the top ``k``) / ``min(k, L)`` (CAML).
- ``r@k``: mean of (#gold in the top ``k``) / (#gold) over documents with at least one gold
  code (CAML counts documents without gold as 0 instead; MIMIC-III full has none).
- ``r_precision``: mean of (#gold in the top ``R``) / ``R``, ``R`` = #gold, over documents
  with gold.
- ``map``: CodiEsp MAP. Per document with gold, the average precision
  ``(1/R) * sum over gold codes g of precision@rank(g)``; mean over those documents. The full
  ranking of all ``L`` codes counts (no depth cut-off; ``codiesp_map`` applies the official
  scorer's cut-off of 1,000 ranks).
- ``exact_match``: fraction of documents whose predicted code set equals the gold set.
- ``predicted_positive_rate``: fraction of the ``N * L`` entries predicted positive (a
  degenerate run predicts nothing or everything).

Cost: one sort per row, one per column and one of the flattened scores (a 3,372 x 8,921
split evaluates in a few seconds on two CPU cores); memory is bounded by processing blocks
of ``_BLOCK_ELEMENTS`` entries.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

DEFAULT_KS = (5, 8, 15)
DEFAULT_THRESHOLD = 0.5
# Training-frequency buckets [lo, next lo); the last is open. 0 = codes never seen in training.
FREQUENCY_EDGES = (0, 1, 11, 51, 101, 501, 1001)
# trectools' TrecEval.get_map default depth, used by the official CodiEsp-D/P scorer.
CODIESP_DEPTH = 1000
_BLOCK_ELEMENTS = 1 << 22

__all__ = ["evaluate", "tune_threshold", "frequency_buckets", "codiesp_map", "format_table",
           "DEFAULT_KS", "DEFAULT_THRESHOLD", "FREQUENCY_EDGES", "CODIESP_DEPTH"]


# ----------------------------------------------------------------------------- input checks
def _describe(a: np.ndarray) -> str:
    return f"shape {tuple(a.shape)}, dtype {a.dtype}"


def _to_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got "
                         f"{type(x).__name__} ({exc})") from None


def _check_scores(name: str, scores) -> np.ndarray:
    """Scores: 2-D floating, finite, in [0, 1]; float16 is widened to float32 (exactly)."""
    a = _to_numpy(name, scores)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N docs, L codes] of probabilities, "
                         f"got {_describe(a)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: expected a floating dtype (probabilities), got {_describe(a)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one document and one code, got {_describe(a)}")
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        bad = "NaN" if np.isnan(a).any() else "infinite"
        raise ValueError(f"{name}: expected finite probabilities, got {bad} values ({_describe(a)})")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: expected probabilities in [0, 1] (apply a sigmoid to logits), "
                         f"got values in [{lo:g}, {hi:g}]")
    return a


def _check_targets(name: str, targets, shape: Sequence[int], shape_name: str) -> np.ndarray:
    """Targets: the scores' shape, any dtype holding only 0 and 1; returned as bool."""
    a = _to_numpy(name, targets)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the shape of {shape_name}), "
                         f"got {_describe(a)}")
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name}: expected a bool, integer or floating dtype, got {_describe(a)}")
    positive = a == 1
    if not (positive | (a == 0)).all():
        raise ValueError(f"{name}: expected only 0/1 values, got others ({_describe(a)})")
    return positive


def _check_threshold(name: str, threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a real number, got {threshold!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"{name}: expected a finite number, got {threshold!r}")
    return t


def _check_ks(ks: Iterable[int]) -> tuple:
    ks = tuple(ks)
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks: expected positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


# ----------------------------------------------------------------------------- primitives
def _safe_div(num, den):
    """num / den with 0/0 (and x/0) counted as 0; works on scalars and arrays."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den > 0)
    return out if out.ndim else float(out)


def _f1(tp, fp, fn):
    """F1 = 2 tp / (2 tp + fp + fn), 0 when nothing is predicted or gold."""
    return _safe_div(2.0 * np.asarray(tp, np.float64), 2.0 * np.asarray(tp, np.float64)
                     + np.asarray(fp, np.float64) + np.asarray(fn, np.float64))


def _rowwise_searchsorted(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray):
    """Insertion points (left, right) of ``values[i]`` in ``sorted_rows[rows[i]]``.

    ``sorted_rows`` [B, M] ascending per row; ``rows`` non-decreasing (as from np.nonzero).
    Queries are packed into a padded [B, max per row] matrix for one batched search."""
    counts = np.bincount(rows, minlength=sorted_rows.shape[0])
    starts = np.cumsum(counts) - counts
    col = np.arange(rows.size) - starts[rows]
    queries = np.zeros((sorted_rows.shape[0], int(counts.max())), dtype=sorted_rows.dtype)
    queries[rows, col] = values
    seq, q = torch.from_numpy(sorted_rows), torch.from_numpy(queries)
    left = torch.searchsorted(seq, q).numpy()[rows, col]
    right = torch.searchsorted(seq, q, right=True).numpy()[rows, col]
    return left.astype(np.int64), right.astype(np.int64)


def _auc_per_code(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column by Mann-Whitney U with average ranks for ties; NaN for a
    column without positives or without negatives. [N, L] -> [L] float64."""
    n, num_codes = scores.shape
    n_pos = targets.sum(axis=0, dtype=np.int64)
    twice_rank_sum = np.zeros(num_codes, dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // n)
    for c0 in range(0, num_codes, step):
        c1 = min(num_codes, c0 + step)
        cols, docs = np.nonzero(targets[:, c0:c1].T)
        if cols.size == 0:
            continue
        block = np.ascontiguousarray(scores[:, c0:c1].T)          # [codes, N]
        values = block[cols, docs]
        block.sort(axis=1)
        left, right = _rowwise_searchsorted(block, cols, values)
        # 2 * (average 1-based rank) = left + right + 1, an integer; a code's sum is below
        # N * (2N + 1), so the float64 bincount is exact for any N below ~6e7.
        twice_rank_sum[c0:c1] = np.bincount(cols, weights=left + right + 1,
                                            minlength=c1 - c0).round().astype(np.int64)
    n_neg = n - n_pos
    twice_u = twice_rank_sum - n_pos * (n_pos + 1)
    auc = np.full(num_codes, np.nan)
    valid = (n_pos > 0) & (n_neg > 0)
    auc[valid] = twice_u[valid] / (2.0 * n_pos[valid] * n_neg[valid])
    return auc


def _auc_flat(scores: np.ndarray, targets: np.ndarray) -> float:
    """ROC-AUC over all flattened pairs (one sort); NaN without positives or negatives."""
    flat = np.sort(scores, axis=None)
    positives = np.sort(scores[targets])                   # sorted queries search faster
    n_pos, n_neg = positives.size, flat.size - positives.size
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    twice_rank_sum = int((np.searchsorted(flat, positives, "left")
                          + np.searchsorted(flat, positives, "right") + 1).sum(dtype=np.int64))
    return (twice_rank_sum - n_pos * (n_pos + 1)) / (2.0 * n_pos * n_neg)


def _gold_ranks(scores: np.ndarray, targets: np.ndarray):
    """1-based rank of every gold entry in its document's ranking (descending score, ties by
    lower code index first). Returns (rows, ranks) with rows non-decreasing."""
    n, num_codes = scores.shape
    all_rows, all_ranks = [], []
    step = max(1, _BLOCK_ELEMENTS // num_codes)
    code_index = np.arange(num_codes)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        block = scores[r0:r1]
        rows, cols = np.nonzero(targets[r0:r1])
        if rows.size == 0:
            continue
        values = block[rows, cols]
        left, right = _rowwise_searchsorted(np.sort(block, axis=1), rows, values)
        ranks = num_codes - right + 1                      # 1 + #codes scoring strictly higher
        tied = np.flatnonzero(right - left > 1)            # equal scores elsewhere in the row
        chunk = max(1, _BLOCK_ELEMENTS // num_codes)
        for t0 in range(0, tied.size, chunk):
            sel = tied[t0:t0 + chunk]
            ranks[sel] += ((block[rows[sel]] == values[sel, None])
                           & (code_index[None, :] < cols[sel, None])).sum(axis=1)
        all_rows.append(rows + r0)
        all_ranks.append(ranks)
    if not all_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(all_rows), np.concatenate(all_ranks)


def _ranking_metrics(scores: np.ndarray, targets: np.ndarray, ks: tuple) -> dict:
    n, num_codes = scores.shape
    n_gold = targets.sum(axis=1, dtype=np.int64)
    has_gold = n_gold > 0
    rows, ranks = _gold_ranks(scores, targets)
    # Sort each document's gold ranks ascending: the m-th hit (1-based) sits at rank r_m.
    key = np.sort(rows * (num_codes + 1) + ranks)
    rows, ranks = np.divmod(key, num_codes + 1)
    starts = np.cumsum(n_gold) - n_gold
    hit_number = np.arange(1, rows.size + 1) - starts[rows]
    ap = np.bincount(rows, weights=hit_number / ranks, minlength=n)
    r_hits = np.bincount(rows, weights=(ranks <= n_gold[rows]).astype(np.float64), minlength=n)
    out = {}
    denom = np.where(has_gold, n_gold, 1)
    for k in ks:
        hits = np.bincount(rows, weights=(ranks <= k).astype(np.float64), minlength=n)
        out[f"p@{k}"] = float(np.mean(hits / min(k, num_codes)))
        out[f"r@{k}"] = float(np.mean((hits / denom)[has_gold])) if has_gold.any() else float("nan")
    if has_gold.any():
        out["r_precision"] = float(np.mean((r_hits / denom)[has_gold]))
        out["map"] = float(np.mean((ap / denom)[has_gold]))
    else:
        out["r_precision"] = out["map"] = float("nan")
    return out


# ----------------------------------------------------------------------------- public API
def evaluate(scores, targets, ks: Iterable[int] = DEFAULT_KS,
             threshold: float = DEFAULT_THRESHOLD) -> dict:
    """All metrics of a split (definitions in the module docstring) as a dict of floats.

    scores: probabilities [N, L]; targets: 0/1 [N, L]; ks: cut-offs for ``p@k``/``r@k``;
    threshold: a code is predicted when ``score > threshold``."""
    s = _check_scores("scores", scores)
    y = _check_targets("targets", targets, s.shape, "scores")
    ks = _check_ks(ks)
    threshold = _check_threshold("threshold", threshold)

    auc = _auc_per_code(s, y)
    pred = s > threshold
    tp = (pred & y).sum(axis=0, dtype=np.int64)
    n_pred = pred.sum(axis=0, dtype=np.int64)
    n_gold = y.sum(axis=0, dtype=np.int64)
    fp, fn = n_pred - tp, n_gold - tp
    prec_macro = float(np.mean(_safe_div(tp, n_pred)))
    rec_macro = float(np.mean(_safe_div(tp, n_gold)))
    present = n_gold > 0
    out = {
        "auc_macro": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "auc_micro": _auc_flat(s, y),
        "prec_macro": prec_macro,
        "rec_macro": rec_macro,
        "f1_macro": float(_safe_div(2 * prec_macro * rec_macro, prec_macro + rec_macro)),
        "f1_macro_per_code": (float(np.mean(_f1(tp, fp, fn)[present])) if present.any()
                              else float("nan")),
        "prec_micro": float(_safe_div(tp.sum(), n_pred.sum())),
        "rec_micro": float(_safe_div(tp.sum(), n_gold.sum())),
        "f1_micro": float(_f1(tp.sum(), fp.sum(), fn.sum())),
    }
    out.update(_ranking_metrics(s, y, ks))
    out["exact_match"] = float(np.mean((pred == y).all(axis=1)))
    out["predicted_positive_rate"] = float(pred.mean())
    return out


def tune_threshold(dev_scores, dev_targets, grid: Optional[Iterable[float]] = None) -> float:
    """The one global threshold ``t`` (predict ``score > t``) maximising dev micro-F1.

    Exact search (``grid=None``): micro-F1 can only peak when the predicted set is
    ``{score >= u}`` for a score ``u`` of a positive entry (admitting a negative-only score
    level adds false positives only), so every distinct positive score is tried and the
    threshold returned lies halfway between ``u`` and the next lower score on dev. With a
    ``grid``, its values are tried instead. Ties go to the highest threshold (fewest
    predictions). Cost: one sort of the dev scores."""
    s = _check_scores("dev_scores", dev_scores)
    y = _check_targets("dev_targets", dev_targets, s.shape, "dev_scores")
    positives = np.sort(s[y])
    if positives.size == 0:
        raise ValueError("dev_targets: expected at least one positive entry to tune a threshold "
                         "on, got none")
    flat = np.sort(s, axis=None)
    if grid is None:
        candidates = np.unique(positives)
        n_predicted = flat.size - np.searchsorted(flat, candidates, "left")
        tp = positives.size - np.searchsorted(positives, candidates, "left")
    else:
        candidates = np.unique(_to_numpy("grid", grid).astype(np.float64).ravel())
        if candidates.size == 0 or not np.isfinite(candidates).all():
            raise ValueError(f"grid: expected a non-empty list of finite thresholds, got {grid!r}")
        n_predicted = flat.size - np.searchsorted(flat, candidates, "right")
        tp = positives.size - np.searchsorted(positives, candidates, "right")
    f1 = _f1(tp, n_predicted - tp, positives.size - tp)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    if grid is not None:
        return float(candidates[best])
    u = float(candidates[best])
    below = np.searchsorted(flat, u, "left")
    if below == 0:                                        # predict everything
        return float(np.nextafter(u, -np.inf))
    lower = float(flat[below - 1])
    mid = lower + (u - lower) / 2.0
    return mid if lower <= mid < u else lower


def frequency_buckets(train_code_counts, scores, targets, threshold: float = DEFAULT_THRESHOLD,
                      edges: Sequence[int] = FREQUENCY_EDGES) -> list:
    """F1 of codes grouped by how often they occur in training (the paper's Fig. 10 view).

    Bucket ``b`` holds the codes with ``edges[b] <= count < edges[b + 1]`` (the last bucket
    is open). Each entry: ``range`` (lo, hi or None), ``label``, ``n_codes`` (codes in the
    bucket), ``n_present`` (of those, codes with a positive in this split), ``n_positives``,
    ``f1_macro_per_code`` (mean per-code F1 over the present codes; NaN if none) and
    ``f1_micro`` (over the bucket's columns)."""
    s = _check_scores("scores", scores)
    y = _check_targets("targets", targets, s.shape, "scores")
    threshold = _check_threshold("threshold", threshold)
    counts = _to_numpy("train_code_counts", train_code_counts)
    if counts.shape != (s.shape[1],):
        raise ValueError(f"train_code_counts: expected shape ({s.shape[1]},) (one count per code "
                         f"of scores), got {_describe(counts)}")
    if not (np.issubdtype(counts.dtype, np.integer) and (counts >= 0).all()):
        raise ValueError(f"train_code_counts: expected non-negative integers, got {_describe(counts)}")
    edges = tuple(int(e) for e in edges)
    if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges: expected strictly increasing non-negative integers, got {edges}")

    pred = s > threshold
    tp = (pred & y).sum(axis=0, dtype=np.int64)
    n_pred = pred.sum(axis=0, dtype=np.int64)
    n_gold = y.sum(axis=0, dtype=np.int64)
    per_code_f1 = _f1(tp, n_pred - tp, n_gold - tp)
    report = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        members = (counts >= lo) & (counts < hi if hi is not None else True)
        present = members & (n_gold > 0)
        if hi is None:
            label = f">={lo}"
        else:
            label = str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
        t, g, p = tp[members].sum(), n_gold[members].sum(), n_pred[members].sum()
        report.append({
            "range": (lo, hi),
            "label": label,
            "n_codes": int(members.sum()),
            "n_present": int(present.sum()),
            "n_positives": int(g),
            "f1_macro_per_code": (float(per_code_f1[present].mean()) if present.any()
                                  else float("nan")),
            "f1_micro": float(_f1(t, p - t, g - t)),
        })
    return report


def codiesp_map(ranked_codes_per_doc: Sequence[Sequence[str]],
                gold_codes_per_doc: Sequence[Iterable[str]],
                valid_codes: Optional[Iterable[str]] = None,
                depth: Optional[int] = CODIESP_DEPTH,
                empty_ranking_counts: bool = False) -> float:
    """CodiEsp-D/P MAP as the official scorer computes it (trectools ``get_map``, rank order
    taken from the list order).

    Per document: codes compared case-insensitively; repeated predictions and gold codes keep
    their first occurrence; predicted codes outside ``valid_codes`` are dropped *before*
    ranking; the first ``depth`` remaining codes are scored (None: all). Average precision =
    (1/#gold) * sum of precision@k over the ranks k of the gold codes found. MAP = mean over
    the documents that have gold codes and, as in the official scorer, at least one valid
    predicted code; ``empty_ranking_counts=True`` instead scores such documents as 0.
    Gold codes are never filtered. NaN when no document qualifies."""
    ranked_codes_per_doc, gold_codes_per_doc = list(ranked_codes_per_doc), list(gold_codes_per_doc)
    if len(ranked_codes_per_doc) != len(gold_codes_per_doc):
        raise ValueError(f"ranked_codes_per_doc: expected one ranking per document of "
                         f"gold_codes_per_doc ({len(gold_codes_per_doc)}), got "
                         f"{len(ranked_codes_per_doc)}")
    if depth is not None and (not isinstance(depth, (int, np.integer)) or depth < 1):
        raise ValueError(f"depth: expected a positive integer or None, got {depth!r}")
    for name, docs in (("ranked_codes_per_doc", ranked_codes_per_doc),
                       ("gold_codes_per_doc", gold_codes_per_doc)):
        for i, doc in enumerate(docs):
            if isinstance(doc, str) or not all(isinstance(c, str) for c in doc):
                raise ValueError(f"{name}[{i}]: expected a list of code strings, got {doc!r}")
    valid = None if valid_codes is None else {c.upper() for c in valid_codes}

    aps = []
    for ranking, gold in zip(ranked_codes_per_doc, gold_codes_per_doc):
        gold = {c.upper() for c in gold}
        if not gold:
            continue
        kept = [c for c in dict.fromkeys(c.upper() for c in ranking)
                if valid is None or c in valid][:depth]
        if not kept:
            if empty_ranking_counts:
                aps.append(0.0)
            continue
        hits, precision_sum = 0, 0.0
        for rank, code in enumerate(kept, start=1):
            if code in gold:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / len(gold))
    return float(np.mean(aps)) if aps else float("nan")


_LABELS = {
    "auc_macro": "AUC macro", "auc_micro": "AUC micro",
    "prec_macro": "Precision macro", "rec_macro": "Recall macro",
    "f1_macro": "F1 macro (CAML)", "f1_macro_per_code": "F1 macro per code",
    "prec_micro": "Precision micro", "rec_micro": "Recall micro", "f1_micro": "F1 micro",
    "r_precision": "R-precision", "map": "MAP", "exact_match": "Exact match",
    "predicted_positive_rate": "Predicted positive rate",
}


def format_table(metrics: dict) -> str:
    """A two-column text table of ``metrics`` in their order: fractions as percentages with
    one decimal, NaN as 'n/a', anything else as is."""
    rows = []
    for key, value in metrics.items():
        label = _LABELS.get(key, key.replace("p@", "P@").replace("r@", "R@"))
        if isinstance(value, (bool, int, np.integer)) or not isinstance(value, (float, np.floating)):
            text = str(value)
        elif math.isnan(value):
            text = "n/a"
        else:
            text = f"{100.0 * value:.1f}"
        rows.append((label, text))
    width = max([len("metric")] + [len(label) for label, _ in rows])
    value_width = max([len("%")] + [len(text) for _, text in rows])
    lines = [f"{'metric':<{width}}  {'%':>{value_width}}",
             f"{'-' * width}  {'-' * value_width}"]
    lines += [f"{label:<{width}}  {text:>{value_width}}" for label, text in rows]
    return "\n".join(lines)
