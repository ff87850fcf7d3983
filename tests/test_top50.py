"""The top-50 label set: CAML's published 50 codes (default) or the 50 most frequent training codes."""
import re
import warnings

import pytest

from marn_fast.data import Document, load_caml_splits, write_caml_csv
from marn_fast.data.caml_top50 import CAML_TOP50_CODES
from marn_fast.data.labels import select_top50
from marn_fast.training import DataSettings, Experiment

ICD9_DOTTED = re.compile(r"^(\d{3}(\.\d{1,2})?|\d{2}\.\d{1,2}|V\d{2}(\.\d{1,2})?|E\d{3}(\.\d)?)$")
OTHER_CODES = [f"V{n}.1" for n in range(10, 20)]  # not in CAML's list


def test_caml_list_is_fifty_distinct_dotted_codes():
    assert len(CAML_TOP50_CODES) == 50 and len(set(CAML_TOP50_CODES)) == 50
    assert "37.23" in CAML_TOP50_CODES and "250.00" in CAML_TOP50_CODES and "V58.61" in CAML_TOP50_CODES
    assert CAML_TOP50_CODES[0] == "401.9" and CAML_TOP50_CODES[-1] == "37.23"  # CAML's frequency order
    malformed = [c for c in CAML_TOP50_CODES if not ICD9_DOTTED.match(c)]
    assert not malformed, malformed
    undotted = [c for c in CAML_TOP50_CODES if "." not in c]
    assert undotted == ["486", "496", "311", "412"]  # three-digit diagnoses have no decimal part


def _doc(i, labels):
    return Document(id=str(1000 + i), subject_id=str(i), text="patient note with chest pain and fever", labels=labels)


def _folder(tmp_path, codes_per_split):
    """A CAML-format folder with *_50.csv files; every CAML code occurs (the last ones rarely), and the
    OTHER_CODES occur in every document, so they are the most frequent."""
    for split, n in codes_per_split.items():
        docs = []
        for i in range(n):
            labels = list(OTHER_CODES) + [c for j, c in enumerate(CAML_TOP50_CODES) if j < 40 or i == j % n]
            docs.append(_doc(i, labels))
        write_caml_csv(tmp_path / f"{split}_50.csv", docs)
        write_caml_csv(tmp_path / f"{split}_full.csv", docs)
    return tmp_path


def test_labels_50_uses_caml_list_by_default(tmp_path):
    folder = _folder(tmp_path, {"train": 50, "dev": 10, "test": 10})
    exp = Experiment(DataSettings(str(folder), setting="50", ccs="none"))
    assert DataSettings(str(folder)).top50 == "caml"
    assert sorted(exp.icd_space.codes) == sorted(CAML_TOP50_CODES)
    assert not set(OTHER_CODES) & {c for d in exp.corpus.train for c in d.labels}
    assert exp.corpus.stats["top50"] == {"source": "caml", "codes": list(CAML_TOP50_CODES)}


def test_frequency_option_takes_top_k_by_training_frequency(tmp_path):
    folder = _folder(tmp_path, {"train": 50, "dev": 10, "test": 10})
    exp = Experiment(DataSettings(str(folder), setting="50", top50="frequency", ccs="none"))
    # the 10 other codes (in every document) and the 40 CAML codes in every document beat the rare ten
    assert sorted(exp.icd_space.codes) == sorted(OTHER_CODES + list(CAML_TOP50_CODES[:40]))
    docs = [_doc(0, ["1.1", "2.2"]), _doc(1, ["2.2", "3.3"]), _doc(2, ["2.2", "3.3"])]
    assert select_top50("frequency", docs, k=2) == ["2.2", "3.3"]


def test_caml_list_on_data_without_its_codes_is_an_error(tmp_path):
    docs = [_doc(i, ["V10.1", "V11.1"]) for i in range(5)]
    for split in ("train", "dev", "test"):
        write_caml_csv(tmp_path / f"{split}_50.csv", docs)
    with pytest.raises(ValueError, match="none of CAML's 50 MIMIC-III codes.*--top50 frequency"):
        load_caml_splits(tmp_path, "50", top50="caml")
    assert load_caml_splits(tmp_path, "50", top50="frequency").stats["top50"]["codes"] == ["V10.1", "V11.1"]
    assert [d.labels for d in load_caml_splits(tmp_path, "50").train] == [["V10.1", "V11.1"]] * 5  # as written


def test_caml_list_warns_about_codes_absent_from_training(tmp_path):
    docs = [_doc(i, ["401.9", "V10.1"]) for i in range(5)]
    with pytest.warns(UserWarning, match="49 of CAML's 50 codes never occur"):
        codes = select_top50("caml", docs)
    assert codes == list(CAML_TOP50_CODES)
    with pytest.raises(ValueError, match="top50"):
        select_top50("laat", docs)
    with pytest.raises(ValueError, match="top50"):
        DataSettings(str(tmp_path), top50="laat")


def test_cli_labels_50_on_data_without_caml_codes_exits_with_error(tmp_path, capsys):
    from marn_fast.cli import main

    docs = [_doc(i, ["V10.1"]) for i in range(5)]
    for split in ("train", "dev", "test"):
        write_caml_csv(tmp_path / f"{split}_50.csv", docs)
    assert main(["train", "--data", "caml", "--data-dir", str(tmp_path), "--labels", "50",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--top50 frequency" in capsys.readouterr().err


def test_prepare_mimic3_writes_the_given_top_codes(tmp_path):
    from test_data_mimic import _mimic3

    from marn_fast.data import prepare_mimic3

    _mimic3(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = prepare_mimic3(tmp_path, tmp_path / "out", top_codes=["401.9", "96.04"])
    assert summary["top_codes"] == ["401.9", "96.04"]
    fifty = load_caml_splits(tmp_path / "out", "50")
    assert {c for s in ("train", "dev", "test") for d in fifty.split(s) for c in d.labels} == {"401.9", "96.04"}
