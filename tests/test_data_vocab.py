"""Vocabulary threshold and persistence; word2vec matrix shape, normalisation and cache."""
import numpy as np
import pytest

from marn_fast.data import PAD_ID, UNK_ID, Vocabulary, embedding_matrix, train_word2vec


def test_vocabulary_document_frequency_threshold(tmp_path):
    docs = [["fever", "fever", "fever", "cough"],  # "fever" 3 times but in one note only
            ["cough", "rash"], ["cough", "rash"], ["rash", "pain"]]
    vocab = Vocabulary.build(docs)
    assert vocab.itos == ["<pad>", "<unk>", "cough", "rash"]
    assert (PAD_ID, UNK_ID) == (0, 1)
    assert vocab.encode(["rash", "fever", "cough"]).tolist() == [3, UNK_ID, 2]
    assert vocab.encode(["rash"]).dtype == np.int64
    assert Vocabulary.build(docs, min_doc_freq=1).itos[2:] == ["cough", "fever", "pain", "rash"]
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.min_doc_freq == 3
    with pytest.raises(ValueError, match="min_doc_freq"):
        Vocabulary.build(docs, min_doc_freq=0)
    with pytest.raises(ValueError, match="reserved"):
        Vocabulary(["<unk>"])


def _texts():
    rng = np.random.default_rng(0)
    words = np.array([f"w{chr(97 + i)}{chr(97 + j)}" for i in range(6) for j in range(5)])
    return [" ".join(rng.choice(words, size=40)) for _ in range(30)]


def test_word2vec_shape_normalisation_and_cache(tmp_path):
    texts = _texts()
    vocab = Vocabulary.build(t.split() for t in texts)
    vocab_plus = Vocabulary(vocab.itos[2:] + ["zzunseen"])
    matrix = train_word2vec(texts, vocab_plus, dim=16, epochs=2, workers=1, seed=3, cache_dir=tmp_path)
    assert matrix.shape == (len(vocab_plus), 16) and matrix.dtype == np.float32
    assert np.all(matrix[PAD_ID] == 0)
    np.testing.assert_allclose(np.linalg.norm(matrix[1:], axis=1), 1.0, rtol=1e-5)
    assert len(list(tmp_path.glob("word2vec-*.npy"))) == 1
    again = train_word2vec(texts, vocab_plus, dim=16, epochs=2, workers=1, seed=3)  # no cache: retrained
    np.testing.assert_array_equal(matrix, again)  # deterministic for a seed with workers=1
    cached = train_word2vec(texts, vocab_plus, dim=16, epochs=2, workers=1, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(matrix, cached)
    other = train_word2vec(texts, vocab_plus, dim=16, epochs=2, workers=1, seed=4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("word2vec-*.npy"))) == 2 and not np.array_equal(matrix, other)
    with pytest.raises(ValueError, match="dim"):
        train_word2vec(texts, vocab, dim=0)


def test_embedding_matrix_from_mapping():
    vocab = Vocabulary(["a", "b"])
    matrix = embedding_matrix(vocab, {"a": np.array([3.0, 4.0]), "b": np.array([0.0, -2.0])})
    np.testing.assert_allclose(matrix, [[0, 0], matrix[1], [0.6, 0.8], [0, -1]], rtol=1e-6)
    assert abs(np.linalg.norm(matrix[1]) - 1) < 1e-6  # UNK: random, normalised
