"""Builds marn_fast's compiled ops on `pip install --no-build-isolation .`.

marn_fast._C (C++ CPU kernels and the op schemas) always builds. marn_fast._C_cuda builds when
torch is a CUDA build and a CUDA toolkit is found; MARN_FAST_CUDA=0/1 forces it off/on. Without
a visible GPU, TORCH_CUDA_ARCH_LIST defaults to 9.0a (Hopper). Torch must already be installed
(hence --no-build-isolation): the extensions are compiled against that torch.

The version is marn_fast.__version__; MARN_FAST_LOCAL_VERSION=1 appends the local tag naming that
torch (`0.1.0+torch2.13cpu`, marn_fast/build_tag.py) to wheels and installs, never to the sdist,
which builds against any torch (docs/install.md).
"""
import ast
import glob
import hashlib
import importlib.util
import os
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The C++ standard is the one torch asks for (cpp_extension adds it). -fopenmp: ATen's
# at::parallel_for runs on one thread unless the calling file is compiled with OpenMP (torch's CPU
# wheel already links libgomp, so this adds no runtime).
# MARN_FAST_OPENMP=0 builds without it (single-threaded CPU kernels).
OPENMP = ["-fopenmp"] if os.environ.get("MARN_FAST_OPENMP", "1").strip() != "0" else []
CXX_FLAGS = ["-O3", "-g0"] + OPENMP
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# The extensions share torch's libstdc++.so.6 and never carry a private copy (CMakeLists.txt uses
# the same flags). A compiler that links libstdc++ statically (some g++ wrappers add
# -static-libstdc++) otherwise gives the extension its own locale code while the loader binds the
# GNU-unique facet ids (std::num_put<char>::id) to the shared library: formatting a number in a
# TORCH_CHECK message then reads the wrong facet (numbers vanish with g++ 12, SIGSEGV with g++ 13;
# tests/test_build.py). Linking -lstdc++ dynamically before the compiler's own libraries resolves
# every std:: symbol from libstdc++.so.6; --exclude-libs,ALL keeps whatever still comes from a
# static archive out of the dynamic symbol table.
LINK_FLAGS = (["-Wl,--exclude-libs,ALL", "-Wl,--push-state,-Bdynamic,-lstdc++,--pop-state"]
              if sys.platform.startswith("linux") else [])


def _load_build_tag():
    # By path: the package itself (torch, the ops) is not importable while it is being built.
    path = os.path.join(ROOT, "marn_fast", "build_tag.py")
    spec = importlib.util.spec_from_file_location("marn_fast_build_tag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def version(argv):
    """marn_fast.__version__ (read from the source, not imported), with the torch tag when
    MARN_FAST_LOCAL_VERSION=1 and `argv` (the setup command) is not an sdist build."""
    with open(os.path.join(ROOT, "marn_fast", "__init__.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    base = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets))
    build_tag = _load_build_tag()
    flag = os.environ.get(build_tag.ENV_VAR, "0").strip()
    if flag not in ("0", "1"):
        sys.exit(f"{build_tag.ENV_VAR} must be 0 or 1 (1: tag the wheel's version with the torch it is built "
                 f"against), got {flag!r}")
    if flag == "0" or "sdist" in argv:
        return base
    import torch

    return f"{base}+{build_tag.torch_tag(torch.__version__, torch.version.cuda, getattr(torch.version, 'hip', None))}"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The compiled libraries' build identity (csrc/build_identity.h): a fingerprint of the sources they
# are built from, so that the measured dispatcher can tell a timing taken with other kernels. It
# hashes the sources, not the binary: every build of the same sources against the same torch
# (a user's, the project's) has the same identity. CMakeLists.txt computes the same value.
FINGERPRINT_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_fingerprint(root=ROOT):
    """16 hex digits: sha256 of one line "<path> <sha256 of the file>\n" per source under csrc/
    (.cpp, .h, .cu, .cuh; csrc/tests/ excluded), paths relative to root with '/', sorted."""
    csrc = os.path.join(root, "csrc")
    paths = sorted(os.path.relpath(p, root).replace(os.sep, "/")
                   for p in glob.glob(os.path.join(csrc, "**", "*"), recursive=True)
                   if p.endswith(FINGERPRINT_SUFFIXES) and os.path.isfile(p))
    lines = []
    for path in paths:
        if path.startswith("csrc/tests/"):
            continue
        with open(os.path.join(root, path), "rb") as fh:
            lines.append(f"{path} {hashlib.sha256(fh.read()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _want_cuda(torch, cpp_extension):
    flag = os.environ.get("MARN_FAST_CUDA", "").strip()
    if flag == "0":
        return False
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1" and not have:
        sys.exit("MARN_FAST_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return have


def _cuda_include_dirs():
    # cuBLAS/cuSPARSE headers of the nvidia-* wheels that a CUDA torch wheel depends on.
    purelib = sysconfig.get_paths()["purelib"]
    return [d for d in glob.glob(os.path.join(purelib, "nvidia", "*", "include")) if os.path.isdir(d)]


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("marn_fast builds against an installed torch: `pip install torch` first, then "
                 "`pip install --no-build-isolation .`")
    cpu_sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    identity = [("MARN_FAST_SOURCE_FINGERPRINT", source_fingerprint())]
    exts = [cpp_extension.CppExtension(
        "marn_fast._C", cpu_sources,
        define_macros=[("MARN_FAST_PYTHON_MODULE", None)] + identity,
        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=OPENMP + LINK_FLAGS)]
    if _want_cuda(torch, cpp_extension):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
        exts.append(cpp_extension.CUDAExtension(
            "marn_fast._C_cuda", _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=_cuda_include_dirs(), define_macros=identity,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=OPENMP + LINK_FLAGS))
    return exts, cpp_extension.BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__); tests import LINK_FLAGS
    ext_modules, build_ext = extensions()
    setup(version=version(sys.argv[1:]), ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
