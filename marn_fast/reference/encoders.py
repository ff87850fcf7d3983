"""Convolutional base encoders for the paper's Fig. 7 (MARN's blocks on other base models).

Both read x [B, n, d_e] and lengths [B], and return H [B, n, C] that is zero at t ≥ lengths[b]:
tokens past a document's length are zeroed before the convolutions, so nothing there is read.
- CNNEncoder (CAML): H = tanh(conv_k(x)), C = num_filter_maps, `conv` is one Conv1d.
- MultiResCNNEncoder (MultiResCNN): per filter size k a channel
  tanh(baseconv_k(x)) → residual block (conv → BN → tanh → conv → BN, + 1×1-conv shortcut → BN,
  then tanh); the channels are concatenated, C = len(filter_sizes)·num_filter_maps.
Layer names follow the official code (`conv`, `conv.channel-k.baseconv`, `.resconv-0.left/shortcut`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _valid(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    return (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[:, :, None].to(x.dtype)


class CNNEncoder(nn.Module):
    def __init__(self, embed_dim: int, num_filter_maps: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(embed_dim, num_filter_maps, kernel_size, padding=kernel_size // 2)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        valid = _valid(x, lengths)
        if valid is not None:
            x = x * valid
        h = torch.tanh(self.conv(x.transpose(1, 2))[:, :, : x.shape[1]]).transpose(1, 2)
        return h * valid if valid is not None else h


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel_size, padding=pad, bias=False), nn.BatchNorm1d(c_out), nn.Tanh(),
            nn.Conv1d(c_out, c_out, kernel_size, padding=pad, bias=False), nn.BatchNorm1d(c_out))
        self.shortcut = nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2]
        return torch.tanh(self.left(x)[:, :, :n] + self.shortcut(x))


class MultiResCNNEncoder(nn.Module):
    def __init__(self, embed_dim: int, num_filter_maps: int, filter_sizes: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.ModuleDict()
        for k in filter_sizes:
            channel = nn.Module()
            channel.baseconv = nn.Conv1d(embed_dim, embed_dim, k, padding=k // 2)
            nn.init.xavier_uniform_(channel.baseconv.weight)
            channel.add_module("resconv-0", ResidualBlock(embed_dim, num_filter_maps, k))
            self.conv[f"channel-{k}"] = channel

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        valid = _valid(x, lengths)
        if valid is not None:
            x = x * valid
        xt, n = x.transpose(1, 2), x.shape[1]
        outs = []
        for channel in self.conv.values():
            h = torch.tanh(channel.baseconv(xt)[:, :, :n])
            outs.append(getattr(channel, "resconv-0")(h))
        h = torch.cat(outs, dim=1).transpose(1, 2)
        return h * valid if valid is not None else h
