"""An experiment's data side, built once from a CAML-format folder: splits, vocabulary, label
spaces (ICD, and CCS through the ICD→CCS map), word2vec embeddings, datasets and loaders.

Any of the three sources (the synthetic corpus, MIMIC-III prepared by `prepare-mimic3`, MIMIC-IV)
produces that folder, so training takes them unchanged. A CodiEsp release folder is read as it is
(`DataSettings(source="codiesp")`, marn_fast.data.codiesp), with ICD-10 auxiliary labels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from torch.utils.data import DataLoader

from ..data import (
    DEFAULT_MAX_LENGTH,
    MIN_DOC_FREQ,
    BucketBatchSampler,
    CCSMapper,
    CodingDataset,
    LabelSpace,
    Vocabulary,
    build_ccs_label_space,
    build_icd_label_space,
    load_caml_splits,
    train_word2vec,
)
from ..data.embeddings import WORD2VEC_DEFAULTS
from ..data.labels import TOP50_SOURCES, code_counts

CCS_CHOICES = ("merged", "prefixed", "none")
DATA_SOURCES = ("caml", "codiesp")
SPLITS = ("train", "dev", "test")


@dataclass
class DataSettings:
    """Where the data comes from and how it is turned into tensors (stored in checkpoints)."""

    data_dir: str
    setting: str = "full"  # "full" or "50"
    top50: str = "caml"  # setting "50": CAML's published 50 codes, or "frequency" (the 50 most frequent in train)
    ccs: str = "merged"  # CCS label mode, or "none" for no CCS targets
    hcup_dir: Optional[str] = None  # folder with HCUP's prref/dxref tables (procedure codes → CCS)
    label_union: bool = False  # ICD label space from all splits (the official code) instead of train
    max_length: int = DEFAULT_MAX_LENGTH
    min_doc_freq: int = MIN_DOC_FREQ
    batch_size: int = 16
    eval_batch_size: int = 32
    word2vec_epochs: int = WORD2VEC_DEFAULTS["epochs"]
    seed: int = 0
    # source "codiesp": a CodiEsp release folder (marn_fast.data.codiesp); setting/top50/hcup_dir
    # are CAML-only, and the auxiliary labels come from `aux`/`procedure_aux` (off when ccs is "none").
    source: str = "caml"  # "caml" (a CAML-format folder) or "codiesp"
    language: str = "en"  # codiesp: "en" (text_files_en) or "es" (text_files)
    codes: str = "D"  # codiesp: "D", "P" or "DP" (labels prefixed "D:"/"P:")
    aux: str = "ccsr"  # codiesp diagnoses: "ccsr", "chapter", "category" or "none"
    procedure_aux: str = "prefix"  # codiesp procedures: "prefix" (3 PCS characters) or "none"

    def __post_init__(self) -> None:
        if self.setting not in ("full", "50"):
            raise ValueError(f"setting: expected 'full' or '50', got {self.setting!r}")
        if self.top50 not in TOP50_SOURCES:
            raise ValueError(f"top50: expected one of {TOP50_SOURCES}, got {self.top50!r}")
        if self.ccs not in CCS_CHOICES:
            raise ValueError(f"ccs: expected one of {CCS_CHOICES}, got {self.ccs!r}")
        if self.word2vec_epochs < 1:
            raise ValueError(f"word2vec_epochs: expected >= 1, got {self.word2vec_epochs}")
        if self.min_doc_freq < 1:
            raise ValueError(f"min_doc_freq: expected >= 1 (notes a word must occur in), got {self.min_doc_freq}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}, {self.eval_batch_size}")
        if self.source not in DATA_SOURCES:
            raise ValueError(f"source: expected one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "codiesp":
            from ..data.codiesp import CODE_SETS, DIAGNOSIS_AUX, LANGUAGES, PROCEDURE_AUX

            for name, choices in (("language", LANGUAGES), ("codes", CODE_SETS), ("aux", DIAGNOSIS_AUX),
                                  ("procedure_aux", PROCEDURE_AUX)):
                if getattr(self, name) not in choices:
                    raise ValueError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")


class Experiment:
    """The data of one run: `datasets[split]` are CodingDatasets; `word2vec()` gives the embeddings."""

    def __init__(self, settings: DataSettings, vocab: Optional[Vocabulary] = None,
                 icd_space: Optional[LabelSpace] = None, ccs_space: Optional[LabelSpace] = None) -> None:
        """Build from the folder; vocab and label spaces come from a checkpoint when given
        (evaluation), else from the training split."""
        self.settings = settings
        folder = Path(settings.data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir: no folder at {folder}")
        if settings.source == "codiesp":
            from ..data.codiesp import load_codiesp

            self.corpus = load_codiesp(folder, language=settings.language, codes=settings.codes)
        else:
            self.corpus = load_caml_splits(folder, setting=settings.setting,
                                           top50=settings.top50 if settings.setting == "50" else None)
        splits = {name: self.corpus.split(name) for name in SPLITS}
        others = (splits["dev"], splits["test"]) if settings.label_union else ()
        self.icd_space = icd_space or build_icd_label_space(splits["train"], *others)
        self.mapper: Optional[CCSMapper] = None
        self.ccs_space: Optional[LabelSpace] = None
        if settings.source == "codiesp":
            from ..data.codiesp import CodiEspAuxMapper

            mapper = CodiEspAuxMapper(settings.codes, diagnoses=settings.aux, procedures=settings.procedure_aux)
            if settings.ccs != "none" and any(mapper.enabled(t) for t in settings.codes):
                self.mapper = mapper
                self.ccs_space = ccs_space or build_ccs_label_space(splits["train"], self.mapper, *others)
        elif settings.ccs != "none":
            if settings.hcup_dir:
                self.mapper = CCSMapper.from_hcup_dir(settings.hcup_dir, mode=settings.ccs)
            else:
                self.mapper = CCSMapper(settings.ccs)
            self.ccs_space = ccs_space or build_ccs_label_space(splits["train"], self.mapper, *others)
        self.vocab = vocab or Vocabulary.build((d.tokens for d in splits["train"]), min_doc_freq=settings.min_doc_freq)
        self.datasets = {name: CodingDataset(docs, self.vocab, self.icd_space, ccs_space=self.ccs_space,
                                             ccs_mapper=self.mapper, max_length=settings.max_length)
                         for name, docs in splits.items()}
        self.train_code_counts = code_counts(splits["train"])

    def word2vec(self, cache_dir: Optional[Path] = None):
        """CBOW word2vec on the training notes (CodiEsp: and the background cases): [len(vocab), 100]
        with L2-normalised rows (cached)."""
        texts = [d.text for d in self.corpus.split("train")] + list(getattr(self.corpus, "background", []))
        return train_word2vec(texts, self.vocab,
                              epochs=self.settings.word2vec_epochs, seed=self.settings.seed, cache_dir=cache_dir)

    @property
    def num_ccs(self) -> int:
        return 0 if self.ccs_space is None else len(self.ccs_space)

    def loader(self, split: str, shuffle: Optional[bool] = None, **sampler_kwargs) -> DataLoader:
        """Length-bucketed loader of Batch objects; shuffled for train, in length order otherwise."""
        ds = self.datasets[split]
        train = split == "train" if shuffle is None else shuffle
        size = self.settings.batch_size if train else self.settings.eval_batch_size
        sampler = BucketBatchSampler(ds.lengths, size, shuffle=train, seed=self.settings.seed, **sampler_kwargs)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)

    def metadata(self) -> dict:
        """What a checkpoint needs to serve predictions and to refuse mismatched data."""
        return {"vocab": list(self.vocab.itos[2:]), "icd_labels": list(self.icd_space.codes),
                "ccs_labels": list(self.ccs_space.codes) if self.ccs_space is not None else [],
                "data": asdict(self.settings)}

    def summary(self) -> dict:
        return {"documents": {k: len(v) for k, v in self.datasets.items()}, "vocab": len(self.vocab),
                "icd_labels": len(self.icd_space), "ccs_labels": self.num_ccs,
                "truncated": {k: v.stats["truncated"] for k, v in self.datasets.items()},
                "unmapped_ccs": self.mapper.stats["unmapped"] if self.mapper is not None else None}
