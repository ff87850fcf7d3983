"""Label spaces: the ordered code lists that give each ICD or CCS label its output index."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..files import write_json_atomic
from .caml import Document
from .caml_top50 import CAML_TOP50_CODES

LABEL_SPACE_FORMAT = "marn_fast.label_space"
DEFAULT_TOP_K = 50  # the "top-50" setting of the field
TOP50_SOURCES = ("caml", "frequency")  # CAML's published list, or the training split's most frequent codes


class LabelSpace:
    """An ordered, duplicate-free list of label strings and their indices.

    `codes[i]` is output column i; codes are kept as strings exactly as given.
    """

    def __init__(self, codes: Sequence[str], name: str = "icd"):
        codes = list(codes)
        for code in codes:
            if not isinstance(code, str) or not code:
                raise ValueError(f"codes must be non-empty strings, got {code!r}")
        self.codes = codes
        self.name = name
        self.index = {code: i for i, code in enumerate(codes)}
        if len(self.index) != len(codes):
            dupes = sorted(c for c, n in Counter(codes).items() if n > 1)
            raise ValueError(f"codes must be unique, got duplicates {dupes[:10]}")

    def __len__(self) -> int:
        return len(self.codes)

    def __contains__(self, code: str) -> bool:
        return code in self.index

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelSpace) and self.codes == other.codes and self.name == other.name

    def __repr__(self) -> str:
        return f"LabelSpace(name={self.name!r}, size={len(self)})"

    def indices(self, codes: Iterable[str]) -> tuple[list[int], list[str]]:
        """(indices of the codes in this space, codes not in it), both in input order."""
        found, missing = [], []
        for code in codes:
            i = self.index.get(code)
            if i is None:
                missing.append(code)
            else:
                found.append(i)
        return found, missing

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, {"format": LABEL_SPACE_FORMAT, "version": 1, "name": self.name, "codes": self.codes})

    @classmethod
    def load(cls, path: str | Path) -> "LabelSpace":
        with open(path, encoding="utf-8") as handle:
            obj = json.load(handle)
        if obj.get("format") != LABEL_SPACE_FORMAT:
            raise ValueError(f"{path}: not a label space file (format {obj.get('format')!r}, "
                             f"expected {LABEL_SPACE_FORMAT!r})")
        return cls(obj["codes"], name=obj["name"])


def code_counts(documents: Iterable[Document]) -> Counter:
    """How many documents carry each code."""
    counts: Counter = Counter()
    for doc in documents:
        counts.update(doc.labels)
    return counts


def build_icd_label_space(train: Iterable[Document], *others: Iterable[Document]) -> LabelSpace:
    """The ICD label space: codes of the training documents, sorted as strings.

    Pass the dev and test documents as `others` to take the union of the splits instead (the
    official CAML/MARN behaviour, which gives an output column to codes never seen in
    training). Sorted order makes the space independent of document order.
    """
    codes: set[str] = set()
    for docs in (train, *others):
        for doc in docs:
            codes.update(doc.labels)
    if not codes:
        raise ValueError("train: no labels in the documents; cannot build a label space")
    return LabelSpace(sorted(codes), name="icd")


def top_k_codes(documents: Iterable[Document], k: int = DEFAULT_TOP_K) -> list[str]:
    """The k most frequent codes (by document count; ties broken by code string), most frequent first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    counts = code_counts(documents)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if len(ranked) < k:
        warnings.warn(f"top_k_codes: only {len(ranked)} distinct codes, fewer than k={k}", stacklevel=2)
    return [code for code, _ in ranked[:k]]


def restrict_to_codes(documents: Iterable[Document], codes: Iterable[str]) -> list[Document]:
    """The documents that carry at least one of `codes`, with their labels restricted to them.

    This builds the top-50 setting from the full one (as CAML does: admissions without a
    top-50 code are left out).
    """
    keep = set(codes)
    out = []
    for doc in documents:
        labels = [c for c in doc.labels if c in keep]
        if labels:
            out.append(Document(id=doc.id, subject_id=doc.subject_id, text=doc.text, labels=labels))
    return out


def select_top50(source: str, train: Sequence[Document], k: int = DEFAULT_TOP_K) -> list[str]:
    """The codes of the top-50 setting.

    source "caml": CAML's MIMIC-III list (`caml_top50.CAML_TOP50_CODES`), exactly, whatever the
    data's frequencies; a ValueError when none of its codes occurs in `train` (data that is not
    MIMIC-III ICD-9: use "frequency"), and a warning naming the codes that do not occur there.
    source "frequency": the k codes most frequent in `train` (`top_k_codes`).
    """
    if source == "frequency":
        return top_k_codes(train, k)
    if source != "caml":
        raise ValueError(f"top50: expected one of {TOP50_SOURCES}, got {source!r}")
    present = code_counts(train)
    missing = [c for c in CAML_TOP50_CODES if c not in present]
    if len(missing) == len(CAML_TOP50_CODES):
        seen = sorted(present, key=lambda c: (-present[c], c))[:5]
        raise ValueError("top50 'caml': none of CAML's 50 MIMIC-III codes occurs in the training documents "
                         f"(their most frequent codes are {seen}); use --top50 frequency for other data")
    if missing:
        warnings.warn(f"top50 'caml': {len(missing)} of CAML's 50 codes never occur in the training documents "
                      f"and get no output column: {missing[:10]}", stacklevel=2)
    return list(CAML_TOP50_CODES)
