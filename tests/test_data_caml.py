"""CAML-format reading, tokenisation, code formatting and label spaces (fixture CSVs written here)."""
import csv
import gzip

import pytest

from marn_fast.data import (
    Document,
    LabelSpace,
    build_icd_label_space,
    format_icd9_diagnosis,
    format_icd9_procedure,
    format_icd10_diagnosis,
    format_icd10_procedure,
    icd9_code_type,
    load_caml_splits,
    read_caml_csv,
    restrict_to_codes,
    tokenize,
    top_k_codes,
    write_caml_csv,
)

HEADER = ["SUBJECT_ID", "HADM_ID", "TEXT", "LABELS", "length"]


def write_rows(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_tokenize_follows_caml_rule():
    text = 'Pt. has CHF, 2mg of Lasix; BP 120/80 on 2015-01-02 "improved"\nnon_smoker'
    assert tokenize(text) == ["pt", "has", "chf", "2mg", "of", "lasix", "bp", "on", "improved", "non_smoker"]
    assert tokenize(" ".join(tokenize(text))) == tokenize(text)  # idempotent


@pytest.mark.parametrize("raw, dotted", [("42731", "427.31"), ("4019", "401.9"), ("401", "401"), ("042", "042"),
                                         ("V4581", "V45.81"), ("V053", "V05.3"), ("E8788", "E878.8"),
                                         ("E849", "E849"), ("25000", "250.00"), ("V45.81", "V45.81")])
def test_icd9_diagnosis_format_keeps_zeros(raw, dotted):
    assert format_icd9_diagnosis(raw) == dotted
    assert icd9_code_type(dotted) == "diagnosis"


@pytest.mark.parametrize("raw, dotted", [("9910", "99.10"), ("0066", "00.66"), ("9604", "96.04"), ("640", "64.0"),
                                         ("3893", "38.93")])
def test_icd9_procedure_format_keeps_zeros(raw, dotted):
    assert format_icd9_procedure(raw) == dotted
    assert icd9_code_type(dotted) == "procedure"


def test_icd10_formats_and_bad_codes():
    assert format_icd10_diagnosis("E1122") == "E11.22"
    assert format_icd10_diagnosis("I10") == "I10"
    assert format_icd10_procedure("0dtj4zz") == "0DTJ4ZZ"
    assert icd9_code_type("4019") is None and icd9_code_type("E11.22") is None
    for bad in ("12", "ABC", "9604x"):
        with pytest.raises(ValueError, match="code"):
            format_icd9_diagnosis(bad)
    with pytest.raises(ValueError, match="code"):
        format_icd9_procedure("42731")
    with pytest.raises(ValueError, match="never numbers"):
        format_icd9_procedure(99.10)


def test_labels_are_strings_never_floats(tmp_path):
    path = tmp_path / "train_full.csv"
    labels = "99.10;00.66;V45.81;E878.8;250.00;99.10"
    write_rows(path, [["1", "10", "note, with \"quotes\"\nand a newline", labels, "6"],
                      ["2", "11", "second note", "401.9", "2"]])
    docs = read_caml_csv(path)
    assert docs[0].labels == ["99.10", "00.66", "V45.81", "E878.8", "250.00"]  # unique, in order, zeros kept
    assert docs[0].tokens == ["note", "with", "quotes", "and", "a", "newline"]
    assert docs[0].id == "10" and docs[0].subject_id == "1"


def test_write_read_round_trip_gz(tmp_path):
    docs = [Document("7", "3", "alpha beta", ["96.04", "427.31"]), Document("8", "3", "gamma", ["00.66"])]
    assert write_caml_csv(tmp_path / "x.csv", docs) == 2
    assert read_caml_csv(tmp_path / "x.csv") == docs
    with open(tmp_path / "x.csv", "rb") as src, gzip.open(tmp_path / "y.csv.gz", "wb") as dst:
        dst.write(src.read())
    assert read_caml_csv(tmp_path / "y.csv.gz") == docs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "dev_full.csv"
    with open(path, "w", newline="") as handle:
        handle.write("SUBJECT_ID,HADM_ID,TEXT,LABELS,length\n")
        handle.write('1,10,"multi\nline note",401.9,3\n')  # lines 2-3
        handle.write("2,11,short note,401.9\n")  # line 4: a field short
    with pytest.raises(ValueError, match=r"dev_full\.csv, line 4: malformed row with 4 fields"):
        read_caml_csv(path)


def test_missing_column_names_file(tmp_path):
    path = tmp_path / "test_full.csv"
    write_rows(path, [["1", "10", "x", "401.9"]], header=["SUBJECT_ID", "HADM_ID", "TEXT", "LABELS"])
    with pytest.raises(ValueError, match=r"test_full\.csv: missing column\(s\) \['length'\]"):
        read_caml_csv(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_caml_csv(tmp_path / "empty.csv")


def test_empty_note_and_no_labels_are_counted_warnings(tmp_path):
    path = tmp_path / "train_full.csv"
    write_rows(path, [["1", "10", "a note", "401.9", "2"], ["2", "11", "123 , 456", "401.9", "0"],
                      ["3", "12", "another note", "", "2"], ["4", "12", "dup id", "401.9", "2"]])
    stats = {}
    with pytest.warns(UserWarning) as record:
        docs = read_caml_csv(path, stats=stats)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 empty notes skipped (lines 3)" in messages and "train_full.csv" in messages
    assert "1 rows without labels kept (lines 4)" in messages
    assert "repeating an earlier HADM_ID" in messages
    assert [d.id for d in docs] == ["10", "12", "12"]
    assert stats["empty_notes"] == 1 and stats["no_labels"] == 1 and stats["duplicate_ids"] == 1 and stats["rows"] == 4
    with pytest.raises(ValueError, match="line 2: empty HADM_ID"):
        write_rows(path, [["1", " ", "a note", "401.9", "2"]])
        read_caml_csv(path)


def _corpus():
    train = [Document("1", "1", "a", ["401.9", "427.31"]), Document("2", "2", "b", ["401.9", "96.04"]),
             Document("3", "3", "c", ["401.9", "427.31", "V45.81"])]
    dev = [Document("4", "4", "d", ["401.9", "E878.8"])]
    test = [Document("5", "5", "e", ["00.66"])]
    return train, dev, test


def test_label_space_train_vs_union(tmp_path):
    train, dev, test = _corpus()
    space = build_icd_label_space(train)
    assert space.codes == ["401.9", "427.31", "96.04", "V45.81"]
    union = build_icd_label_space(train, dev, test)
    assert union.codes == ["00.66", "401.9", "427.31", "96.04", "E878.8", "V45.81"]
    assert space.indices(["96.04", "E878.8", "401.9"]) == ([2, 0], ["E878.8"])
    union.save(tmp_path / "labels.json")
    assert LabelSpace.load(tmp_path / "labels.json") == union
    with pytest.raises(ValueError, match="unique"):
        LabelSpace(["1", "1"])
    with pytest.raises(ValueError, match="no labels"):
        build_icd_label_space([Document("1", "1", "a", [])])


def test_top_k_and_restriction():
    train, dev, test = _corpus()
    docs = train + dev + test
    assert top_k_codes(docs, 2) == ["401.9", "427.31"]
    assert top_k_codes(docs, 3) == ["401.9", "427.31", "00.66"]  # ties by code string
    restricted = restrict_to_codes(docs, ["427.31", "00.66"])
    assert [(d.id, d.labels) for d in restricted] == [("1", ["427.31"]), ("3", ["427.31"]), ("5", ["00.66"])]
    with pytest.warns(UserWarning, match="fewer than k=50"):
        assert len(top_k_codes(docs)) == 6


def test_load_caml_splits_missing_file(tmp_path):
    for split in ("train", "dev"):
        write_rows(tmp_path / f"{split}_50.csv", [["1", "10", "a note", "401.9", "2"]])
    with pytest.raises(FileNotFoundError, match="test_50.csv"):
        load_caml_splits(tmp_path, "50")
    with pytest.raises(ValueError, match="setting"):
        load_caml_splits(tmp_path, "100")
