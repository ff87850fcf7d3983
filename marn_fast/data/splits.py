"""Train/dev/test splits: CAML's HADM-id files and seeded patient-level splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._io import open_text
from .caml import SPLITS


def read_hadm_ids(path: str | Path) -> list[str]:
    """HADM ids from a CAML split file (one per line; a non-numeric header line is skipped)."""
    ids = []
    with open_text(path) as handle:
        for i, line in enumerate(handle):
            value = line.strip().split(",")[0].strip()
            if not value or (i == 0 and not value.isdigit()):
                continue
            ids.append(value)
    return ids


def check_split_fractions(fractions) -> tuple[float, float, float]:
    """ValueError unless `fractions` are 3 non-negative numbers (train, dev, test) summing to 1."""
    fractions = tuple(fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    return fractions


def patient_split(subject_of: dict[str, str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Admissions → train/dev/test by patient (seeded): no SUBJECT_ID in two splits.

    fractions are of patients; each split's admissions are returned sorted."""
    fractions = check_split_fractions(fractions)
    subjects = sorted(set(subject_of.values()), key=lambda s: (len(s), s))
    order = np.random.default_rng(seed).permutation(len(subjects))
    bounds = np.round(np.cumsum(fractions)[:2] * len(subjects)).astype(int)
    split_of_subject = {}
    for rank, i in enumerate(order):
        split_of_subject[subjects[i]] = SPLITS[0] if rank < bounds[0] else SPLITS[1] if rank < bounds[1] else SPLITS[2]
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for hadm, subject in subject_of.items():
        out[split_of_subject[subject]].append(hadm)
    return {s: sorted(ids, key=lambda h: (len(h), h)) for s, ids in out.items()}
