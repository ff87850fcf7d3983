"""word2vec embeddings for the vocabulary (gensim CBOW, as the official CAML/MARN code).

The matrix has one row per vocabulary id: PAD (row 0) is zero; every other row is L2-normalised.
Words the word2vec model lacks (UNK, or words absent from the training corpus) get a seeded
random vector U(-0.025, 0.025) before normalisation, as CAML does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..config import MARNConfig
from ..files import atomic_path
from .vocab import PAD_ID, Vocabulary

DEFAULT_EMBED_DIM = next(f.default for f in dataclasses.fields(MARNConfig) if f.name == "embed_dim")
WORD2VEC_DEFAULTS = {"window": 5, "min_count": 0, "epochs": 5, "sg": 0}  # CAML: CBOW, min_count=0, 5 epochs
_UNSEEN_RANGE = 0.025
_NORM_EPS = 1e-12


def stable_hash(text: str) -> int:
    """A process-independent hash for gensim's per-word seeding (Python's hash() is salted)."""
    return zlib.crc32(text.encode("utf-8"))


class _Sentences:
    """A re-iterable corpus of token lists (gensim iterates it once per epoch)."""

    def __init__(self, texts: Sequence[str]):
        self.texts = texts

    def __iter__(self):
        for text in self.texts:
            yield text.split()


def _cache_key(texts: Sequence[str], vocab: Vocabulary, params: dict) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(b"\0vocab\0" + "\n".join(vocab.itos).encode())
    for text in texts:
        digest.update(b"\0doc\0" + text.encode())
    return digest.hexdigest()[:20]


def train_word2vec(texts: Iterable[str], vocab: Vocabulary, *, dim: int = DEFAULT_EMBED_DIM,
                   epochs: int = WORD2VEC_DEFAULTS["epochs"], window: int = WORD2VEC_DEFAULTS["window"],
                   min_count: int = WORD2VEC_DEFAULTS["min_count"], workers: int = 1, seed: int = 0,
                   cache_dir: str | Path | None = None) -> np.ndarray:
    """Train CBOW word2vec on the training notes and return the embedding matrix.

    texts: the training notes as space-separated tokens (`Document.text`). Returns float32
    [len(vocab), dim]: row 0 (PAD) zero, other rows unit L2 norm. With `cache_dir`, the matrix
    is stored there as `word2vec-<key>.npy`, key = a hash of the notes, the vocabulary and the
    parameters, and reused on the next call with the same inputs. Deterministic for a seed when
    workers=1 (gensim's multi-threaded training is not).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts: no training notes given")
    for name, value in (("dim", dim), ("epochs", epochs), ("window", window), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    params = {"dim": dim, "epochs": epochs, "window": window, "min_count": min_count, "seed": seed,
              "sg": WORD2VEC_DEFAULTS["sg"], "format": 1}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"word2vec-{_cache_key(texts, vocab, params)}.npy"
        if cache_file.is_file():
            return np.load(cache_file)

    try:
        from gensim.models import Word2Vec
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("word2vec training needs gensim (pip install gensim, or marn_fast[data])") from err
    model = Word2Vec(sentences=_Sentences(texts), vector_size=dim, window=window, min_count=min_count,
                     sg=WORD2VEC_DEFAULTS["sg"], workers=workers, epochs=epochs, seed=seed, hashfxn=stable_hash)
    matrix = embedding_matrix(vocab, model.wv, seed=seed)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, matrix)
    return matrix


def embedding_matrix(vocab: Vocabulary, vectors, seed: int = 0) -> np.ndarray:
    """Rows of `vectors` (a gensim KeyedVectors or a {word: vector} mapping) in vocabulary order.

    PAD is zero; missing words get a seeded U(-0.025, 0.025) vector; all other rows are L2-normalised.
    """
    dim = vectors.vector_size if hasattr(vectors, "vector_size") else len(next(iter(vectors.values())))
    rng = np.random.default_rng(seed)
    matrix = np.empty((len(vocab), dim), dtype=np.float32)
    for i, word in enumerate(vocab.itos):
        if word in vectors:
            matrix[i] = vectors[word]
        else:
            matrix[i] = rng.uniform(-_UNSEEN_RANGE, _UNSEEN_RANGE, size=dim)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), _NORM_EPS)
    matrix[PAD_ID] = 0.0
    return matrix
