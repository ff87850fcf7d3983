"""The precision a run computes in: `--precision {auto,fp32,bf16}` of train, evaluate, predict,
bench-step and tune, and the `precision` key of their config files.

  fp32  the exact model: no autocast.
  bf16  torch.autocast(device, bfloat16) around forward and loss, on the CPU and on CUDA alike:
        GEMMs and convolutions in bf16 (the CPU's AMX / AVX-512 BF16 units through oneDNN,
        tensor cores through cuBLAS/cuDNN), softmax statistics, BatchNorm statistics, the GRU
        state and the loss in fp32 (see `marn_fast.ops.precision`). Parameters, gradients and the
        optimiser stay fp32.
  auto  bf16 on CUDA and fp32 on the CPU (the defaults before the CPU had a bf16 path).
On a CPU without bf16 instructions (neither AVX-512 BF16 nor AMX-BF16) bf16 is emulated by
oneDNN: correct, usually slower than fp32; a run asking for it there is warned once.
"""
from __future__ import annotations

from typing import ContextManager

import torch

from ..ops.precision import cpu_bf16_flags, native_bf16, warn_once

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for this device (ValueError naming the option on anything else)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "auto":
        return "bf16" if kind == "cuda" else "fp32"
    if precision == "bf16" and kind == "cpu" and not native_bf16():
        warn_once("precision-bf16-emulated",
                  "--precision bf16 on a CPU without bf16 instructions (no AVX-512 BF16 or AMX-BF16): oneDNN "
                  "emulates bf16 here, correct but usually slower than fp32")
    return precision


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The autocast context of `precision` on `device` (disabled for fp32)."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")


def precision_record(precision: str, device: torch.device | str) -> dict:
    """What a manifest records: the option, what it resolved to, the dtype, the CPU's bf16 units."""
    resolved = resolve_precision(precision, device)
    return {"precision": precision, "resolved": resolved,
            "dtype": "bfloat16 autocast" if resolved == "bf16" else "float32",
            "cpu_bf16": list(cpu_bf16_flags())}
