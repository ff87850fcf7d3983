"""MIMIC-III and MIMIC-IV → CAML-format folders (`{train,dev,test}_{full,50}.csv`).

Both readers follow CAML's preprocessing: the discharge summaries of an admission (the report,
then its addenda in chart order) are concatenated and tokenised (see `caml.tokenize`); the
admission's labels are its diagnosis codes then its procedure codes (in SEQ_NUM order, unique,
dotted, see `codes`); only admissions with both a discharge summary and a code are kept. Splits
come from CAML's HADM-id files (`train_full_hadm_ids.csv`, ..., and `*_50_hadm_ids.csv` for the
top-50 setting) when a splits folder is given, else from a seeded patient-level split (no
SUBJECT_ID in two splits). The top-50 setting keeps the 50 most frequent codes over all kept
admissions and the admissions that carry one of them.

The notes table is streamed with the csv module: memory holds the codes and a byte-offset
index of the tokenised discharge summaries (staged in a temporary file), never the table.
Every output file is written atomically.
"""
from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..files import write_json_atomic
from ._io import csv_records, find_table, warn_lines
from .caml import SPLITS, Document, tokenize, write_caml_csv
from .codes import format_icd9_diagnosis, format_icd9_procedure, format_icd10_diagnosis, format_icd10_procedure
from .labels import DEFAULT_TOP_K, top_k_codes
from .splits import check_split_fractions, patient_split, read_hadm_ids

DEFAULT_SPLIT_FRACTIONS = (0.9, 0.033, 0.067)  # train/dev/test, about CAML's MIMIC-III full split
MIMIC3_DISCHARGE_CATEGORY = "Discharge summary"
MIMIC3_REPORT_DESCRIPTION = "Report"
MIMIC4_DISCHARGE_TYPE = "DS"
SUMMARY_FILE = "prepare_summary.json"


def _sort_int(value: str) -> int:
    return int(value) if value.strip().isdigit() else 0


@dataclass
class _Codes:
    """Codes per admission, in order, and each admission's patient."""

    by_hadm: dict[str, dict[str, None]] = field(default_factory=dict)
    subject: dict[str, str] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)


def _read_codes(path: Path, into: _Codes, cols: dict[str, str], formatter: Callable[[str], str],
                version: str | None = None) -> None:
    """Add one codes table's rows to `into`, ordered by SEQ_NUM within each admission."""
    required = [cols["subject"], cols["hadm"], cols["seq"], cols["code"]] + ([cols["version"]] if version else [])
    rows: list[tuple[str, int, str]] = []
    invalid, empty = [], []
    for line, row in csv_records(path, required):
        if version is not None and row[cols["version"]].strip() != version:
            into.stats["other_version_codes"] += 1
            continue
        hadm, raw = row[cols["hadm"]].strip(), row[cols["code"]].strip()
        if not hadm or not raw:
            empty.append(line)
            continue
        try:
            code = formatter(raw)
        except ValueError:
            invalid.append(line)
            continue
        into.subject.setdefault(hadm, row[cols["subject"]].strip())
        rows.append((hadm, _sort_int(row[cols["seq"]]), code))
    rows.sort(key=lambda r: (r[0], r[1]))  # stable; hadm grouping only matters for order within one
    for hadm, _, code in rows:
        into.by_hadm.setdefault(hadm, {}).setdefault(code, None)
    into.stats["empty_code_rows"] += len(empty)
    into.stats["invalid_codes"] += len(invalid)
    warn_lines(path, "rows without an admission or a code skipped", empty)
    warn_lines(path, "codes in an unexpected format skipped", invalid)


class _NoteStore:
    """Tokenised discharge summaries staged in a temporary file, indexed by admission."""

    def __init__(self, folder: Path):
        self.file = tempfile.TemporaryFile(dir=folder)
        self.index: dict[str, list[tuple[tuple, int, int, int]]] = {}  # hadm -> [(key, offset, nbytes, ntokens)]

    def add(self, hadm: str, key: tuple, tokens: list[str]) -> None:
        data = " ".join(tokens).encode("utf-8")
        offset = self.file.seek(0, 2)
        self.file.write(data)
        self.index.setdefault(hadm, []).append((key, offset, len(data), len(tokens)))

    def num_tokens(self, hadm: str) -> int:
        return sum(part[3] for part in self.index[hadm])

    def text(self, hadm: str) -> str:
        pieces = []
        for _, offset, nbytes, _ in sorted(self.index[hadm], key=lambda part: part[0]):
            self.file.seek(offset)
            pieces.append(self.file.read(nbytes).decode("utf-8"))
        return " ".join(pieces)

    def close(self) -> None:
        self.file.close()


def _split_files(splits_dir: Path, setting: str) -> dict[str, Path] | None:
    paths = {s: splits_dir / f"{s}_{setting}_hadm_ids.csv" for s in SPLITS}
    present = [p.is_file() for p in paths.values()]
    if any(present) and not all(present):
        raise FileNotFoundError(f"splits_dir: {setting} split files incomplete, missing "
                                f"{[str(p) for p, ok in zip(paths.values(), present) if not ok]}")
    return paths if all(present) else None


def _check_splits_dir(splits_dir: str | Path | None) -> Path | None:
    """Fail before the long read if the split files are absent or incomplete."""
    if splits_dir is None:
        return None
    splits_dir = Path(splits_dir)
    if _split_files(splits_dir, "full") is None:
        raise FileNotFoundError(f"splits_dir: no {{train,dev,test}}_full_hadm_ids.csv in {splits_dir}")
    _split_files(splits_dir, "50")
    return splits_dir


def _write_corpus(store: _NoteStore, codes: _Codes, out_dir: Path, splits_dir: Path | None,
                  seed: int, split_fractions: tuple[float, float, float], top_k: int, source: str,
                  extra_stats: dict, top_codes: Sequence[str] | None = None) -> dict:
    empty_notes = sorted(h for h in store.index if store.num_tokens(h) == 0)
    if empty_notes:
        warnings.warn(f"{source}: {len(empty_notes)} admissions whose discharge summaries have no tokens are left "
                      f"out (HADM_ID {', '.join(empty_notes[:5])})", stacklevel=3)
    kept = sorted((h for h in store.index if h in codes.by_hadm and store.num_tokens(h) > 0),
                  key=lambda h: (len(h), h))
    subject_of = {h: codes.subject[h] for h in kept}
    labels_of = {h: list(codes.by_hadm[h]) for h in kept}
    if not kept:
        raise ValueError(f"{source}: no admission has both a discharge summary and a code")

    def splits_for(setting: str) -> tuple[dict[str, list[str]], str] | None:
        files = _split_files(splits_dir, setting) if splits_dir is not None else None
        if files is None:
            return None
        out, missing = {}, 0
        for split, path in files.items():
            ids = read_hadm_ids(path)
            out[split] = [h for h in ids if h in subject_of]
            missing += len(ids) - len(out[split])
        if missing:
            warnings.warn(f"{splits_dir}: {missing} HADM ids of the {setting} split files have no discharge "
                          "summary or no codes and are left out", stacklevel=3)
        return out, f"files in {splits_dir}"

    full = splits_for("full")
    full_splits, split_origin = full if full else (patient_split(subject_of, split_fractions, seed),
                                                   f"patient-level split, seed {seed}")
    top = (list(top_codes) if top_codes is not None
           else top_k_codes((Document(h, subject_of[h], "", labels_of[h]) for h in kept), top_k))
    top_set = set(top)
    fifty = splits_for("50")
    fifty_splits = fifty[0] if fifty else {s: [h for h in ids if top_set.intersection(labels_of[h])]
                                           for s, ids in full_splits.items()}

    def documents(ids: list[str], restrict: set[str] | None) -> Iterator[Document]:
        for h in sorted(ids, key=lambda h: (store.num_tokens(h), len(h), h)):  # CAML sorts by length
            labels = labels_of[h] if restrict is None else [c for c in labels_of[h] if c in restrict]
            if labels:
                yield Document(h, subject_of[h], store.text(h), labels)

    files = {}
    for setting, splits, restrict in (("full", full_splits, None), ("50", fifty_splits, top_set)):
        for split in SPLITS:
            name = f"{split}_{setting}.csv"
            files[name] = write_caml_csv(out_dir / name, documents(splits[split], restrict))
    summary = {"source": source, "out_dir": str(out_dir), "splits": split_origin, "files": files,
               "admissions": len(kept), "codes": len({c for h in kept for c in labels_of[h]}),
               "empty_notes": len(empty_notes), "top_k": top_k, "top_codes": top, **extra_stats,
               **dict(codes.stats)}
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    return summary


def prepare_mimic3(mimic_dir: str | Path, out_dir: str | Path, splits_dir: str | Path | None = None, *,
                   seed: int = 0, split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                   top_k: int = DEFAULT_TOP_K, top_codes: Sequence[str] | None = None) -> dict:
    """Build a CAML-format folder from MIMIC-III v1.4's NOTEEVENTS, DIAGNOSES_ICD and
    PROCEDURES_ICD (each .csv or .csv.gz in `mimic_dir`).

    splits_dir: a folder with CAML's `{train,dev,test}_full_hadm_ids.csv` (and optionally
    `*_50_hadm_ids.csv`); None: a seeded patient-level split with `split_fractions`.
    Writes `{train,dev,test}_{full,50}.csv` and `prepare_summary.json` to out_dir and returns
    the summary (rows per file, admissions, codes, notes, skipped rows, the top-k codes).
    top_codes: the codes of the `*_50.csv` files (e.g. `caml_top50.CAML_TOP50_CODES`, which
    `marn-fast prepare-mimic3` passes by default) instead of the `top_k` most frequent ones.
    """
    mimic_dir, out_dir, splits_dir = Path(mimic_dir), Path(out_dir), _check_splits_dir(splits_dir)
    split_fractions = check_split_fractions(split_fractions)
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = _Codes()
    cols = {"subject": "SUBJECT_ID", "hadm": "HADM_ID", "seq": "SEQ_NUM", "code": "ICD9_CODE"}
    _read_codes(find_table(mimic_dir, "DIAGNOSES_ICD.csv"), codes, cols, format_icd9_diagnosis)
    _read_codes(find_table(mimic_dir, "PROCEDURES_ICD.csv"), codes, cols, format_icd9_procedure)
    notes_path = find_table(mimic_dir, "NOTEEVENTS.csv")
    store = _NoteStore(out_dir)
    stats = Counter()
    try:
        required = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CATEGORY", "DESCRIPTION", "TEXT")
        for _, row in csv_records(notes_path, required):
            stats["notes_read"] += 1
            if row["CATEGORY"].strip() != MIMIC3_DISCHARGE_CATEGORY:
                continue
            hadm = row["HADM_ID"].strip()
            if hadm not in codes.by_hadm:
                stats["discharge_notes_without_codes"] += 1
                continue
            is_report = row["DESCRIPTION"].strip() == MIMIC3_REPORT_DESCRIPTION
            stats["discharge_reports" if is_report else "discharge_addenda"] += 1
            key = (0 if is_report else 1, row["CHARTDATE"], _sort_int(row["ROW_ID"]))
            store.add(hadm, key, tokenize(row["TEXT"]))
        return _write_corpus(store, codes, out_dir, splits_dir, seed,
                             split_fractions, top_k, "mimic3", dict(stats), top_codes=top_codes)
    finally:
        store.close()


def _find_in(folder: Path, subfolder: str, name: str) -> Path:
    try:
        return find_table(folder / subfolder, name)
    except FileNotFoundError:
        return find_table(folder, name)


def prepare_mimic4(mimic_dir: str | Path, out_dir: str | Path, splits_dir: str | Path | None = None, *,
                   icd_version: int = 10, seed: int = 0,
                   split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                   top_k: int = DEFAULT_TOP_K) -> dict:
    """Build a CAML-format folder from MIMIC-IV: `note/discharge.csv(.gz)` (MIMIC-IV-Note) and
    `hosp/diagnoses_icd.csv(.gz)`, `hosp/procedures_icd.csv(.gz)` (or all three in mimic_dir).

    icd_version: 9 or 10; only codes of that version are kept (admissions with none are left
    out). ICD-10-CM diagnoses are dotted after 3 characters, ICD-10-PCS procedures undotted;
    ICD-9 codes as for MIMIC-III. A discharge summary's notes are concatenated in note_seq
    order. Splits, outputs and summary as `prepare_mimic3`.
    """
    if icd_version not in (9, 10):
        raise ValueError(f"icd_version must be 9 or 10, got {icd_version!r}")
    mimic_dir, out_dir, splits_dir = Path(mimic_dir), Path(out_dir), _check_splits_dir(splits_dir)
    split_fractions = check_split_fractions(split_fractions)
    out_dir.mkdir(parents=True, exist_ok=True)
    dx_format, px_format = ((format_icd9_diagnosis, format_icd9_procedure) if icd_version == 9
                            else (format_icd10_diagnosis, format_icd10_procedure))
    codes = _Codes()
    cols = {"subject": "subject_id", "hadm": "hadm_id", "seq": "seq_num", "code": "icd_code", "version": "icd_version"}
    _read_codes(_find_in(mimic_dir, "hosp", "diagnoses_icd.csv"), codes, cols, dx_format, str(icd_version))
    _read_codes(_find_in(mimic_dir, "hosp", "procedures_icd.csv"), codes, cols, px_format, str(icd_version))
    notes_path = _find_in(mimic_dir, "note", "discharge.csv")
    store = _NoteStore(out_dir)
    stats = Counter()
    try:
        required = ("note_id", "subject_id", "hadm_id", "note_type", "note_seq", "text")
        for _, row in csv_records(notes_path, required):
            stats["notes_read"] += 1
            hadm = row["hadm_id"].strip()
            if hadm not in codes.by_hadm:
                stats["discharge_notes_without_codes"] += 1
                continue
            is_summary = row["note_type"].strip() == MIMIC4_DISCHARGE_TYPE
            stats["discharge_reports" if is_summary else "discharge_addenda"] += 1
            key = (0 if is_summary else 1, _sort_int(row["note_seq"]), row["note_id"])
            store.add(hadm, key, tokenize(row["text"]))
        return _write_corpus(store, codes, out_dir, splits_dir, seed,
                             split_fractions, top_k, f"mimic4-icd{icd_version}", dict(stats))
    finally:
        store.close()
