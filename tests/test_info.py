"""`marn-fast info` / `python -m marn_fast.info`: versions, the device, the compiled extensions
(with the fix when one did not load) and each op's implementation, with and without the build."""
import os
import subprocess
import sys

import pytest
import torch

from marn_fast import info
from marn_fast.ops import _extension

OPS = {"model", "bigru", "ram", "label_attention", "focal_loss"}
REQUIRE_EXTENSION = os.environ.get("MARN_FAST_REQUIRE_EXTENSION") == "1"


def test_report_names_versions_device_extensions_and_ops():
    report = info.collect()
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["python"]
    assert set(report["ops"]) == OPS and all("cpu" in row for row in report["ops"].values())
    assert {"demo", "codiesp-en-D"} <= set(report["configs"]["names"])
    cpu = report["extensions"]["marn_fast._C"]
    if REQUIRE_EXTENSION:
        assert cpu["loaded"] and cpu["fix"] is None and cpu["file"].endswith(".so")
        assert report["ops"]["model"]["cpu"].startswith("auto: each op's measured dispatch")
        assert report["ops"]["ram"]["cpu"] == ("auto measures among: reference, extension, vendor_conv; "
                                               "static default: extension")
        assert "static default: split" in report["ops"]["bigru"]["cpu"]
    assert report["dispatch"]["mode"] == os.environ.get("MARN_FAST_DISPATCH", "tune")
    assert {(f["device"], f["source"]) for f in report["dispatch"]["files"]} >= {("cpu", "cache"), ("cpu", "table")}
    cuda = report["extensions"]["marn_fast._C_cuda"]
    if torch.version.cuda is None:
        assert not cuda["applicable"] and "CPU build" in cuda["error"]
    text = info.format_report(report)
    for needle in ("marn_fast ", "torch ", "triton ", "extensions", "marn_fast._C ", "label_attention", "dispatch  ",
                   "configs "):
        assert needle in text, needle


def test_without_the_extension_it_says_so_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "marn_fast._C", None)  # import fails as for an unbuilt install
    monkeypatch.setattr(_extension, "_STATE", {"cpu": False, "cuda": False, "cuda_module": False})
    report = info.collect()
    cpu = report["extensions"]["marn_fast._C"]
    assert not cpu["loaded"] and "marn_fast._C" in cpu["error"]
    assert "pip install --no-build-isolation ." in cpu["fix"]
    assert "marn_fast._C did not load" in report["ops"]["model"]["cpu"]
    assert report["ops"]["ram"]["cpu"] == "auto measures among: reference, vendor_conv; static default: reference"
    text = info.format_report(report)
    assert "NOT LOADED" in text and "fix: install torch first" in text


def test_a_build_against_another_torch_is_named(monkeypatch):
    def fail(name):
        raise ImportError(f"{name}.so: undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(info.importlib, "import_module", fail)
    entry = info.extension_status()["marn_fast._C"]
    assert "another torch" in entry["error"] and "--no-build-isolation" in entry["fix"]


def test_module_entry_point_runs_without_the_extension(tmp_path):
    """`python -m marn_fast.info` in a fresh process where marn_fast._C cannot be imported."""
    code = ("import sys, runpy; sys.modules['marn_fast._C'] = None; "
            "runpy.run_module('marn_fast.info', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "marn_fast._C       NOT LOADED" in done.stdout and "pip install --no-build-isolation" in done.stdout
    assert "marn_fast._C did not load" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_is_reported():
    report = info.collect()
    assert report["device"]["gpus"] and all("cuda" in row for row in report["ops"].values())
