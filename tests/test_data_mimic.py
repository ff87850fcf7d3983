"""prepare_mimic3 / prepare_mimic4 on tiny fixture tables written here (never real MIMIC)."""
import csv
import gzip

import pytest

from marn_fast.data import load_caml_splits, patient_split, prepare_mimic3, prepare_mimic4, read_caml_csv

NOTE_COLS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY", "DESCRIPTION",
             "CGID", "ISERROR", "TEXT"]
CODE_COLS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]


def _write(path, header, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _mimic3(folder, num_patients=12, flawed=False):
    """Patients s1..sN with 1-2 admissions each; admission h{s}{k}. flawed: add a row without a
    code, a code in a bad format and an admission whose note has no tokens."""
    notes, dx, px = [], [], []
    row = 0
    for s in range(1, num_patients + 1):
        for k in range(1 + s % 2):
            hadm = f"{s}0{k}"
            row += 1
            notes.append([row, s, hadm, "2150-01-02", "", "", "Discharge summary", "Report", "", "",
                          f"Admission {hadm}: pt with CHF, EF 30%.\n\"Lasix\" 40mg given. report{hadm}"])
            if s % 3 == 0:  # an addendum, stored earlier in the table than its report
                notes.insert(0, [row + 1000, s, hadm, "2150-01-05", "", "", "Discharge summary", "Addendum", "", "",
                                 f"Addendum: follow up addendum{hadm}"])
            notes.append([row + 2000, s, hadm, "2150-01-01", "", "", "Nursing/other", "Report", "", "", "nursingnote"])
            dx += [[0, s, hadm, 2, "4019"], [0, s, hadm, 1, "42731"], [0, s, hadm, 3, "V4581"]]
            if s % 2:
                dx.append([0, s, hadm, 4, "E8788"])
            px += [[0, s, hadm, 1, "9604"], [0, s, hadm, 2, "0066" if s % 2 else "9910"]]
    notes.append([9999, 99, "990", "2150-01-01", "", "", "Discharge summary", "Report", "", "", "no codes for me"])
    if flawed:
        dx += [[0, 1, "100", 9, ""], [0, 1, "100", 10, "4O19"], [0, 98, "980", 1, "4019"]]
        notes.append([9998, 98, "980", "2150-01-01", "", "", "Discharge summary", "Report", "", "", "12 / 34"])
    _write(folder / "NOTEEVENTS.csv.gz", NOTE_COLS, notes, gz=True)
    _write(folder / "DIAGNOSES_ICD.csv", CODE_COLS, dx)
    _write(folder / "PROCEDURES_ICD.csv", CODE_COLS, px)


def test_prepare_mimic3_patient_split(tmp_path):
    _mimic3(tmp_path, flawed=True)
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:
        summary = prepare_mimic3(tmp_path, out, seed=3, split_fractions=(0.5, 0.25, 0.25), top_k=2)
    messages = " | ".join(str(w.message) for w in record)
    assert "DIAGNOSES_ICD.csv: 1 rows without an admission or a code skipped (lines 68)" in messages
    assert "DIAGNOSES_ICD.csv: 1 codes in an unexpected format skipped (lines 69)" in messages
    assert "1 admissions whose discharge summaries have no tokens are left out (HADM_ID 980)" in messages
    assert summary["invalid_codes"] == 1 and summary["empty_code_rows"] == 1 and summary["empty_notes"] == 1
    corpus = load_caml_splits(out, "full")
    docs = {d.id: d for split in ("train", "dev", "test") for d in corpus.split(split)}
    assert len(docs) == summary["admissions"] == 18  # 12 patients, 6 with two admissions; "990" has no codes
    subjects = [{d.subject_id for d in corpus.split(s)} for s in ("train", "dev", "test")]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert all(subjects)
    # labels: diagnoses by SEQ_NUM then procedures, dotted, zeros kept
    assert docs["200"].labels == ["427.31", "401.9", "V45.81", "96.04", "99.10"]
    assert docs["300"].labels == ["427.31", "401.9", "V45.81", "E878.8", "96.04", "00.66"]
    # CAML tokenisation; the addendum follows its report; other categories are ignored
    assert docs["300"].text == "admission pt with chf ef lasix 40mg given report300 addendum follow up addendum300"
    assert docs["100"].text.endswith("report100") and "nursingnote" not in docs["100"].text
    assert summary["discharge_addenda"] == 6 and summary["discharge_notes_without_codes"] == 1
    assert summary["files"]["train_full.csv"] == len(corpus.train)
    for split in ("train", "dev", "test"):  # CAML sorts each split by length
        lengths = [len(d.tokens) for d in corpus.split(split)]
        assert lengths == sorted(lengths)
    fifty = load_caml_splits(out, "50")
    assert summary["top_codes"] == ["401.9", "427.31"]  # ties broken by code string
    assert sum(len(fifty.split(s)) for s in ("train", "dev", "test")) == 18
    assert all(d.labels == ["427.31", "401.9"] for d in fifty.train)
    assert (out / "prepare_summary.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_prepare_mimic3_hadm_split_files(tmp_path):
    _mimic3(tmp_path)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_full_hadm_ids.csv").write_text("100\n101\n200\n300\n")
    (splits / "dev_full_hadm_ids.csv").write_text("400\n500\n")
    (splits / "test_full_hadm_ids.csv").write_text("600\n12345\n")  # 12345 does not exist
    (splits / "train_50_hadm_ids.csv").write_text("100\n")
    (splits / "dev_50_hadm_ids.csv").write_text("400\n")
    (splits / "test_50_hadm_ids.csv").write_text("600\n")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="1 HADM ids of the full split files"):
        summary = prepare_mimic3(tmp_path, out, splits, top_k=2)
    corpus = load_caml_splits(out)
    assert sorted(d.id for d in corpus.train) == ["100", "101", "200", "300"]
    assert sorted(d.id for d in corpus.dev) == ["400", "500"]
    assert [d.id for d in corpus.test] == ["600"]
    assert [d.id for d in read_caml_csv(out / "train_50.csv")] == ["100"]
    assert summary["splits"].startswith("files in")
    (splits / "test_50_hadm_ids.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test_50_hadm_ids"):
        prepare_mimic3(tmp_path, out, splits, top_k=2)
    with pytest.raises(FileNotFoundError, match="train,dev,test}_full_hadm_ids"):
        prepare_mimic3(tmp_path, out, tmp_path / "nosplits")


def test_prepare_mimic3_bad_input(tmp_path):
    _mimic3(tmp_path)
    with open(tmp_path / "PROCEDURES_ICD.csv", "a") as handle:
        handle.write("1,2,3\n")
    with pytest.raises(ValueError, match=r"PROCEDURES_ICD\.csv, line \d+: malformed row with 3 fields"):
        prepare_mimic3(tmp_path, tmp_path / "out")
    _write(tmp_path / "PROCEDURES_ICD.csv", ["ROW_ID", "SUBJECT_ID", "HADM_ID", "ICD9_CODE"], [])
    with pytest.raises(ValueError, match=r"PROCEDURES_ICD\.csv: missing column\(s\) \['SEQ_NUM'\]"):
        prepare_mimic3(tmp_path, tmp_path / "out")
    (tmp_path / "PROCEDURES_ICD.csv").unlink()
    with pytest.raises(FileNotFoundError, match="PROCEDURES_ICD"):
        prepare_mimic3(tmp_path, tmp_path / "out")


def test_patient_split_is_seeded_and_disjoint():
    subject_of = {f"h{i}": f"s{i // 3}" for i in range(60)}
    a = patient_split(subject_of, (0.6, 0.2, 0.2), seed=1)
    assert a == patient_split(subject_of, (0.6, 0.2, 0.2), seed=1)
    assert a != patient_split(subject_of, (0.6, 0.2, 0.2), seed=2)
    assert sorted(sum(a.values(), [])) == sorted(subject_of)
    assert [len(a[s]) for s in ("train", "dev", "test")] == [36, 12, 12]
    with pytest.raises(ValueError, match="split_fractions"):
        patient_split(subject_of, (0.5, 0.2, 0.2), seed=1)


def test_prepare_mimic4_icd10_and_icd9(tmp_path):
    (tmp_path / "hosp").mkdir()
    (tmp_path / "note").mkdir()
    notes = [["10-DS-1", 1, 10, "DS", 1, "", "", "Discharge: diabetes E11.22, 2 units"],
             ["10-DS-2", 1, 10, "DS", 2, "", "", "second part"],
             ["20-DS-1", 2, 20, "DS", 1, "", "", "hypertension"],
             ["30-DS-1", 3, 30, "DS", 1, "", "", "old icd nine stay"]]
    _write(tmp_path / "note" / "discharge.csv.gz", ["note_id", "subject_id", "hadm_id", "note_type", "note_seq",
                                                     "charttime", "storetime", "text"], notes, gz=True)
    cols = ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"]
    _write(tmp_path / "hosp" / "diagnoses_icd.csv", cols,
           [[1, 10, 1, "E1122", 10], [1, 10, 2, "I10", 10], [2, 20, 1, "I10", 10], [3, 30, 1, "4019", 9]])
    _write(tmp_path / "hosp" / "procedures_icd.csv", cols + ["chartdate"],
           [[1, 10, 1, "0DTJ4ZZ", 10, ""], [3, 30, 1, "9604", 9, ""]])
    summary = prepare_mimic4(tmp_path, tmp_path / "out10", split_fractions=(1.0, 0.0, 0.0), top_k=1)
    docs = {d.id: d for d in read_caml_csv(tmp_path / "out10" / "train_full.csv")}
    assert docs["10"].labels == ["E11.22", "I10", "0DTJ4ZZ"]
    assert docs["10"].text == "discharge diabetes e11 units second part"
    assert set(docs) == {"10", "20"} and summary["source"] == "mimic4-icd10"
    assert summary["other_version_codes"] == 2
    prepare_mimic4(tmp_path, tmp_path / "out9", icd_version=9, split_fractions=(1.0, 0.0, 0.0), top_k=1)
    docs9 = read_caml_csv(tmp_path / "out9" / "train_full.csv")
    assert [(d.id, d.labels) for d in docs9] == [("30", ["401.9", "96.04"])]
    with pytest.raises(ValueError, match="icd_version"):
        prepare_mimic4(tmp_path, tmp_path / "x", icd_version=11)
