"""Free memory on a device, working-set budgets derived from it, and the measured dispatcher's budget.

`free_memory_bytes(device)`: what can still be allocated (CUDA: free + cached-unused; CPU:
MemAvailable of /proc/meminfo, re-read at most once a second; None where unknown).
`budget(device, max_bytes, fraction)`: min(max_bytes, fraction · free), or max_bytes when the free
memory cannot be read — how the ops size their chunks and saved buffers.
`memory_budget(device)`: the extra peak bytes a candidate may need for the dispatcher
(`marn_fast.ops.dispatch`) to run it when measuring:

    MARN_FAST_MEMORY_BUDGET unset       BUDGET_FRACTION × free memory (None when free is unknown)
    MARN_FAST_MEMORY_BUDGET=0.3         a fraction in (0, 1] of free memory (also "30%")
    MARN_FAST_MEMORY_BUDGET=6e9         bytes (a number above 1), or with a unit: 6GB, 512MiB, 2 GiB
"""
from __future__ import annotations

import os
import re
import time
from typing import Any, Dict, Optional

import torch

ENV_BUDGET = "MARN_FAST_MEMORY_BUDGET"
# The dispatcher's default budget: this fraction of the free memory when a measurement starts.
BUDGET_FRACTION = 0.5
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SPEC = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|[a-z]*)\s*$", re.IGNORECASE)
_MEMINFO_CACHE: Dict[str, Any] = {"time": float("-inf"), "bytes": None}


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device` (None when unknown). The CPU's MemAvailable
    is re-read at most once a second (reading /proc/meminfo costs more than a small call)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    now = time.monotonic()
    if now - _MEMINFO_CACHE["time"] > 1.0:
        _MEMINFO_CACHE.update(time=now, bytes=_mem_available())
    return _MEMINFO_CACHE["bytes"]


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return 1024 * int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def budget(device: torch.device, max_bytes: int, fraction: float) -> int:
    """Bytes a working set may take: min(max_bytes, fraction · free memory)."""
    free = free_memory_bytes(device)
    return max_bytes if free is None else min(max_bytes, int(fraction * free))


def itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def parse_budget(text: str) -> tuple[str, float]:
    """("fraction", f) or ("bytes", b) from a MARN_FAST_MEMORY_BUDGET value (module docstring)."""
    match = _SPEC.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit not in UNITS and unit != "%"):
        raise ValueError(f"{ENV_BUDGET}: expected bytes (6e9, 6GB, 512MiB) or a fraction of free memory (0.3, 30%), "
                         f"got {text!r}")
    value = float(match.group(1))
    if unit == "%":
        value = value / 100
        if not 0 < value <= 1:
            raise ValueError(f"{ENV_BUDGET}: a percentage must lie in (0, 100], got {text!r}")
        return "fraction", value
    if value <= 0:
        raise ValueError(f"{ENV_BUDGET}: expected a positive value, got {text!r}")
    if unit == "" and value <= 1:
        return "fraction", value
    return "bytes", value * UNITS[unit]


def memory_budget(device: torch.device) -> Optional[int]:
    """The bytes a candidate may need beyond its inputs to be run by the dispatcher on `device`
    (module docstring); None: no limit known."""
    spec = os.environ.get(ENV_BUDGET, "").strip()
    kind, value = parse_budget(spec) if spec else ("fraction", BUDGET_FRACTION)
    if kind == "bytes":
        return int(value)
    free = free_memory_bytes(device)
    return None if free is None else int(value * free)


def format_bytes(count: float) -> str:
    """1.82e10 → "18.2 GB" (powers of 1000, as the budget's units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
