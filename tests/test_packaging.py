"""Distribution: the sdist carries every file a build needs and nothing generated, its metadata
(SPDX license, URLs, classifiers), the torch tag a wheel's version gets with
MARN_FAST_LOCAL_VERSION=1, and what `marn-fast info` says when the running torch is not the one the
installed build was made for. (.ci/run builds the sdist, installs it in a fresh venv and runs the
smoke checks there; building a wheel compiles the extension, too slow for a test.)"""
from __future__ import annotations

import email.parser
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from marn_fast import __version__, build_tag, info
from marn_fast.ops import dispatch
from marn_fast.training import manifest

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = (ROOT / ".git").exists() and shutil.which("git") is not None
# Files a source tree never holds but builds and runs leave in it (setup.py's build/, pip's
# egg-info, an in-place extension, bytecode, ninja objects in csrc/, a venv, run folders, caches).
GENERATED = ["build/temp.linux-x86_64-cpython-311/csrc/ops.o", "dist/marn_fast-0.0.9.tar.gz",
             "marn_fast/_C.cpython-311-x86_64-linux-gnu.so", "marn_fast/__pycache__/info.cpython-311.pyc",
             "marn_fast/ops/__pycache__/ram.cpython-311.pyc", "csrc/cpu/ram_cpu.o", "csrc/cpu/ram_cpu.so",
             ".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/demo/metrics.json",
             ".pytest_cache/v/cache/lastfailed", ".hypothesis/examples/x", "tests/__pycache__/conftest.pyc"]
# Where the source files the sdist must carry live: the build (setup.py, pyproject.toml, csrc/,
# CMakeLists.txt and the package with its data), the configs, requirements, README, LICENSE, docs.
SHIPPED_DIRS = ("marn_fast/", "csrc/", "configs/", "requirements/", "docs/")
SHIPPED_FILES = {"setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md", "LICENSE"}
# What setuptools writes into every sdist: the metadata.
SDIST_METADATA = {"PKG-INFO", "setup.cfg"}


def source_files() -> list[str]:
    """The files a clean clone of this checkout has, with work in progress: tracked and untracked
    files, less what .gitignore ignores."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.splitlines() if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> dict:
    """The sdist built with `python -m build --sdist --no-isolation` from a copy of the source
    files into which GENERATED was planted, with MARN_FAST_LOCAL_VERSION=1 (which must not tag
    it). Returns its path, the expected files and its member names (relative to its top folder)."""
    if not CHECKOUT:
        pytest.skip("needs a git checkout of marn_fast")
    pytest.importorskip("build", reason="the `build` package (requirements/test.txt) builds the sdist")
    tmp = tmp_path_factory.mktemp("sdist")
    src, out = tmp / "src", tmp / "dist"
    files = source_files()
    for name in files + GENERATED:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if name in GENERATED:
            (src / name).write_bytes(b"generated\n")
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, build_tag.ENV_VAR: "1"}
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)], cwd=src,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = out.glob("*.tar.gz")
    with tarfile.open(path) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
        pkg_info = tar.extractfile(f"marn_fast-{__version__}/PKG-INFO").read().decode()
    top = {name.split("/", 1)[0] for name in members}
    assert top == {f"marn_fast-{__version__}"}, top
    expected = {name for name in files if name in SHIPPED_FILES or name.startswith(SHIPPED_DIRS)}
    return {"path": path, "expected": expected, "members": {name.split("/", 1)[1] for name in members},
            "pkg_info": email.parser.Parser().parsestr(pkg_info)}


def test_sdist_is_named_for_the_plain_version(sdist):
    assert sdist["path"].name == f"marn_fast-{__version__}.tar.gz"
    assert sdist["pkg_info"]["Version"] == __version__


def test_sdist_carries_every_file_a_build_needs(sdist):
    missing = sorted(sdist["expected"] - sdist["members"])
    assert not missing, f"the sdist lacks {missing}: add them to MANIFEST.in"
    # The files the issue found missing, named so that a change to the lists above cannot hide them.
    for name in ("csrc/cpu/fast_math.h", "csrc/tensor_checks.h", "csrc/cuda/module.cpp", "csrc/tests/expect.h",
                 "CMakeLists.txt", "LICENSE", "configs/demo.yaml", "requirements/data.txt", "docs/install.md",
                 "marn_fast/py.typed", "marn_fast/build_tag.py", "csrc/build_identity.h"):
        assert name in sdist["members"], name
    # the shipped dispatch tables (none at present: the one shipped before had no validity records)
    tables = {f"marn_fast/ops/dispatch_tables/{path.name}" for path in dispatch.TABLES_DIR.glob("*.json")}
    assert tables <= sdist["members"]


def test_sdist_carries_nothing_else(sdist):
    extra = sorted(name for name in sdist["members"] - sdist["expected"] - SDIST_METADATA
                   if not name.startswith("marn_fast.egg-info/"))
    assert not extra, f"the sdist carries files it should not: {extra} (MANIFEST.in)"
    planted = sorted(set(GENERATED) & sdist["members"])
    assert not planted, planted
    assert not any(name.startswith(("tests/", "benchmarks/", "results/", "scripts/")) for name in sdist["members"])


def test_sdist_metadata_has_the_license_urls_and_classifiers(sdist):
    meta = sdist["pkg_info"]
    assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"]
    urls = dict(line.split(", ", 1) for line in meta.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Issues"}
    assert all(url.startswith("https://github.com/marn-fast/marn_fast") for url in urls.values())
    classifiers = meta.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers and "Typing :: Typed" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers), "PEP 639: the SPDX string replaces them"
    assert "ICD coding" in meta["Keywords"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()


# ------------------------------------------------------------------------- the wheel's torch tag
@pytest.mark.parametrize("torch_version, cuda, hip, tag", [
    ("2.13.0+cpu", None, None, "torch2.13cpu"),
    ("2.14.1+cu130", "13.0", None, "torch2.14cu130"),
    ("2.11.0", "12.8", None, "torch2.11cu128"),
    ("2.7.1+rocm6.3", None, "6.3.42131-fa1d09cbd", "torch2.7rocm6.3"),
    ("2.10.0.dev20251201+cu126", "12.6", None, "torch2.10cu126"),
])
def test_torch_tag_names_torch_major_minor_and_its_build(torch_version, cuda, hip, tag):
    assert build_tag.torch_tag(torch_version, cuda, hip) == tag
    version = Version(f"{__version__}+{tag}")  # a valid PEP 440 local version
    assert version.local == tag and build_tag.local_tag(str(version)) == tag


def test_torch_tag_rejects_a_version_without_major_minor():
    with pytest.raises(ValueError, match="torch_version"):
        build_tag.torch_tag("nightly", None)


def test_local_tag_is_none_without_a_torch_tag():
    assert build_tag.local_tag("0.1.0") is None and build_tag.local_tag("0.1.0+ubuntu1") is None


@pytest.fixture
def setup_version(monkeypatch):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no source checkout (setup.py)")
    setup_py = runpy.run_path(str(ROOT / "setup.py"), run_name="marn_fast_setup")

    def version(flag, argv):
        if flag is None:
            monkeypatch.delenv(build_tag.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(build_tag.ENV_VAR, flag)
        return setup_py["version"](argv)
    return version


def test_setup_py_tags_wheels_only_when_asked(setup_version):
    running = f"{__version__}+{info.running_torch_tag()}"
    assert running.endswith("cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", ""))
    assert setup_version(None, ["bdist_wheel"]) == __version__
    assert setup_version("0", ["bdist_wheel"]) == __version__
    assert setup_version("1", ["bdist_wheel", "--dist-dir", "x"]) == running
    assert setup_version("1", ["dist_info", "--output-dir", "x"]) == running   # pip's metadata step
    assert setup_version("1", ["sdist", "--formats", "gztar"]) == __version__  # the sdist builds for any torch


def test_setup_py_rejects_another_value(setup_version):
    with pytest.raises(SystemExit, match="MARN_FAST_LOCAL_VERSION must be 0 or 1"):
        setup_version("yes", ["bdist_wheel"])


# ------------------------------------------------------------- marn-fast info on a torch mismatch
def _fake_install(monkeypatch, version):
    monkeypatch.setattr(manifest, "package_version", lambda name: version if name == "marn_fast" else None)


def _loaded():
    return {name: {"error": None} for name in info.EXTENSIONS}


def test_info_a_tagged_build_for_this_torch_matches(monkeypatch):
    _fake_install(monkeypatch, f"{__version__}+{info.running_torch_tag()}")
    build = info.build_status(_loaded())
    assert build["built_for"] == build["running"] == info.running_torch_tag() and not build["mismatch"]
    [line] = info._build_lines(build)
    assert f"built for {build['running']}, running {build['running']}" in line and "MISMATCH" not in line


def test_info_names_a_tagged_build_for_another_torch_and_the_fix(monkeypatch):
    other = "torch2.12cu126" if info.running_torch_tag() != "torch2.12cu126" else "torch2.12cpu"
    _fake_install(monkeypatch, f"{__version__}+{other}")
    build = info.build_status(_loaded())
    assert build["mismatch"] and build["built_for"] == other and build["extensions_failing"] == []
    line, fix = info._build_lines(build)
    assert line.startswith("build     TORCH MISMATCH") and f"{__version__}+{other} was built for {other}" in line
    assert f"torch {torch.__version__} needs a build for {info.running_torch_tag()}" in line
    assert f"{__version__}+{info.running_torch_tag()}" in fix and "--no-build-isolation --no-cache-dir" in fix
    assert f"marn_fast-{__version__}.tar.gz" in fix and "docs/install.md" in fix


def test_info_without_a_tag_names_a_mismatch_from_the_import_error(monkeypatch):
    _fake_install(monkeypatch, __version__)

    def fail(name):
        raise ImportError(f"/x/{name}.so: undefined symbol: _ZN3c104impl8GPUTrace")

    monkeypatch.setattr(info.importlib, "import_module", fail)
    extensions = info.extension_status()
    build = info.build_status(extensions)
    assert build["built_for"] is None and build["mismatch"] and build["extensions_failing"] == ["marn_fast._C"]
    assert extensions["marn_fast._C"]["fix"] == build["fix"] and "--force-reinstall" in build["fix"]
    line, fix = info._build_lines(build)
    assert line == (f"build     TORCH MISMATCH: marn_fast._C does not load under torch {torch.__version__} "
                    "(undefined symbol: built against another torch)")
    assert fix.startswith("          fix: install the marn_fast wheel built for this torch")


def test_info_without_a_tag_and_a_working_build_reports_no_mismatch(monkeypatch):
    _fake_install(monkeypatch, __version__)
    build = info.build_status(_loaded())
    assert not build["mismatch"] and build["fix"] is None
    assert "no torch tag" in info._build_lines(build)[0]
    _fake_install(monkeypatch, None)
    assert "not installed" in info._build_lines(info.build_status(_loaded()))[0]
