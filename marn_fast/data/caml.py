"""CAML-format corpora: tokenisation, documents, and the split CSVs.

A CAML-format folder (Mullenbach et al., 2018; the standard preprocessed MIMIC-III of the
field) holds `train_full.csv`, `dev_full.csv`, `test_full.csv` and/or `train_50.csv`,
`dev_50.csv`, `test_50.csv`, each with the columns SUBJECT_ID, HADM_ID, TEXT, LABELS, length.
TEXT is the tokenised note (tokens joined by single spaces); LABELS holds `;`-separated dotted
ICD codes, read as strings ("99.10" stays "99.10").
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..files import atomic_text_writer
from ._io import csv_records, warn_lines

CAML_COLUMNS = ("SUBJECT_ID", "HADM_ID", "TEXT", "LABELS", "length")
LABEL_SEPARATOR = ";"
SPLITS = ("train", "dev", "test")
SETTINGS = ("full", "50")

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """CAML's tokeniser: `\\w+` tokens, lower-cased, dropping the purely numeric ones.

    This is CAML's rule (`RegexpTokenizer(r'\\w+')` then `not t.isnumeric()`): punctuation and
    numbers go, words that contain a letter stay ("2mg" stays, "2015" goes). It is idempotent,
    so re-tokenising a CAML TEXT field changes nothing.
    """
    return [t.lower() for t in _WORD.findall(text) if not t.isnumeric()]


@dataclass
class Document:
    """One admission's note and codes.

    id: the HADM_ID (a string). subject_id: the patient. text: CAML tokens joined by single
    spaces (kept as one string: far smaller than a list of token strings). labels: ICD code
    strings, unique, in file order.
    """

    id: str
    subject_id: str
    text: str
    labels: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> list[str]:
        """The note's tokens (split on demand; not cached, to keep memory low)."""
        return self.text.split()

    @property
    def num_tokens(self) -> int:
        return self.text.count(" ") + 1 if self.text else 0


def parse_labels(field_value: str) -> list[str]:
    """`;`-separated codes to a list of unique code strings (empty entries dropped)."""
    seen: dict[str, None] = {}
    for code in field_value.split(LABEL_SEPARATOR):
        code = code.strip()
        if code:
            seen.setdefault(code, None)
    return list(seen)


def read_caml_csv(path: str | Path, stats: dict | None = None) -> list[Document]:
    """Read one CAML-format CSV (plain or .gz) into Documents.

    Raises ValueError naming the file for a missing column, and the file and line for a
    malformed row (wrong number of fields) or an empty HADM_ID. An empty note (no tokens after
    CAML tokenisation) is skipped; a row without labels and a repeated HADM_ID are kept. Each
    is counted in `stats` (if given: keys "rows", "empty_notes", "no_labels", "duplicate_ids",
    "empty_note_lines") and reported by one warning naming the file and the first lines.
    """
    path = Path(path)
    docs: list[Document] = []
    empty_lines: list[int] = []
    no_label_lines: list[int] = []
    duplicate_lines: list[int] = []
    seen_ids: dict[str, int] = {}
    for start, row in csv_records(path, CAML_COLUMNS, expected=f", expected columns {list(CAML_COLUMNS)}"):
        hadm = row["HADM_ID"].strip()
        if not hadm:
            raise ValueError(f"{path}, line {start}: empty HADM_ID")
        if hadm in seen_ids:
            duplicate_lines.append(start)
        seen_ids.setdefault(hadm, start)
        tokens = tokenize(row["TEXT"])
        if not tokens:
            empty_lines.append(start)
            continue
        labels = parse_labels(row["LABELS"])
        if not labels:
            no_label_lines.append(start)
        docs.append(Document(id=hadm, subject_id=row["SUBJECT_ID"].strip(),
                             text=" ".join(tokens), labels=labels))
    for lines, what in ((empty_lines, "empty notes skipped"), (no_label_lines, "rows without labels kept"),
                        (duplicate_lines, "rows repeating an earlier HADM_ID kept")):
        warn_lines(path, what, lines)
    if stats is not None:
        stats.update(rows=len(docs) + len(empty_lines), empty_notes=len(empty_lines),
                     no_labels=len(no_label_lines), duplicate_ids=len(duplicate_lines),
                     empty_note_lines=empty_lines)
    return docs


def write_caml_csv(path: str | Path, documents: Iterable[Document]) -> int:
    """Write Documents as a CAML-format CSV atomically; returns the number of rows written."""
    count = 0
    with atomic_text_writer(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CAML_COLUMNS)
        for doc in documents:
            writer.writerow([doc.subject_id, doc.id, doc.text, LABEL_SEPARATOR.join(doc.labels), doc.num_tokens])
            count += 1
    return count


def caml_split_path(data_dir: str | Path, split: str, setting: str = "full") -> Path:
    """`data_dir/{split}_{setting}.csv`, or its .gz twin when only that exists."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    path = Path(data_dir) / f"{split}_{setting}.csv"
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.exists() else path


@dataclass
class CamlCorpus:
    """The three splits of a CAML-format folder, and per-split reading statistics."""

    train: list[Document]
    dev: list[Document]
    test: list[Document]
    stats: dict[str, dict] = field(default_factory=dict)

    def split(self, name: str) -> list[Document]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def load_caml_splits(data_dir: str | Path, setting: str = "full", top50: str | None = None) -> CamlCorpus:
    """Read `{train,dev,test}_{setting}.csv` from a CAML-format folder.

    setting: "full" (all codes) or "50" (the top-50 setting). top50 (setting "50" only): None
    keeps the files' labels as they are; "caml" or "frequency" restricts every split to the codes
    that `labels.select_top50` picks (CAML's list, or the 50 most frequent training codes) and
    records them in `stats["top50"]`. Raises FileNotFoundError naming the missing file, and
    ValueError for malformed content (see `read_caml_csv`).
    """
    parts: dict[str, list[Document]] = {}
    stats: dict[str, dict] = {}
    for split in SPLITS:
        path = caml_split_path(data_dir, split, setting)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a CAML-format folder holds {split}_{setting}.csv)")
        stats[split] = {"path": str(path)}
        parts[split] = read_caml_csv(path, stats=stats[split])
    if top50 is not None:
        if setting != "50":
            raise ValueError(f"top50: only for the '50' setting, got setting {setting!r}")
        from .labels import restrict_to_codes, select_top50

        codes = select_top50(top50, parts["train"])
        parts = {split: restrict_to_codes(docs, codes) for split, docs in parts.items()}
        stats["top50"] = {"source": top50, "codes": codes}
    return CamlCorpus(stats=stats, **parts)
