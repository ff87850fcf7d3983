"""Triton kernels (imported lazily by marn_fast.ops; this package's modules import triton, this
file does not)."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
