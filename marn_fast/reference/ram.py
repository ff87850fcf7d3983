"""Recalibrated Aggregation Module (RAM), plain PyTorch (paper §3.2, official layer layout).

Every block is conv(k=3, pad 1, no bias) → BatchNorm1d → tanh → conv(k=3) → BatchNorm1d, over
[B, channels, n] (the sequence is the conv axis, the features are channels; length kept).
With C = 2·d_r (C/2 and C/4 rounded down, as the official code):  down1 C→C/2→C/2,
down2 C/2→C/4→C/4, lateral C/4→C/4→C/4, up1 ConvTranspose1d C/4→C/2→C/2,
up2 ConvTranspose1d C/2→C→C, and
    D1 = down1(H), D2 = down2(D1), L1 = lateral(D2), U1 = up1(L1) + D1,
    O = tanh(up2(U1) ⊙ H)   (official code; output_tanh=False gives the paper's eq. 11).
Submodule indices (0 conv, 1 BN, 2 tanh, 3 conv, 4 BN) match the official code's state_dict.
"""
from __future__ import annotations

import torch
from torch import nn

KERNEL_SIZE = 3
PADDING = KERNEL_SIZE // 2
BLOCK_NAMES = ("down1", "down2", "lateral", "up1", "up2")


def ram_block(c_in: int, c_out: int, transposed: bool) -> nn.Sequential:
    conv = nn.ConvTranspose1d if transposed else nn.Conv1d
    return nn.Sequential(
        conv(c_in, c_out, KERNEL_SIZE, stride=1, padding=PADDING, bias=False),
        nn.BatchNorm1d(c_out),
        nn.Tanh(),
        conv(c_out, c_out, KERNEL_SIZE, stride=1, padding=PADDING, bias=False),
        nn.BatchNorm1d(c_out),
    )


class RAM(nn.Module):
    """RAM over H^T [B, C, n] → O^T [B, C, n]."""

    def __init__(self, channels: int, output_tanh: bool = True) -> None:
        super().__init__()
        if channels < 4:
            raise ValueError(f"RAM: channels must be >= 4, got {channels}")
        c1, c2, c3 = channels, channels // 2, channels // 4
        self.output_tanh = output_tanh
        self.down1 = ram_block(c1, c2, transposed=False)
        self.down2 = ram_block(c2, c3, transposed=False)
        self.lateral = ram_block(c3, c3, transposed=False)
        self.up1 = ram_block(c3, c2, transposed=True)
        self.up2 = ram_block(c2, c1, transposed=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(h)
        d2 = self.down2(d1)
        l1 = self.lateral(d2)
        u1 = self.up1(l1) + d1
        out = self.up2(u1) * h
        return torch.tanh(out) if self.output_tanh else out
