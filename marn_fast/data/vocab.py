"""The word vocabulary: words in at least `min_doc_freq` training notes, PAD = 0, UNK = 1."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..files import write_json_atomic

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
MIN_DOC_FREQ = 3  # CAML/MARN: keep words that occur in at least 3 training notes
VOCAB_FORMAT = "marn_fast.vocabulary"


class Vocabulary:
    """Word ↔ id. Id 0 is PAD, 1 is UNK, then the words in sorted order."""

    def __init__(self, words: Sequence[str], min_doc_freq: int = MIN_DOC_FREQ):
        words = list(words)
        if PAD_TOKEN in words or UNK_TOKEN in words:
            raise ValueError(f"words must not contain the reserved tokens {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        self.itos = [PAD_TOKEN, UNK_TOKEN, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("words must be unique")
        self.min_doc_freq = min_doc_freq

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_doc_freq: int = MIN_DOC_FREQ) -> "Vocabulary":
        """Words that occur in at least `min_doc_freq` of the token lists (document frequency)."""
        if min_doc_freq < 1:
            raise ValueError(f"min_doc_freq must be >= 1, got {min_doc_freq}")
        doc_freq: Counter = Counter()
        for tokens in token_lists:
            doc_freq.update(set(tokens))
        doc_freq.pop(PAD_TOKEN, None)
        doc_freq.pop(UNK_TOKEN, None)
        return cls(sorted(w for w, n in doc_freq.items() if n >= min_doc_freq), min_doc_freq=min_doc_freq)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, min_doc_freq={self.min_doc_freq})"

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids (int64); unknown words map to UNK_ID."""
        get = self.stoi.get
        return np.fromiter((get(t, UNK_ID) for t in tokens), dtype=np.int64, count=len(tokens))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically (the words after PAD and UNK, in id order)."""
        write_json_atomic(path, {"format": VOCAB_FORMAT, "version": 1, "min_doc_freq": self.min_doc_freq,
                                 "pad": PAD_TOKEN, "unk": UNK_TOKEN, "words": self.itos[2:]})

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        with open(path, encoding="utf-8") as handle:
            obj = json.load(handle)
        if obj.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{path}: not a vocabulary file (format {obj.get('format')!r}, expected {VOCAB_FORMAT!r})")
        return cls(obj["words"], min_doc_freq=obj["min_doc_freq"])
