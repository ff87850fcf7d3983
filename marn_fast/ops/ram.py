"""The RAM forward over the reference module's parameters, with its fusions.

h [B, C, n] (H transposed) → O [B, C, n]. Same parameters and buffers as
`marn_fast.reference.RAM` (so state_dicts are shared); the output step tanh(up2(U1) ⊙ H) runs
as the one-pass `mul_tanh` op.
"""
from __future__ import annotations

import torch

from ..reference.ram import RAM
from .mul_tanh import mul_tanh


def ram_forward(ram: RAM, h: torch.Tensor) -> torch.Tensor:
    d1 = ram.down1(h)
    u1 = ram.up1(ram.lateral(ram.down2(d1))) + d1
    u2 = ram.up2(u1)
    return mul_tanh(u2, h) if ram.output_tanh else u2 * h
