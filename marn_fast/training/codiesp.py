"""CodiEsp evaluation: the track's MAP, a TF-IDF + logistic-regression baseline, attention
evidence scored against the gold CodiEsp-X spans, and the report that puts them next to the
CLEF 2020 results.

- MAP (CodiEsp-D / CodiEsp-P, `codiesp_map_of`): each test case's codes ranked by score; per
  case, the sum of precision@k over the ranks k of its gold codes found, divided by the number
  of its gold codes; mean over the test cases. Gold codes are the case's codes in the split
  files, *all* of them: a gold code outside the model's label space (never seen in training)
  can never be ranked, but it still counts in the denominator, as in the official scorer
  (which only filters *predicted* codes against the valid code list; every code a model ranks
  here comes from the training files, so none is filtered). `marn_fast.metrics.codiesp_map`
  does the arithmetic (trectools' depth of 1,000 ranks; a case whose ranking is empty is
  skipped, as the official scorer does). The package's own `map` (in `metrics.evaluate`) is
  over the label space only, so it is higher; both are reported. With the "DP" label set the
  diagnosis and procedure labels are ranked and scored separately (CodiEsp-D and CodiEsp-P).
- Baseline (`tfidf_logreg_scores`): TF-IDF of the same tokens (train vocabulary, document
  frequency ≥ 2, sublinear tf, smooth idf, unit rows) and one L2-regularised logistic
  regression per code (one-vs-rest; scikit-learn's objective C·Σ log-loss + ½‖w‖², unpenalised
  bias), in plain torch: fitted jointly with L-BFGS in the coordinates of the training rows'
  span (exact for this objective: the weights lie in it; 500 training cases make it a 500-wide
  problem whatever the vocabulary), C picked on dev MAP from `BASELINE_C_GRID`. No scikit-learn needed
  (tests check it against
  scikit-learn's LogisticRegression), so it also runs on GPU machines.
- Evidence (`attention_spans`, `score_evidence`): for each code to explain, the k tokens with
  the largest label-wise attention (the model's `evidence_topk`), merged into spans
  where they are adjacent tokens, mapped to character offsets of the Spanish text; a
  predicted (code, span) counts when the code is right and the span overlaps a gold span of
  that code (CodiEsp-X), precision over predicted pairs, recall over gold rows. The random
  baseline draws the same number of tokens per code uniformly (seeded). Scored for the codes
  the model predicts (probability above the dev-tuned threshold; at most
  `MAX_EXPLAINED_CODES` per case, the most probable) and, separating explanation
  from coding, for the case's gold codes in the label space.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .. import metrics
from ..data.codiesp import EvidenceSpan, code_of, evidence_by_document

CODIESP_FILE = "codiesp.json"
BASELINE_C_GRID = (100.0, 1000.0, 10000.0)  # less regularisation kept winning on dev
DEFAULT_EVIDENCE_K = 3
MAX_EXPLAINED_CODES = 20  # predicted codes explained per case: those above the threshold, at most this many

# The CLEF eHealth 2020 CodiEsp results this report prints for orientation (test set, Spanish
# text). Source: Miranda-Escalada et al., "Overview of automatic clinical coding: annotations,
# guidelines, and solutions for non-English clinical cases at CodiEsp track of CLEF eHealth
# 2020", CLEF 2020 Working Notes, CEUR-WS Vol-2696, paper 263. Only numbers read from that
# paper belong here; none could be verified from the sources at hand when this was written, so
# the table is empty and the report says so (fill it from the paper's results tables:
# {"CodiEsp-D": {"best MAP": ..., "median MAP": ...}, "CodiEsp-P": {...}, "CodiEsp-X": {"best F1": ...}}).
CLEF2020_SOURCE = ("Miranda-Escalada et al., CLEF 2020 Working Notes (CEUR-WS Vol-2696, paper 263), "
                   "overview of the CodiEsp track")
CLEF2020_RESULTS: dict = {}


# ----------------------------------------------------------------------------- MAP
def ranked_labels(scores: np.ndarray, labels: Sequence[str]) -> list[list[str]]:
    """Each row's labels by descending score (ties: lower column first)."""
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
    labels = np.asarray(labels, dtype=object)
    return [list(labels[row]) for row in order]


def codiesp_map_of(scores: np.ndarray, labels: Sequence[str], gold: Sequence[Iterable[str]], code_set: str,
                   code_type: Optional[str] = None) -> float:
    """CodiEsp MAP of a score matrix [cases, labels] against each case's gold labels (all of
    them, inside the label space or not). code_type "D"/"P" scores that type only (for "DP")."""
    keep = [i for i, label in enumerate(labels) if code_type is None or code_of(label, code_set)[0] == code_type]
    kept_labels = [labels[i] for i in keep]
    ranked = ranked_labels(np.asarray(scores)[:, keep], kept_labels)
    gold = [[g for g in doc if code_type is None or code_of(g, code_set)[0] == code_type] for doc in gold]
    return metrics.codiesp_map(ranked, gold)


def map_report(scores: np.ndarray, labels: Sequence[str], gold: Sequence[Iterable[str]], code_set: str) -> dict:
    """{"CodiEsp-D": MAP, "CodiEsp-P": MAP} for the types in the label set."""
    return {f"CodiEsp-{t}": codiesp_map_of(scores, labels, gold, code_set, t if code_set == "DP" else None)
            for t in code_set}


# ----------------------------------------------------------------------------- TF-IDF + LR
def tfidf_matrices(train_texts: Sequence[str], other_texts: Sequence[Sequence[str]], min_df: int = 2):
    """TF-IDF rows (float64 tensors) of the train texts and of each list of other texts: train
    vocabulary (document frequency ≥ min_df), tf 1 + log(count), idf log((1 + N)/(1 + df)) + 1,
    rows L2-normalised."""
    doc_freq: dict[str, int] = {}
    for text in train_texts:
        for word in set(text.split()):
            doc_freq[word] = doc_freq.get(word, 0) + 1
    words = sorted(w for w, n in doc_freq.items() if n >= min_df)
    if not words:
        raise ValueError(f"tfidf: no word occurs in {min_df} or more training texts")
    index = {w: i for i, w in enumerate(words)}
    n = len(train_texts)
    idf = torch.tensor([math.log((1 + n) / (1 + doc_freq[w])) + 1 for w in words], dtype=torch.float64)

    def rows(texts):
        out = torch.zeros(len(texts), len(words), dtype=torch.float64)
        for r, text in enumerate(texts):
            counts: dict[int, int] = {}
            for word in text.split():
                j = index.get(word)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if counts:
                cols = torch.tensor(list(counts))
                out[r, cols] = 1 + torch.log(torch.tensor(list(counts.values()), dtype=torch.float64))
        out *= idf
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return rows(train_texts), [rows(t) for t in other_texts]


def fit_logreg(features: torch.Tensor, targets: torch.Tensor, c: float, max_iter: int = 300,
               tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest L2 logistic regression: minimises, over every label jointly (the labels do not
    interact), c·Σ_i log-loss(x_i·w + b, y_i) + ½‖w‖² per label column (scikit-learn's
    objective, bias unpenalised) with L-BFGS. features [N, D], targets [N, L] 0/1 → (W [D, L], b [L])."""
    x, y = features.double(), targets.double()
    weight = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    prior = y.mean(0).clamp(1e-4, 1 - 1e-4)
    bias = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (c * torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y, reduction="sum")
                + 0.5 * weight.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def row_space(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """The rows in coordinates of the train rows' span (X = U S Vᵀ: X V = U S, [N, rank]). An
    L2-regularised linear model's weights lie in that span, so fitting on these rank ≤ N
    features gives the same predictions as on the D-dimensional ones, at N × N cost."""
    _, singular, vh = torch.linalg.svd(train, full_matrices=False)
    basis = vh[singular > singular.max() * 1e-10].T
    return [m @ basis for m in (train, *others)]


def tfidf_logreg_scores(train_texts: Sequence[str], train_targets: np.ndarray, dev_texts: Sequence[str],
                        test_texts: Sequence[str], dev_score: Callable[[np.ndarray], float],
                        c_grid: Sequence[float] = BASELINE_C_GRID, device: Optional[torch.device] = None) -> dict:
    """The TF-IDF + one-vs-rest logistic-regression baseline: fitted on train for each C of
    `c_grid`, the C with the best `dev_score(dev probabilities)` kept. Returns {"c", "dev_by_c",
    "dev_scores", "test_scores" (probabilities [N, L], float32 numpy)}."""
    device = device or torch.device("cpu")
    x_train, (x_dev, x_test) = tfidf_matrices(train_texts, [dev_texts, test_texts])
    features = x_train.shape[1]
    x_train, x_dev, x_test = row_space(x_train.to(device), x_dev.to(device), x_test.to(device))
    y = torch.as_tensor(np.asarray(train_targets), dtype=torch.float64, device=device)
    best = None
    dev_by_c = {}
    for c in c_grid:
        weight, bias = fit_logreg(x_train, y, c)
        dev = torch.sigmoid(x_dev @ weight + bias).float().cpu().numpy()
        dev_by_c[str(c)] = value = float(dev_score(dev))
        if best is None or value > best[0]:
            test = torch.sigmoid(x_test @ weight + bias).float().cpu().numpy()
            best = (value, c, dev, test)
    return {"c": best[1], "dev_by_c": dev_by_c, "dev_scores": best[2], "test_scores": best[3],
            "features": int(features)}


# ----------------------------------------------------------------------------- evidence
def merge_positions(positions: Iterable[int], offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans of token positions, adjacent tokens (p, p + 1) merged into one span."""
    spans: list[tuple[int, int]] = []
    last = None
    for p in sorted(set(int(p) for p in positions if p >= 0)):
        if last is not None and p == last + 1:
            spans[-1] = (spans[-1][0], offsets[p][1])
        else:
            spans.append((offsets[p][0], offsets[p][1]))
        last = p
    return spans


@torch.no_grad()
def attention_positions(model, token_ids: np.ndarray, labels: Sequence[int], k: int,
                        device: torch.device) -> list[list[int]]:
    """For one document: the positions of the k tokens with the largest label-wise attention of
    each label (largest first; fewer when the document is shorter)."""
    if not len(labels):
        return []
    core = model.module if hasattr(model, "module") else model
    was_training = core.training
    core.eval()
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=device)[None, :]
    features = core.encode(ids)
    chosen = torch.as_tensor(list(labels), dtype=torch.int64, device=device)
    positions, _ = core.evidence_topk(features, chosen, min(k, ids.shape[1]))
    core.train(was_training)
    return [[p for p in row if p >= 0] for row in positions[0].tolist()]


def random_positions(num_tokens: int, count: int, rng: np.random.Generator) -> list[int]:
    """`count` distinct token positions drawn uniformly (all of them when the document is shorter)."""
    return rng.choice(num_tokens, size=min(count, num_tokens), replace=False).tolist()


def _overlaps(start: int, end: int, segments) -> bool:
    return any(start < s_end and s_start < end for s_start, s_end in segments)


def score_evidence(predicted: dict[str, Iterable[tuple[str, int, int]]], gold: Sequence[EvidenceSpan],
                   doc_ids: Optional[Iterable[str]] = None) -> dict:
    """CodiEsp-X style scores of predicted (label, start, end) pairs per document against gold
    evidence. A predicted pair is correct when a gold row of the same document and label has a
    segment overlapping [start, end); a gold row is found when some predicted pair of its label
    overlaps one of its segments. Only documents in `doc_ids` count (default: those predicted
    and those with gold). Returns precision, recall, f1 and the counts."""
    by_doc = evidence_by_document(gold)
    ids = set(doc_ids) if doc_ids is not None else set(predicted) | set(by_doc)
    n_pred = n_pred_ok = n_gold = n_gold_found = 0
    for doc in ids:
        pairs = set(predicted.get(doc, ()))
        gold_rows = by_doc.get(doc, [])
        n_pred += len(pairs)
        n_gold += len(gold_rows)
        n_pred_ok += sum(any(g.label == label and _overlaps(s, e, g.segments) for g in gold_rows)
                         for label, s, e in pairs)
        n_gold_found += sum(any(label == g.label and _overlaps(s, e, g.segments) for label, s, e in pairs)
                            for g in gold_rows)
    precision = n_pred_ok / n_pred if n_pred else 0.0
    recall = n_gold_found / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted_pairs": n_pred,
            "correct_pairs": n_pred_ok, "gold_rows": n_gold, "gold_found": n_gold_found}


def evidence_report(model, dataset, documents, labels: Sequence[str], gold: Sequence[EvidenceSpan],
                    codes_per_doc: dict[str, list[int]], k: int, device: torch.device, seed: int = 0) -> dict:
    """Attention evidence and the random-token baseline for the chosen label indices of each
    document, both scored with `score_evidence`."""
    rng = np.random.default_rng(seed)
    attention, rand = {}, {}
    for i, doc in enumerate(documents):
        chosen = codes_per_doc.get(doc.id, [])
        token_ids = dataset[i].token_ids
        n = len(token_ids)  # offsets beyond max_length were truncated away
        attention[doc.id] = [(labels[c], s, e) for c, pos in
                             zip(chosen, attention_positions(model, token_ids, chosen, k, device))
                             for s, e in merge_positions(pos, doc.offsets)]
        rand[doc.id] = [(labels[c], s, e) for c in chosen
                        for s, e in merge_positions(random_positions(n, k, rng), doc.offsets)]
    ids = [doc.id for doc in documents]
    return {"attention": score_evidence(attention, gold, ids), "random": score_evidence(rand, gold, ids),
            "codes_explained": int(sum(len(v) for v in codes_per_doc.values())), "tokens_per_code": k}


# ----------------------------------------------------------------------------- the run's report
def codiesp_report(exp, model, test, threshold: float, device: torch.device, baseline: bool = True,
                   evidence_k: int = DEFAULT_EVIDENCE_K, log: Optional[Callable[[str], None]] = None) -> dict:
    """CodiEsp MAP of the run's test predictions, the baseline's (same split, same label space),
    and the attention evidence scores (Spanish text only: the gold offsets index it)."""
    log = log or (lambda line: print(line, flush=True))
    started = time.perf_counter()
    settings = exp.settings
    labels = exp.icd_space.codes
    test_docs, dev_docs = exp.corpus.split("test"), exp.corpus.split("dev")
    if [d.id for d in test_docs] != list(test.ids):
        order = {doc_id: i for i, doc_id in enumerate(test.ids)}
        test_scores = test.icd_scores[[order[d.id] for d in test_docs]]
    else:
        test_scores = test.icd_scores
    gold = [d.labels for d in test_docs]
    # "model" names the trained model; its scores stay under "marn" (the key earlier results use).
    out = {"model": type(model.module if hasattr(model, "module") else model).__name__,
           "language": settings.language, "codes": settings.codes, "aux": settings.aux if exp.mapper else "none",
           "label_space": len(labels), "threshold": threshold,
           "test_gold_outside_label_space": int(sum(c not in exp.icd_space for doc in gold for c in doc)),
           "test_gold": int(sum(len(doc) for doc in gold)),
           "marn": {"map": map_report(test_scores, labels, gold, settings.codes),
                    "map_label_space": float(metrics.evaluate(test_scores, _targets(test_docs, exp))["map"])}}
    if exp.mapper is not None:
        out["aux_stats"] = {"mapped": exp.mapper.stats["mapped"], "unmapped": exp.mapper.stats["unmapped"],
                            "skipped": exp.mapper.stats.get("skipped", 0),
                            "unmapped_codes": len(exp.mapper.stats["unmapped_codes"])}
    seconds = {}
    if baseline:
        dev_gold = [d.labels for d in dev_docs]
        result = tfidf_logreg_scores([d.text for d in exp.corpus.split("train")],
                                     _targets(exp.corpus.split("train"), exp), [d.text for d in dev_docs],
                                     [d.text for d in test_docs],
                                     lambda s: np.mean(list(map_report(s, labels, dev_gold, settings.codes).values())),
                                     device=device)
        tuned = metrics.tune_threshold(result["dev_scores"], _targets(dev_docs, exp))
        out["baseline"] = {"name": "TF-IDF + one-vs-rest logistic regression", "c": result["c"],
                           "dev_map_by_c": result["dev_by_c"], "features": result["features"],
                           "map": map_report(result["test_scores"], labels, gold, settings.codes),
                           "test_at_tuned_threshold": metrics.evaluate(result["test_scores"],
                                                                       _targets(test_docs, exp), threshold=tuned),
                           "tuned_threshold": tuned}
        seconds["baseline"] = time.perf_counter() - started
    if settings.language == "es" and exp.corpus.evidence.get("test"):
        dataset = exp.datasets["test"]
        top = np.argsort(-test_scores, axis=1, kind="stable")[:, :MAX_EXPLAINED_CODES]
        predicted = {d.id: [c for c in top[i].tolist() if test_scores[i, c] > threshold]
                     for i, d in enumerate(test_docs)}
        gold_codes = {d.id: exp.icd_space.indices(d.labels)[0] for d in test_docs}
        out["evidence"] = {
            "predicted_codes": evidence_report(model, dataset, test_docs, labels, exp.corpus.evidence["test"],
                                               predicted, evidence_k, device, seed=settings.seed),
            "gold_codes": evidence_report(model, dataset, test_docs, labels, exp.corpus.evidence["test"],
                                          gold_codes, evidence_k, device, seed=settings.seed)}
        seconds["evidence"] = time.perf_counter() - started - seconds.get("baseline", 0.0)
    out["seconds"] = seconds
    log("\n" + format_codiesp(out))
    return out


def _targets(documents, exp) -> np.ndarray:
    y = np.zeros((len(documents), len(exp.icd_space)), dtype=np.float32)
    for i, doc in enumerate(documents):
        y[i, exp.icd_space.indices(doc.labels)[0]] = 1.0
    return y


def format_codiesp(report: dict) -> str:
    """The run's CodiEsp table: MAP of the model (MARN or LAAT), the baseline and CLEF 2020, evidence P/R/F1."""
    lines = [f"CodiEsp test ({report['language']}, codes {report['codes']}, aux {report['aux']}; "
             f"{report['test_gold_outside_label_space']} of {report['test_gold']} gold codes outside the label space)"]
    tasks = list(report["marn"]["map"])
    lines.append(f"{'system':<44}" + "".join(f"{t + ' MAP':>16}" for t in tasks))
    system = "marn_fast " + report.get("model", "MARN")
    lines.append(f"{system:<44}" + "".join(f"{report['marn']['map'][t]:>16.3f}" for t in tasks))
    if "baseline" in report:
        lines.append(f"{'TF-IDF + LR (C=' + str(report['baseline']['c']) + ')':<44}"
                     + "".join(f"{report['baseline']['map'][t]:>16.3f}" for t in tasks))
    lines += clef_lines(tasks)
    for which, scores in report.get("evidence", {}).items():
        a, r = scores["attention"], scores["random"]
        lines.append(f"evidence for {which.replace('_', ' ')} ({scores['codes_explained']} codes, "
                     f"{scores['tokens_per_code']} tokens each): attention P {a['precision']:.3f} R {a['recall']:.3f} "
                     f"F1 {a['f1']:.3f}; random tokens P {r['precision']:.3f} R {r['recall']:.3f} F1 {r['f1']:.3f}")
    return "\n".join(lines)


def clef_lines(tasks: Sequence[str]) -> list[str]:
    if not CLEF2020_RESULTS:
        return [f"CLEF 2020 CodiEsp results: not included (could not be verified; see {CLEF2020_SOURCE})"]
    lines = []
    for task in tasks:
        for name, value in CLEF2020_RESULTS.get(task, {}).items():
            lines.append(f"{'CLEF 2020 ' + task + ' ' + name:<44}{value:>16.3f}")
    return lines


# ----------------------------------------------------------------------------- across runs
def collect_runs(run_dirs: Iterable[str | Path]) -> list[dict]:
    """The CodiEsp sections of run folders' metrics.json (a folder of seed-<n>/ runs expands),
    with the model options from config.json."""
    import json

    runs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        found = sorted(run_dir.glob("seed-*/metrics.json")) or [run_dir / "metrics.json"]
        for path in found:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no metrics.json (is {run_dir} a train run folder?)")
            report = json.loads(path.read_text(encoding="utf-8"))
            if "codiesp" not in report:
                raise ValueError(f"{path}: not a CodiEsp run (no 'codiesp' section)")
            config_path = path.parent / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            runs.append({"dir": str(path.parent), "group": run_dir.name, "report": report,
                         "config": config, "seconds": report.get("seconds")})
    return runs


def _mean_spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize_runs(runs: list[dict]) -> str:
    """One line per group of runs (a run folder, or a folder of seeds): MAP mean ± sample std
    (ddof 1) over its runs, the baseline's, evidence F1 (attention vs random) and the time."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    tasks = sorted({t for run in runs for t in run["report"]["codiesp"]["marn"]["map"]})
    header = (f"{'run':<24}{'n':>3}" + "".join(f"{t + ' MAP':>20}" for t in tasks)
              + f"{'baseline MAP':>20}{'evidence F1 att/rand':>32}{'minutes':>16}")
    lines = [header]
    for name, group in groups.items():
        cs = [run["report"]["codiesp"] for run in group]
        row = f"{name:<24}{len(group):>3}"
        row += "".join(f"{_mean_spread([c['marn']['map'].get(t) for c in cs]):>20}" for t in tasks)
        base = [np.mean(list(c["baseline"]["map"].values())) for c in cs if "baseline" in c]
        row += f"{_mean_spread(base):>20}"
        ev = [c["evidence"]["predicted_codes"] for c in cs if "evidence" in c]
        evidence = (_mean_spread([e["attention"]["f1"] for e in ev]) + " / "
                    + _mean_spread([e["random"]["f1"] for e in ev])) if ev else "-"
        row += f"{evidence:>32}"
        secs = [run["seconds"] / 60 for run in group if run["seconds"]]
        row += f"{_mean_spread(secs):>16}"
        lines.append(row)
    lines += clef_lines(tasks)
    return "\n".join(lines)
