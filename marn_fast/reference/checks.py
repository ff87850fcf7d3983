"""Argument checks shared by the reference and the fused paths (torch only).

Every check raises ValueError naming the argument, the expected and the received
shape/dtype/device, so bad input never fails deep inside a kernel. Checks that read values
(lengths in range, targets in [0, 1]) skip meta tensors, which have none: shape inference on the
meta device works.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def has_values(t: torch.Tensor) -> bool:
    """False for tensors without data (the meta device) and while torch.compile traces (reading
    values is a data-dependent graph break): checks that read values skip them."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim: Optional[int] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = None, expected: str = "") -> None:
    """Raise ValueError unless `t` is a tensor of rank `ndim` and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {expected}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {expected}, got {_describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name}: expected dtype in ({names}) {expected}, got {_describe(t)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], expected: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {expected}, got {_describe(t)}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_lengths(lengths: Optional[torch.Tensor], batch: int, n: int, device: torch.device,
                  name: str = "lengths") -> None:
    """lengths: int64 [B] with every value in [1, n], on the data's device (the values are not
    read under torch.compile)."""
    if lengths is None:
        return
    check_tensor(name, lengths, ndim=1, dtypes=(torch.int64,), expected=f"[B={batch}] int64")
    check_shape(name, lengths, (batch,), "[B] int64 (one length per document)")
    if lengths.device != device:
        raise ValueError(f"{name}: expected device {device} (the data's device), got {lengths.device}")
    if batch and has_values(lengths):
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        if lo < 1 or hi > n:
            raise ValueError(f"{name}: every length must lie in [1, n={n}], got values in [{lo}, {hi}]")


def check_targets(name: str, targets: torch.Tensor, logits_shape: Sequence[int], check_values: bool = True) -> None:
    """Targets: float (soft targets in [0, 1]), bool or uint8, the logits' shape. The range check
    reads the values (a host synchronisation on a GPU); check_values=False skips it."""
    check_tensor(name, targets, dtypes=FLOAT_DTYPES + (torch.bool, torch.uint8),
                 expected=f"[B, L]={tuple(logits_shape)} float/bool/uint8")
    check_shape(name, targets, logits_shape, "(the logits' shape [B, L])")
    if check_values and (targets.is_floating_point() or targets.dtype == torch.uint8):
        if targets.numel() and has_values(targets):
            lo, hi = (float(v) for v in torch.aminmax(targets))
            if lo < 0 or hi > 1:
                raise ValueError(f"{name}: values must lie in [0, 1], got values in [{lo}, {hi}]")
