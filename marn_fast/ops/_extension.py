"""Loads the compiled extensions (`marn_fast._C`, and `marn_fast._C_cuda` on CUDA builds).

Importing them registers the `torch.ops.marn_fast.*` operators. When the package was installed
without a build (or the build is stale), one clear warning is issued and the ops fall back to
their plain-PyTorch paths. `build_identity()` says what the loaded extensions were built from.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

_STATE: dict = {}


def _load(name: str):
    try:
        return importlib.import_module(f"marn_fast.{name}")
    except ImportError as exc:  # not built, or built against another torch
        return exc


def cpu_extension_available() -> bool:
    """True when `marn_fast._C` (C++ CPU ops) imported. With a CUDA build of torch this also
    imports `marn_fast._C_cuda` when it was built, so that the CUDA kernels are registered with
    the dispatcher before any op is called directly through `torch.ops.marn_fast`."""
    if "cpu" not in _STATE:
        mod = _load("_C")
        _STATE["cpu"] = not isinstance(mod, Exception)
        _STATE["cuda_module"] = (_STATE["cpu"] and torch.version.cuda is not None
                                 and not isinstance(_load("_C_cuda"), Exception))
        if not _STATE["cpu"]:
            warnings.warn(
                f"marn_fast: the C++ extension marn_fast._C is not available ({mod}); "
                "falling back to the plain-PyTorch reference path. Reinstall with "
                "`pip install --no-build-isolation .` to build it.", RuntimeWarning, stacklevel=2)
    return _STATE["cpu"]


def cuda_extension_available() -> bool:
    """True when `marn_fast._C_cuda` (CUDA kernels) imported and a GPU is visible."""
    if "cuda" not in _STATE:
        _STATE["cuda"] = cpu_extension_available() and _STATE["cuda_module"] and torch.cuda.is_available()
    return _STATE["cuda"]


def extension_available_for(t: torch.Tensor) -> bool:
    """Whether the compiled ops have a kernel for `t`'s device."""
    if t.device.type == "cuda":
        return cuda_extension_available()
    return t.device.type == "cpu" and cpu_extension_available()


def build_identity() -> Optional[str]:
    """What the loaded extensions were built from, "src-<fingerprint>+torch-<version>": the
    fingerprint of their csrc/ sources (setup.py's `source_fingerprint`, computed at build time)
    and the torch version they were compiled against; None without marn_fast._C. When a loaded
    marn_fast._C_cuda was built from other sources, both are named ("cpu …; cuda …")."""
    if not cpu_extension_available():
        return None
    identity = torch.ops.marn_fast.build_identity()
    if _STATE["cuda_module"]:
        cuda = getattr(_load("_C_cuda"), "BUILD_IDENTITY", None)
        if cuda != identity:
            return f"cpu {identity}; cuda {cuda}"
    return identity
