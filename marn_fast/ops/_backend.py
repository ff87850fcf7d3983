"""Which implementation runs where: Triton on CUDA tensors (or on CPU tensors under
TRITON_INTERPRET=1 when asked for explicitly), the compiled extension, or plain PyTorch."""
from __future__ import annotations

import importlib.util

import torch

from ..kernels import interpreting

IMPLS = ("auto", "triton", "torch")


# Looked up once at import: torch.compile cannot trace importlib (a graph break under fullgraph).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve_impl(impl: str, t: torch.Tensor, op: str) -> str:
    """'triton' or 'torch' for tensor t. 'auto' picks Triton on CUDA (when installed), else torch."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (t.is_cuda and triton_available()) else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError(f"{op}: impl='triton' but triton is not installed")
        if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
            raise ValueError(f"{op}: impl='triton' needs CUDA tensors, or CPU tensors with "
                             f"TRITON_INTERPRET=1 set before import; got device {t.device}")
    return impl
