"""CodiEsp reader and auxiliary labels: on small fixture folders written here (invented text,
never CodiEsp's), and on the real release in ../shared/data/codiesp when it exists."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from marn_fast.data import build_ccs_label_space, build_icd_label_space
from marn_fast.data.codiesp import (
    CodiEspAuxMapper,
    code_of,
    diagnosis_group,
    label_of,
    load_codiesp,
    normalize_code,
    read_codiesp_codes,
    read_codiesp_evidence,
    tokenize_with_offsets,
)

# case id -> (Spanish text, English text, D codes, P codes, X rows (type, code, evidence, "s e[;s e]"))
FIXTURE = {
    "train": {
        "caso-1": ("Varón de 37 años con orquiepididimitis y fiebre; se realizó Rx tórax.",
                   "Man aged 37 with orchiepididymitis and fever; a chest X-ray was taken.",
                   ["n45.3", "R50.9"], ["bw03zzz"],
                   [("DIAGNOSTICO", "n45.3", "orquiepididimitis", None),
                    ("DIAGNOSTICO", "r50.9", "fiebre", None),
                    ("PROCEDIMIENTO", "bw03zzz", "Rx tórax", None)]),
        "caso-2": ("Niña con diabetes mellitus tipo 1 y pielonefritis aguda.\r\nSe pautó insulina.",
                   "Girl with type 1 diabetes mellitus and acute pyelonephritis.\nInsulin was given.",
                   ["e10.9", "n10"], [],
                   [("DIAGNOSTICO", "e10.9", "diabetes mellitus tipo 1", None),
                    ("DIAGNOSTICO", "n10", "pielonefritis aguda", None)]),
    },
    "dev": {
        "caso-3": ("Mujer con fiebre y pielonefritis; ecografía renal.", "Woman with fever and pyelonephritis.",
                   ["r50.9", "n10"], ["bt41zzz"], [("DIAGNOSTICO", "n10", "pielonefritis", None)]),
    },
    "test": {
        "caso-4": ("Paciente con fiebre, pielonefritis y sífilis (A53.9).", "Patient with fever.",
                   ["R50.9", "a53.9", "n10"], ["0tb"], [("DIAGNOSTICO", "a53.9", "sífilis", "37 44;46 51")]),
    },
}


def write_fixture(root: Path, splits=FIXTURE, background=True) -> Path:
    for split, cases in splits.items():
        folder = root / split
        for sub in ("text_files", "text_files_en"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        d_rows, p_rows, x_rows = [], [], []
        for case, (es, en, d, p, x) in cases.items():
            (folder / "text_files" / f"{case}.txt").write_bytes(es.encode("utf-8"))
            (folder / "text_files_en" / f"{case}.txt").write_bytes(en.encode("utf-8"))
            d_rows += [f"{case}\t{c}" for c in d]
            p_rows += [f"{case}\t{c}" for c in p]
            for t, c, e, pos in x:
                if pos is None:  # a contiguous span: where the evidence text first occurs
                    start = es.index(e)
                    pos = f"{start} {start + len(e)}"
                x_rows.append(f"{case}\t{t}\t{c}\t{e}\t{pos}")
        for suffix, rows in (("D", d_rows), ("P", p_rows), ("X", x_rows)):
            (folder / f"{split}{suffix}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if background:
        for sub, text in (("text_files", "Caso de fondo sin códigos: neumonía."),
                          ("text_files_en", "Background: pneumonia.")):
            (root / "background" / sub).mkdir(parents=True, exist_ok=True)
            (root / "background" / sub / "bg-1.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def fixture_dir(tmp_path) -> Path:
    return write_fixture(tmp_path / "codiesp")


# ----------------------------------------------------------------------------- tokens and codes
def test_tokenizer_keeps_spanish_letters_and_offsets():
    text = "Niño de 3 años, pequeña úlcera; pingüino_X2 y Rx-tórax."
    tokens, offsets = tokenize_with_offsets(text)
    assert tokens == ["niño", "de", "años", "pequeña", "úlcera", "pingüino", "x", "y", "rx", "tórax"]
    for token, (start, end) in zip(tokens, offsets):
        assert text[start:end].lower() == token


def test_code_normalisation_and_prefixes():
    assert normalize_code(" n44.8 ") == "N44.8"
    assert normalize_code("bw03zzz") == "BW03ZZZ"
    assert label_of("N44.8", "D", "D") == "N44.8"
    assert label_of("N44.8", "D", "DP") == "D:N44.8"
    assert label_of("0DTJ4ZZ", "P", "DP") == "P:0DTJ4ZZ"
    assert code_of("P:0DTJ4ZZ", "DP") == ("P", "0DTJ4ZZ")
    assert code_of("N44.8", "D") == ("D", "N44.8")
    with pytest.raises(ValueError, match="label"):
        code_of("N44.8", "DP")
    with pytest.raises(ValueError, match="code_set"):
        label_of("N44.8", "D", "X")


def test_reader_on_fixture(fixture_dir):
    corpus = load_codiesp(fixture_dir, language="es", codes="D")
    assert [len(corpus.split(s)) for s in ("train", "dev", "test")] == [2, 1, 1]
    first = corpus.train[0]
    assert first.id == "caso-1" and first.labels == ["N45.3", "R50.9"]
    assert corpus.test[0].labels == ["R50.9", "A53.9", "N10"]
    assert "años" in first.tokens and "tórax" in first.tokens and "37" not in first.tokens
    for doc in corpus.train + corpus.dev + corpus.test:
        assert len(doc.offsets) == len(doc.tokens)
        for token, (start, end) in zip(doc.tokens, doc.offsets):
            assert doc.source[start:end].lower() == token
    # "\r\n" is kept: offsets after it still index the file's text.
    assert "\r\n" in corpus.train[1].source
    assert corpus.background == ["caso de fondo sin códigos neumonía"]
    assert [e.label for e in corpus.evidence["train"]] == ["N45.3", "R50.9", "E10.9", "N10"]
    span = corpus.evidence["train"][0]
    assert first.source[span.segments[0][0]:span.segments[0][1]] == "orquiepididimitis"
    assert corpus.evidence["test"][0].segments == ((37, 44), (46, 51))


def test_reader_label_sets_and_language(fixture_dir):
    dp = load_codiesp(fixture_dir, language="en", codes="DP", background=False)
    assert dp.train[0].labels == ["D:N45.3", "D:R50.9", "P:BW03ZZZ"]
    assert dp.train[0].tokens[:3] == ["man", "aged", "with"]
    assert dp.background == []
    p = load_codiesp(fixture_dir, language="es", codes="P")
    assert p.train[0].labels == ["BW03ZZZ"] and p.train[1].labels == []   # kept, counted
    assert p.stats["train"]["no_labels"] == 1
    assert [e.label for e in p.evidence["train"]] == ["BW03ZZZ"]
    assert sorted(build_icd_label_space(dp.train).codes) == ["D:E10.9", "D:N10", "D:N45.3", "D:R50.9", "P:BW03ZZZ"]
    union = build_icd_label_space(dp.train, dp.dev, dp.test)
    assert "D:A53.9" in union and "P:0TB" in union


def test_reader_errors(tmp_path, fixture_dir):
    with pytest.raises(ValueError, match="language"):
        load_codiesp(fixture_dir, language="fr")
    with pytest.raises(ValueError, match="codes"):
        load_codiesp(fixture_dir, codes="X")
    with pytest.raises(FileNotFoundError, match="no CodiEsp folder"):
        load_codiesp(tmp_path / "missing")
    bad = tmp_path / "bad.tsv"
    bad.write_text("caso-1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        read_codiesp_codes(bad)
    bad.write_text("caso-1\tDIAGNOSTICO\tn10\tpielo\t12\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        read_codiesp_evidence(bad)


# ----------------------------------------------------------------------------- auxiliary labels
def test_aux_mapper_modes():
    assert diagnosis_group("N44.8", "category") == "N44"
    assert diagnosis_group("N44.8", "chapter") == "N00-N99"
    assert diagnosis_group("N44.8", "ccsr") == "GEN016"
    assert diagnosis_group("W19.XXX", "ccsr") is None
    m = CodiEspAuxMapper("DP", diagnoses="ccsr", procedures="prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m.map_codes(["D:N44.8", "P:BW03ZZZ", "D:W19.XXX", "P:0TB"]) == ["D:GEN016", "P:BW0", "P:0TB"]
    assert m.stats["mapped"] == 3 and m.stats["unmapped"] == 1 and m.stats["unmapped_codes"] == {"D:W19.XXX": 1}
    none = CodiEspAuxMapper("DP", diagnoses="category", procedures="none")
    assert none.map_codes(["D:N44.8", "P:BW03ZZZ"]) == ["D:N44"]
    assert none.stats["skipped"] == 1 and none.stats["unmapped"] == 0
    assert CodiEspAuxMapper("P", procedures="prefix").map_codes(["BW03ZZZ"]) == ["BW0"]
    with pytest.raises(ValueError, match="diagnoses"):
        CodiEspAuxMapper("D", diagnoses="ccs")


def test_aux_label_space_on_fixture(fixture_dir):
    corpus = load_codiesp(fixture_dir, language="es", codes="D")
    space = build_ccs_label_space(corpus.train, CodiEspAuxMapper("D", "category"))
    assert space.codes == ["E10", "N10", "N45", "R50"]


# ----------------------------------------------------------------------------- the real release
def test_real_codiesp_counts(codiesp_dir):
    corpus = load_codiesp(codiesp_dir, language="es", codes="DP", background=False)
    assert [len(corpus.split(s)) for s in ("train", "dev", "test")] == [500, 250, 250]
    d = load_codiesp(codiesp_dir, language="en", codes="D", background=False, evidence=False)
    train_space = build_icd_label_space(d.train)
    assert len(train_space) == 1767
    assert all(code == code.upper() and "." in code or len(code) == 3 for code in train_space.codes)
    assert sum(len(doc.labels) for doc in d.train) == 5639
    union = build_icd_label_space(d.train, d.dev, d.test)
    assert len(union) == 2557
    assert CodiEspAuxMapper("D", "ccsr").coverage(union.codes) == {
        "codes": 2557, "mapped": 2228, "unmapped": 329, "skipped": 0, "groups": 331}
    assert CodiEspAuxMapper("D", "chapter").coverage(union.codes)["mapped"] == 2555
    # prefixed labels in "DP": both types present, never colliding
    labels = {label for doc in corpus.train for label in doc.labels}
    assert {label[:2] for label in labels} == {"D:", "P:"}
    assert len({label for label in labels if label.startswith("D:")}) == 1767
    # offsets round-trip on every token, and gold evidence indexes the Spanish text
    for doc in corpus.train[:100]:
        for token, (start, end) in zip(doc.tokens, doc.offsets):
            assert doc.source[start:end].lower() == token
    by_id = {doc.id: doc for doc in corpus.train}
    span = corpus.evidence["train"][0]
    start, end = span.segments[0]
    assert by_id[span.doc_id].source[start:end].lower() in span.text.lower()
    assert any("ñ" in t or "á" in t for doc in corpus.train[:20] for t in doc.tokens)
