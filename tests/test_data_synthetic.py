"""The embedded synthetic corpus: CAML round trip, determinism, MIMIC-like shape, signal and noise."""
import numpy as np
import pytest

from marn_fast.data import (
    SYNTHETIC_PRESETS,
    CCSMapper,
    build_icd_label_space,
    icd9_code_type,
    load_caml_splits,
    tokenize,
    write_synthetic_corpus,
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_corpus(out, seed=7, **{**SYNTHETIC_PRESETS["test"], "num_docs": 150})
    return out, summary


def test_round_trip_through_the_reader(corpus_dir):
    out, summary = corpus_dir
    full = load_caml_splits(out, "full")
    docs = full.train + full.dev + full.test
    assert len(docs) == 150 == summary["num_docs"]
    assert summary["files"] == {f"{s}_{k}.csv": len(load_caml_splits(out, k).split(s))
                                for s in ("train", "dev", "test") for k in ("full", "50")}
    assert len(full.train) > len(full.dev) > 0 and len(full.test) > 0
    assert all(d.text == " ".join(tokenize(d.text)) for d in docs)  # already CAML tokens
    assert all(icd9_code_type(c) == "diagnosis" for d in docs for c in d.labels)
    subjects = [{d.subject_id for d in full.split(s)} for s in ("train", "dev", "test")]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert len({d.subject_id for d in docs}) < len(docs)  # some patients have several admissions
    fifty = load_caml_splits(out, "50")
    top = set(summary["top_codes"])
    assert len(top) == 40  # the test preset has 40 codes: fewer than 50
    assert all(set(d.labels) <= top for d in fifty.train)
    assert (out / "synthetic_summary.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_codes_are_real_and_map_to_ccs_offline(corpus_dir):
    full = load_caml_splits(corpus_dir[0], "full")
    mapper = CCSMapper("merged")
    for doc in full.train:
        mapper.map_codes(doc.labels)
    assert mapper.stats["unmapped"] == 0 and mapper.stats["mapped"] > 0
    assert "401.9" in build_icd_label_space(full.train).codes  # MIMIC's most frequent code heads the ranking


def test_deterministic_for_a_seed(tmp_path):
    kwargs = dict(num_docs=20, median_tokens=30, num_codes=15)
    write_synthetic_corpus(tmp_path / "a", seed=3, **kwargs)
    write_synthetic_corpus(tmp_path / "b", seed=3, **kwargs)
    write_synthetic_corpus(tmp_path / "c", seed=4, **kwargs)
    for name in ("train_full.csv", "dev_full.csv", "test_50.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train_full.csv").read_bytes() != (tmp_path / "c" / "train_full.csv").read_bytes()


def test_mimic_like_lengths_and_code_frequencies(tmp_path):
    summary = write_synthetic_corpus(tmp_path, num_docs=300, seed=0, num_codes=300)
    tokens = summary["tokens"]
    assert 1300 <= tokens["median"] <= 1700 and tokens["max"] > 4000 and tokens["over_4000"] > 0
    assert 8 <= summary["mean_codes_per_doc"] <= 16
    full = load_caml_splits(tmp_path, "full")
    docs = full.train + full.dev + full.test
    counts = sorted((sum(c in d.labels for d in docs) for c in {c for d in docs for c in d.labels}), reverse=True)
    assert counts[0] > 0.2 * len(docs) and counts[0] > 5 * counts[len(counts) // 2]  # a head and a long tail
    assert counts[-1] <= 3


def test_text_carries_signal_and_noise(corpus_dir):
    full = load_caml_splits(corpus_dir[0], "full")
    docs = full.train + full.dev + full.test
    with_code = [("hypertension" in d.tokens) for d in docs if "401.9" in d.labels]
    without = [("hypertension" in d.tokens) for d in docs if "401.9" not in d.labels]
    assert np.mean(with_code) > 0.6  # the description's words mark the code (signal) ...
    assert 0.0 < np.mean(without) < 0.5 * np.mean(with_code)  # ... but also appear unassigned (noise)
    assert any(word in d.tokens for d in docs for word in ("ruled", "denies"))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_docs"):
        write_synthetic_corpus(tmp_path, num_docs=2)
    with pytest.raises(ValueError, match="silent_prob"):
        write_synthetic_corpus(tmp_path, num_docs=10, silent_prob=1.5)
    with pytest.raises(ValueError, match="split_fractions"):
        write_synthetic_corpus(tmp_path, num_docs=10, median_tokens=10, split_fractions=(0.5, 0.5, 0.5))
