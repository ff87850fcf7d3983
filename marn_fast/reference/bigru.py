"""The BiGRU encoder, plain PyTorch: `nn.GRU(bidirectional=True)` on a packed batch.

x [B, n, d_e] with lengths [B] → H [B, n, 2·d_r]; each document's reverse direction starts at
its own last token, nothing past lengths[b] is read, and H is zero there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def packed_bigru(gru: nn.GRU, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    if lengths is None:
        return gru(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
