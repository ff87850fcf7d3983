"""Fuzzed input files and text (hypothesis): CAML CSVs (plain and gzipped), CodiEsp folders, the
--config files of `marn-fast train`, checkpoints, and note text for `predict`.

Each input either works or fails with a ValueError naming the file (through the CLI: exit code
2 and one line) — never another exception, a crash or a hang. Inputs are random bytes and
near-valid mutations (bytes inserted, deleted, replaced, lines repeated, the file cut) of a
valid file. Where an input works, what it gives is checked: the documents of a CSV keep the
reader's invariants, and `predict`'s probabilities equal the reference model's on the same
tokens.

Budget: in the normal suite every test runs a few dozen derandomized examples (seconds). The
long run is the same tests with 50× the examples, fresh random ones each time, marked `slow`
and skipped unless MARN_FAST_FUZZ_LONG=1:

    MARN_FAST_FUZZ_LONG=1 pytest -m slow tests/test_fuzz_inputs.py tests/test_fuzz_ops.py
"""
import gzip
import json
import warnings

import pytest
import torch
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from marn_fast import MARN, MARNConfig, reference
from marn_fast.data import read_caml_csv, tokenize
from marn_fast.data.codiesp import load_codiesp
from marn_fast.predict import Predictor
from marn_fast.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

NASTY = [b"", b"\x00", b"\xff", b"\xef\xbb\xbf", b'"', b",", b";", b"\t", b"\n", b"\r\n", b"\r", b" ",
         b"\xc3\xa9", b"9", b"a", b"\xe2\x80\xa8", b"\\", b"'", b"#"]
mutation = st.tuples(st.sampled_from(["insert", "delete", "replace", "repeat_line", "cut"]),
                     st.floats(0, 1), st.one_of(st.sampled_from(NASTY), st.binary(max_size=4)))


def mutate(data: bytes, mutations) -> bytes:
    for op, where, chunk in mutations:
        i = int(where * len(data))
        if op == "insert":
            data = data[:i] + chunk + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + 1 + len(chunk):]
        elif op == "replace":
            data = data[:i] + chunk + data[i + len(chunk):]
        elif op == "repeat_line":
            lines = data.split(b"\n")
            j = min(int(where * len(lines)), len(lines) - 1)
            data = b"\n".join(lines[:j + 1] + lines[j:])
        else:
            data = data[:i]
    return data


def contents(valid: bytes):
    """Random bytes, or the valid content with 0–4 mutations."""
    return st.one_of(st.binary(max_size=300), st.lists(mutation, max_size=4).map(lambda ms: mutate(valid, ms)))


def file_error_only(call, path):
    """call() works, or raises ValueError naming `path`; returns its result or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call()
        except ValueError as exc:
            assert str(path) in str(exc) or path.name in str(exc), f"the error does not name the file: {exc}"
            return None


# ----------------------------------------------------------------------------- CAML CSV
CAML = (b"SUBJECT_ID,HADM_ID,TEXT,LABELS,length\n"
        b'1,100,"patient with chest pain, and fever",401.9;427.31,6\n'
        b"2,101,cough fever history,486;99.10,3\n"
        b'3,102,"multi\nline note",V58.61,3\n')


@fuzz(40)
@given(data=contents(CAML), gz=st.booleans())
def test_caml_csv_reader(tmp_path_factory, data, gz):
    path = tmp_path_factory.mktemp("caml") / ("train_full.csv.gz" if gz else "train_full.csv")
    path.write_bytes(gzip.compress(data, mtime=0) if gz and data[:1] != b"\x00" else data)
    docs = file_error_only(lambda: read_caml_csv(path), path)
    for doc in docs or []:
        assert doc.id and doc.id == doc.id.strip()
        assert doc.text and tokenize(doc.text) == doc.text.split()  # CAML tokens, idempotent
        assert all(code and ";" not in code and code == code.strip() for code in doc.labels)
        assert len(set(doc.labels)) == len(doc.labels)
    if data == CAML:
        assert [d.labels for d in docs] == [["401.9", "427.31"], ["486", "99.10"], ["V58.61"]]


# ----------------------------------------------------------------------------- CodiEsp
def write_codiesp(root, mutated_file=None, data=b""):
    texts = {"s1": "Paciente con dolor torácico y fiebre.", "s2": "Tos y fiebre; antecedentes de asma."}
    english = {"s1": "Patient with chest pain and fever.", "s2": "Cough and fever; history of asthma."}
    files = {}
    for split in ("train", "dev", "test"):
        for doc in texts:
            files[f"{split}/text_files/{split}-{doc}.txt"] = texts[doc].encode()
            files[f"{split}/text_files_en/{split}-{doc}.txt"] = english[doc].encode()
        files[f"{split}/{split}D.tsv"] = f"{split}-s1\tr07.9\n{split}-s1\tr50.9\n{split}-s2\tj45.909\n".encode()
        files[f"{split}/{split}P.tsv"] = f"{split}-s1\tbw03zzz\n".encode()
        files[f"{split}/{split}X.tsv"] = (f"{split}-s1\tDIAGNOSTICO\tr07.9\tdolor torácico\t14 28\n"
                                          f"{split}-s1\tPROCEDIMIENTO\tbw03zzz\tfiebre\t31 37\n").encode()
    if mutated_file is not None:
        files[mutated_file] = data
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return sorted(files)


CODIESP_FILES = ["train/trainD.tsv", "train/trainP.tsv", "train/trainX.tsv", "dev/text_files_en/dev-s1.txt",
                 "test/text_files/test-s2.txt"]


@fuzz(40)
@given(target=st.sampled_from(CODIESP_FILES), raw=st.data(), language=st.sampled_from(["en", "es"]),
       codes=st.sampled_from(["D", "P", "DP"]))
def test_codiesp_reader(tmp_path_factory, target, raw, language, codes):
    root = tmp_path_factory.mktemp("codiesp")
    write_codiesp(root)
    data = raw.draw(contents((root / target).read_bytes()))
    (root / target).write_bytes(data)
    corpus = file_error_only(lambda: load_codiesp(root, language=language, codes=codes, background=False),
                             root / target)
    if corpus is None:
        return
    for split in ("train", "dev", "test"):
        for doc in corpus.split(split):
            assert all(doc.source[a:b].lower() == tok for tok, (a, b) in zip(doc.text.split(), doc.offsets))
            assert all(label and label == label.strip() for label in doc.labels)


# ----------------------------------------------------------------------------- --config files
CONFIG_JSON = json.dumps({"lr": 0.003, "hidden-size": 16, "epochs": 2, "loss": "focal", "weight_decay": 0.3,
                          "decay-matrices-only": True, "metric": "map"}).encode()
CONFIG_YAML = b"lr: 0.003\nhidden_size: 16\nepochs: 2\nloss: focal\nno_ram: true\n"


class Reached(Exception):
    """The run got past option parsing and the model config: the config was accepted."""


@pytest.fixture
def stub_training(monkeypatch):
    import marn_fast.training.run as run

    def train_and_report(settings, model_options, train_config, out_dir, **kwargs):
        options = {k: v for k, v in model_options.items() if k != "no_mtl"}
        MARNConfig(vocab_size=10, num_icd=3, max_length=settings.max_length, **options)  # as build_model does
        raise Reached()

    monkeypatch.setattr(run, "train_and_report", train_and_report)


def cli_result(argv, capsys):
    """(exit code or "reached", stderr, stdout) of the CLI; any other exception fails the test."""
    from marn_fast.cli import main

    try:
        code = main(argv)
    except Reached:
        code = "reached"
    captured = capsys.readouterr()
    err = captured.err.strip()
    if code not in ("reached", 0):
        assert code == 2, err
        assert "\n" not in err and "Traceback" not in err, err
    return code, err, captured.out


@fuzz(40)
@given(yaml_file=st.booleans(), raw=st.data())
def test_config_files(stub_training, capsys, tmp_path_factory, yaml_file, raw):
    folder = tmp_path_factory.mktemp("config")
    path = folder / ("run.yaml" if yaml_file else "run.json")
    path.write_bytes(raw.draw(contents(CONFIG_YAML if yaml_file else CONFIG_JSON)))
    corpus = folder / "data"
    corpus.mkdir()
    cli_result(["train", "--config", str(path), "--data", "caml", "--data-dir", str(corpus), "--out",
                str(folder / "out")], capsys)


CONFIG_KEYS = ["lr", "epochs", "hidden_size", "dropout", "seeds", "data_dir", "metric", "labels", "no_ram",
               "max_minutes", "focal_alpha", "batch_size", "max_length"]
CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=8), st.lists(st.integers(-2, 5), max_size=3), st.just({}))


@fuzz(40)
@given(values=st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, min_size=1, max_size=3))
def test_config_values_of_any_type(stub_training, capsys, tmp_path_factory, values):
    """Known keys with values of any JSON type: accepted, or refused in one line."""
    folder = tmp_path_factory.mktemp("config")
    path = folder / "run.json"
    path.write_text(json.dumps(values))
    (folder / "data").mkdir()
    cli_result(["train", "--config", str(path), "--data", "caml", "--data-dir", str(folder / "data"),
                "--out", str(folder / "out")], capsys)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained but complete checkpoint (random weights, a 40-word vocabulary, 6 codes)."""
    words = sorted({"chest", "pain", "fever", "cough", "history", "patient", "with", "and", "of", "asthma",
                    "hypertension", "atrial", "fibrillation", "kidney", "chronic", "disease", "acute", "renal",
                    "failure", "diabetes", "insulin", "pneumonia", "sepsis", "heart", "coronary", "artery",
                    "shortness", "breath", "denies", "nausea", "vomiting", "admitted", "hospital", "daily",
                    "tablet", "mg", "blood", "pressure", "x2", "é"})
    torch.manual_seed(0)
    config = MARNConfig(vocab_size=len(words) + 2, num_icd=6, num_ccs=0, hidden_size=4, embed_dim=8, max_length=64)
    model = MARN(config)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(), "vocab": words,
                           "icd_labels": ["401.9", "427.31", "486", "V58.61", "99.10", "250.00"], "ccs_labels": [],
                           "data": {}})
    return path


@fuzz(25)
@given(raw=st.data())
def test_checkpoint_bytes(checkpoint, tmp_path_factory, raw):
    """Cut, mutated or random checkpoint bytes: loaded (a mutation that hit tensor data) or a
    CheckpointError naming the file; torch.load never crashes the process."""
    path = tmp_path_factory.mktemp("bad") / "last.pt"
    good = checkpoint.read_bytes()
    data = raw.draw(st.one_of(st.integers(0, len(good)).map(lambda i: good[:i]),
                              st.lists(mutation, min_size=1, max_size=3).map(lambda ms: mutate(good, ms)),
                              st.binary(max_size=200)))
    path.write_bytes(data)
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    """The Predictor, and the reference model with its weights."""
    predictor = Predictor(checkpoint, device="cpu")
    ref = reference.MARN(predictor.config)
    ref.load_state_dict(predictor.model.state_dict())
    return predictor, ref.eval()


@fuzz(30)
@given(text=st.one_of(st.text(max_size=300),
                      st.lists(st.sampled_from(["chest", "pain", "fever", "é", "2015", "X2", "unknownword", ",", "\n",
                                                "\x00", "Ünïcödé", "  "]), max_size=120).map(" ".join)))
def test_predict_note_text(predictor, text):
    """Any note text: codes whose probabilities are the reference model's on the same tokens, or
    a ValueError (no word tokens)."""
    predictor, ref = predictor
    try:
        [result] = predictor.predict([text], top=3, evidence=2)
    except ValueError as exc:
        assert not tokenize(text) and "no word tokens" in str(exc)
        return
    tokens = tokenize(text)[: predictor.config.max_length]
    assert result["tokens"] == len(tokens)
    assert result["truncated"] == (len(tokenize(text)) > predictor.config.max_length)
    ids = torch.as_tensor(predictor.vocab.encode(tokens))[None, :]
    with torch.no_grad():
        probs = torch.sigmoid(ref(ids).icd_logits[0].float())
    assert len(result["codes"]) == 3
    for code in result["codes"]:
        want = float(probs[predictor.icd_labels.index(code.code)])
        assert code.probability == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert all(tok in tokens for tok, _ in code.evidence)


@fuzz(20)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)))
def test_predict_cli_note_files(checkpoint, capsys, tmp_path_factory, data):
    note = tmp_path_factory.mktemp("note") / "note.txt"
    note.write_bytes(data)
    code, err, out = cli_result(["predict", str(checkpoint), str(note), "--top", "2", "--format", "json"], capsys)
    if code == 0:
        [doc] = json.loads(out)
        assert doc["source"] == str(note) and len(doc["codes"]) == 2
    else:
        assert str(note) in err or "no input text" in err or "no word tokens" in err, err
