"""How the compiled extensions link: they use the shared libstdc++.so.6 (torch's), never a private
static copy — the cause of the H200 run's SIGSEGV on every TORCH_CHECK message with a number.

Why a private copy breaks: `std::num_put<char>::id` (a locale facet id) is a GNU unique symbol, so
the loader binds it to the shared libstdc++ that torch loaded, while the rest of a statically
linked extension's locale code stays in its own copy; formatting a number then indexes one copy's
facet array with the other's id. The reproduction below builds a tiny op library twice with
`-static-libstdc++` (what the GPU machine's g++ wrapper did to marn_fast._C): without setup.py's
LINK_FLAGS the number vanishes from the message (g++ 12; g++ 13 crashes) and the ELF check fails;
with them the library needs libstdc++.so.6, defines no std::locale symbols and prints the number.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from marn_fast.ops import cpu_extension_available

ROOT = Path(__file__).resolve().parents[1]
LINK_FLAGS = runpy.run_path(str(ROOT / "setup.py"), run_name="marn_fast_setup")["LINK_FLAGS"]
TOOLS = {tool: shutil.which(tool) for tool in ("readelf", "nm", "g++")}
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF linking is Linux-only")
needs = lambda *tools: pytest.mark.skipif(not all(TOOLS[t] for t in tools),  # noqa: E731
                                          reason=f"needs {', '.join(tools)}")


def elf_link_problems(path: Path) -> list[str]:
    """What is wrong with how the shared library at `path` links libstdc++ (empty: nothing)."""
    dynamic = subprocess.run([TOOLS["readelf"], "-d", str(path)], capture_output=True, text=True, check=True).stdout
    symbols = subprocess.run([TOOLS["nm"], "-D", "--defined-only", str(path)], capture_output=True, text=True,
                             check=True).stdout
    problems = []
    if "[libstdc++.so.6]" not in dynamic:
        problems.append(f"{path.name} does not need libstdc++.so.6 (a static copy is linked in)")
    locale = [line.split()[-1] for line in symbols.splitlines() if "_ZNSt6locale" in line]
    if locale:
        problems.append(f"{path.name} defines {len(locale)} std::locale symbols, e.g. {locale[0]}")
    return problems


def _built_extensions() -> list[Path]:
    paths = []
    for name in ("marn_fast._C", "marn_fast._C_cuda"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            paths.append(Path(spec.origin))
    return paths


@linux_only
@needs("readelf", "nm")
@pytest.mark.skipif(not cpu_extension_available(), reason="marn_fast._C not built")
def test_extensions_share_libstdcxx():
    paths = _built_extensions()
    assert paths, "no compiled extension found"
    problems = [p for path in paths for p in elf_link_problems(path)]
    assert not problems, "; ".join(problems)


def test_cmake_links_like_setup_py():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert all(f'"{flag}"' in cmake for flag in LINK_FLAGS), f"CMakeLists.txt lacks one of {LINK_FLAGS}"


# ------------------------------------------------------------- the reproduction (a tiny op library)
TINY = r"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
at::Tensor tiny_check(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 100, "tiny::check: a number ", x.dim() + 5, ", a shape ", x.sizes());
  return x;
}
TORCH_LIBRARY(marn_fast_tiny, m) { m.def("check(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(marn_fast_tiny, CompositeExplicitAutograd, m) { m.impl("check", &tiny_check); }
"""
EXPECTED = "a number 7, a shape [2, 3]"


@pytest.fixture(scope="module")
def tiny_object(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_extension")
    (folder / "tiny.cpp").write_text(TINY)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    subprocess.run([TOOLS["g++"], "-std=c++20", "-O0", "-g0", "-fPIC", abi, *includes, "-c", "tiny.cpp",
                    "-o", "tiny.o"], cwd=folder, check=True, capture_output=True)
    return folder / "tiny.o"


def _link_and_call(obj: Path, name: str, flags: list) -> tuple[list, int, str]:
    """Link obj with `flags` into NAME.so, then load it in a child process and call the op with a
    bad input: (ELF problems, exit code, the error message)."""
    lib = obj.parent / f"{name}.so"
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    subprocess.run([TOOLS["g++"], "-shared", str(obj), "-o", str(lib), *libs, *flags], check=True, capture_output=True)
    code = (f"import torch; torch.ops.load_library({str(lib)!r})\n"
            "try:\n    torch.ops.marn_fast_tiny.check(torch.zeros(2, 3))\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0], flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return elf_link_problems(lib), proc.returncode, proc.stdout.strip()


@linux_only
@needs("readelf", "nm", "g++")
def test_static_libstdcxx_loses_numbers_and_link_flags_restore_them(tiny_object):
    # The defect: a private static libstdc++ fails the ELF check, and the number is lost (or the
    # process crashes) when the message is formatted.
    problems, rc, message = _link_and_call(tiny_object, "static", ["-static-libstdc++"])
    assert problems, "a -static-libstdc++ link should fail the ELF check"
    assert rc != 0 or EXPECTED not in message, f"static libstdc++ unexpectedly formatted the number: {message!r}"
    # The fix: the same compiler flags plus setup.py's LINK_FLAGS pass the ELF check and print it.
    problems, rc, message = _link_and_call(tiny_object, "fixed", ["-static-libstdc++", *LINK_FLAGS])
    assert not problems, "; ".join(problems)
    assert rc == 0 and EXPECTED in message, f"exit {rc}, message {message!r}"
