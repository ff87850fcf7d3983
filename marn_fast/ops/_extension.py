"""Loads the compiled extensions (`marn_fast._C`, and `marn_fast._C_cuda` on CUDA builds).

Importing them registers the `torch.ops.marn_fast.*` operators. When the package was installed
without a build (or the build is stale), one clear warning is issued and the ops fall back to
their plain-PyTorch paths.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_STATE: dict = {}


def _load(name: str):
    try:
        return importlib.import_module(f"marn_fast.{name}")
    except ImportError as exc:  # not built, or built against another torch
        return exc


def cpu_extension_available() -> bool:
    """True when `marn_fast._C` (C++ CPU ops) imported."""
    if "cpu" not in _STATE:
        mod = _load("_C")
        _STATE["cpu"] = not isinstance(mod, Exception)
        if not _STATE["cpu"]:
            warnings.warn(
                f"marn_fast: the C++ extension marn_fast._C is not available ({mod}); "
                "falling back to the plain-PyTorch reference path. Reinstall with "
                "`pip install --no-build-isolation .` to build it.", RuntimeWarning, stacklevel=2)
    return _STATE["cpu"]


def cuda_extension_available() -> bool:
    """True when `marn_fast._C_cuda` (CUDA kernels) imported and a GPU is visible."""
    if "cuda" not in _STATE:
        ok = cpu_extension_available() and torch.cuda.is_available()
        _STATE["cuda"] = ok and not isinstance(_load("_C_cuda"), Exception)
    return _STATE["cuda"]


def extension_available_for(t: torch.Tensor) -> bool:
    """Whether the compiled ops have a kernel for `t`'s device."""
    if t.device.type == "cuda":
        return cuda_extension_available()
    return t.device.type == "cpu" and cpu_extension_available()
