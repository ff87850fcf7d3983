"""Degenerate-run alarms: a run that collapsed must say so, not just print a low number.

After each evaluation: predictions all positive or all negative at the threshold, a tuned
threshold at the edge of its range, and a micro-F1 below the trivial baseline of predicting the
k most frequent training codes for every document (k = the mean number of gold codes per
document) are reported as warnings, which also land in the metrics JSON.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from .. import metrics

THRESHOLD_BOUNDS = (0.01, 0.99)


def trivial_baseline_f1(train_counts: np.ndarray, targets: np.ndarray) -> float:
    """Micro-F1 of predicting the k most frequent training codes for every document."""
    k = max(1, int(round(float(targets.sum(axis=1).mean()))))
    top = np.argsort(-train_counts, kind="stable")[:k]
    pred = np.zeros(targets.shape, dtype=bool)
    pred[:, top] = True
    gold = targets.astype(bool)
    tp = float((pred & gold).sum())
    denominator = float(pred.sum() + gold.sum())
    return 2 * tp / denominator if denominator else 0.0


def degenerate_run_warnings(scores: np.ndarray, targets: np.ndarray, threshold: float,
                            train_counts: Optional[np.ndarray] = None, tuned: bool = False) -> list:
    """Warnings (strings) about a collapsed run; each is also issued with warnings.warn."""
    found = []
    rate = float((scores > threshold).mean())
    if rate == 0.0:
        found.append(f"every prediction is negative at threshold {threshold:.3f}")
    elif rate == 1.0:
        found.append(f"every prediction is positive at threshold {threshold:.3f}")
    if tuned and not THRESHOLD_BOUNDS[0] < threshold < THRESHOLD_BOUNDS[1]:
        found.append(f"the tuned threshold {threshold:.4f} sits at the edge of its range {THRESHOLD_BOUNDS}")
    if train_counts is not None:
        baseline = trivial_baseline_f1(train_counts, targets)
        f1 = metrics.evaluate(scores, targets, threshold=threshold)["f1_micro"]
        if f1 < baseline:
            found.append(f"micro-F1 {f1:.4f} is below the trivial baseline {baseline:.4f} "
                         "(the most frequent training codes for every document)")
    for message in found:
        warnings.warn(f"degenerate run: {message}", RuntimeWarning, stacklevel=2)
    return found
