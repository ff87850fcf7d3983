"""The ICD-9 codes of CAML's MIMIC-III top-50 setting, exactly: the one source of truth for
`--labels 50 --top50 caml` (the default).

Source: Mullenbach et al. (2018), github.com/jamesmullenbach/caml-mimic,
notebooks/dataproc_mimic_III.ipynb, cell "codes_50" (execution 36), the list that the next cell
writes to `mimicdata/mimic3/TOP_50_CODES.csv` (that file is generated, not committed). It is
the 50 most frequent codes over all of CAML's labelled MIMIC-III admissions (train, dev and test
together), most frequent first. Cross-checked: the union of the codes predicted in the repository's
`predictions/*_mimic3_50/preds_test.psv` files is exactly this set.
"""
from __future__ import annotations

CAML_TOP50_SOURCE = ("jamesmullenbach/caml-mimic notebooks/dataproc_mimic_III.ipynb "
                     "(written to mimicdata/mimic3/TOP_50_CODES.csv)")

CAML_TOP50_CODES: tuple[str, ...] = (
    "401.9", "38.93", "428.0", "427.31", "414.01", "96.04", "96.6", "584.9", "250.00", "96.71",
    "272.4", "518.81", "99.04", "39.61", "599.0", "530.81", "96.72", "272.0", "285.9", "88.56",
    "244.9", "486", "38.91", "285.1", "36.15", "276.2", "496", "99.15", "995.92", "V58.61",
    "507.0", "038.9", "88.72", "585.9", "403.90", "311", "305.1", "37.22", "412", "33.24",
    "39.95", "287.5", "410.71", "276.1", "V45.81", "424.0", "45.13", "V15.82", "511.9", "37.23",
)
