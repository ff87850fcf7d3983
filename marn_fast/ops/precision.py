"""The dtype an op computes in, and whether this CPU computes bf16 natively.

Every fused op follows autocast's rule for its GEMMs and convolutions: under
`torch.autocast(device, dtype)` a floating-point input other than fp64 is computed in the autocast
dtype (autocast never casts fp64); outside autocast the input's own dtype is used. The op then
casts its operands itself and runs its body with autocast off, so that nothing inside is cast a
second time; reductions (softmax statistics, BatchNorm statistics, the GRU state) accumulate in
fp32. The measured dispatcher keys a call by this compute dtype, so bf16 (given directly or under
autocast) has candidates and choices of its own.

`compute_dtype(t)` gives that dtype, `accumulation_dtype(dtype)` the dtype sums are kept in (fp64
for fp64, else fp32), `autocast_off(device)` the context an op body runs in. `native_bf16()` says
whether the CPU has bf16 matrix or vector instructions (AMX-BF16 or AVX-512 BF16), without which
oneDNN emulates bf16 in fp32 (correct, and usually slower than fp32); `warn_once(key, message)`
is how an op says, once per process, that it computes in another dtype than the one asked for.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import ContextManager

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")
_WARNED: set = set()
_WARN_LOCK = threading.Lock()


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype active for this device type, or None outside autocast."""
    kind = torch.device(device).type
    if kind not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op computes its GEMMs/convolutions in for input t: the autocast dtype under
    autocast (for floating inputs other than fp64, as autocast casts), else t's dtype."""
    if t.is_floating_point() and t.dtype != torch.float64:
        dtype = autocast_dtype(t.device)
        if dtype is not None:
            return dtype
    return t.dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums, softmax statistics and logits: fp64 for fp64 computations, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device | str) -> ContextManager:
    """Autocast disabled for this device type (a no-op context on devices without autocast)."""
    kind = torch.device(device).type
    if kind not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AMX-BF16 tiles or AVX-512 BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's bf16 instruction sets torch can use: a subset of ("amx_bf16", "avx512_bf16")."""
    found = []
    if torch.cpu._is_amx_tile_supported():
        found.append("amx_bf16")
    if torch.cpu._is_avx512_bf16_supported():
        found.append("avx512_bf16")
    return tuple(found)


def warn_once(key: str, message: str) -> None:
    """A RuntimeWarning the first time `key` is seen in this process."""
    with _WARN_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(f"marn_fast: {message}", RuntimeWarning, stacklevel=3)
