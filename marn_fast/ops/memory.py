"""Free memory on a device, and working-set budgets derived from it.

`free_memory_bytes(device)`: what can still be allocated (CUDA: free + cached-unused; CPU:
MemAvailable of /proc/meminfo, re-read at most once a second; None where unknown).
`budget(device, max_bytes, fraction)`: min(max_bytes, fraction · free), or max_bytes when the free
memory cannot be read — how the ops size their chunks and saved buffers.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

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
