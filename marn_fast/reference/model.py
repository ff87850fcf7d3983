"""The whole MARN model in plain PyTorch: the specification every fused path is tested against.

tokens [B, n] int64 (0 = PAD) → embedding (frozen by default) → dropout → BiGRU packed by
lengths (H [B, n, C], C = 2·d_r) → RAM (O [B, n, C]) → dropout → one label-wise attention head
per code system (ICD, and CCS when num_ccs > 0) → logits. Loss: λ_icd·L_icd + λ_ccs·L_ccs with
L the official focal form, the paper's balanced focal form (eq. 16) or BCE.

`marn_fast.MARN` subclasses this class and overrides the `_encode_tokens`, `_recalibrate`,
`_head_logits` and `_loss` steps only, so both share parameters, buffers and state_dict keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import MARNConfig
from .bigru import packed_bigru
from .checks import check_lengths, check_shape, check_targets, check_tensor, has_values
from .encoders import CNNEncoder, MultiResCNNEncoder
from .focal_loss import bce_loss, focal_loss
from .label_attention import label_attention
from .ram import RAM


@dataclass
class MARNOutput:
    """icd_logits [B, num_icd]; ccs_logits [B, num_ccs] or None without the CCS branch."""

    icd_logits: torch.Tensor
    ccs_logits: Optional[torch.Tensor] = None


class LabelAttentionHead(nn.Module):
    """Parameters of one label-wise attention head: Q = U.weight [L, C], W = final.weight, b = final.bias."""

    def __init__(self, features: int, labels: int) -> None:
        super().__init__()
        self.U = nn.Linear(features, labels, bias=False)
        self.final = nn.Linear(features, labels)
        nn.init.xavier_uniform_(self.U.weight)
        nn.init.xavier_uniform_(self.final.weight)


def copy_embeddings(embedding: nn.Embedding, matrix, normalize: bool = False) -> None:
    """Copy a [vocab_size, embed_dim] matrix (e.g. word2vec) into `embedding`; normalize=True
    L2-normalises every non-zero row (the official preprocessing)."""
    matrix = torch.as_tensor(matrix, dtype=embedding.weight.dtype)
    expected = tuple(embedding.weight.shape)
    check_tensor("matrix", matrix, ndim=2, expected=f"[vocab_size, embed_dim]={expected}")
    check_shape("matrix", matrix, expected, "[vocab_size, embed_dim]")
    if normalize:
        norms = matrix.norm(dim=1, keepdim=True)
        matrix = torch.where(norms > 0, matrix / norms.clamp_min(1e-12), matrix)
    with torch.no_grad():
        embedding.weight.copy_(matrix.to(embedding.weight.device))


def check_tokens(tokens: torch.Tensor, lengths: Optional[torch.Tensor], vocab_size: int, max_length: int) -> None:
    """A model's input: tokens [B, n] int64 with ids in [0, vocab_size), 1 <= n <= max_length, and
    lengths [B] in [1, n] or None (ValueError naming the argument otherwise)."""
    check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64,), expected="[B, n] int64")
    batch, n = tokens.shape
    if batch == 0 or n == 0:
        raise ValueError(f"tokens: expected a non-empty [B, n] batch, got shape {tuple(tokens.shape)}")
    if n > max_length:
        raise ValueError(f"tokens: n={n} exceeds config.max_length={max_length}; "
                         "truncate documents when batching (the data module does and counts it)")
    if has_values(tokens):
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"tokens: ids must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")
    check_lengths(lengths, batch, n, tokens.device)


def build_encoder(config: MARNConfig) -> nn.Module:
    """The base encoder: a one-layer BiGRU (MARN), or CAML's CNN / MultiResCNN (paper Fig. 7)."""
    if config.encoder == "cnn":
        return CNNEncoder(config.embed_dim, config.num_filter_maps, config.filter_size)
    if config.encoder == "multirescnn":
        return MultiResCNNEncoder(config.embed_dim, config.num_filter_maps, config.multirescnn_filter_sizes)
    return nn.GRU(config.embed_dim, config.hidden_size, batch_first=True, bidirectional=True)


class MARN(nn.Module):
    """Reference MARN. forward(tokens [B, n] int64, lengths [B] int64 or None) → MARNOutput."""

    def __init__(self, config: MARNConfig) -> None:
        super().__init__()
        if not isinstance(config, MARNConfig):
            raise ValueError(f"config: expected a MARNConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        c = config.feature_size
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.embedding.weight.requires_grad_(not config.freeze_embeddings)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = build_encoder(config)
        self.ram = RAM(c, output_tanh=config.ram_output_tanh) if config.use_ram else None
        self.icd_head = LabelAttentionHead(c, config.num_icd)
        self.ccs_head = LabelAttentionHead(c, config.num_ccs) if config.num_ccs > 0 else None

    # ----------------------------------------------------------------- construction helpers
    def set_embeddings(self, matrix, normalize: bool = False) -> None:
        """Copy a [vocab_size, embed_dim] matrix (e.g. word2vec) into the embedding.

        normalize=True L2-normalises every non-zero row (the official preprocessing)."""
        copy_embeddings(self.embedding, matrix, normalize)

    @classmethod
    def from_pretrained(cls, config: MARNConfig, embeddings, normalize: bool = True, **kwargs):
        """Build a model whose embedding is `embeddings` [vocab_size, embed_dim] (rows L2-normalised)."""
        model = cls(config, **kwargs)
        model.set_embeddings(embeddings, normalize=normalize)
        return model

    # ----------------------------------------------------------------- input checks
    def check_inputs(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
        check_tokens(tokens, lengths, self.config.vocab_size, self.config.max_length)

    # ----------------------------------------------------------------- the steps (overridden by the fused model)
    def _encode_tokens(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if self.config.encoder == "bigru":
            return packed_bigru(self.encoder, x, lengths)
        return self.encoder(x, lengths)

    def _recalibrate(self, h: torch.Tensor) -> torch.Tensor:
        return self.ram(h.transpose(1, 2)).transpose(1, 2)

    def _head_logits(self, head: LabelAttentionHead, features: torch.Tensor,
                     lengths: Optional[torch.Tensor]) -> torch.Tensor:
        return label_attention(features, head.U.weight, head.final.weight, head.final.bias, lengths)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.loss == "bce":
            return bce_loss(logits, targets)
        return focal_loss(logits, targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                          balanced=cfg.focal_balanced)

    # ----------------------------------------------------------------- public API
    def encode(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Label-agnostic document features O [B, n, C] (after RAM and dropout)."""
        self.check_inputs(tokens, lengths)
        x = self.dropout(self.embedding(tokens))
        h = self._encode_tokens(x, lengths)
        if self.ram is not None:
            # contiguous [B, n, C]: dropout draws its mask in memory order, so every backend
            # must hand it the same layout to get the same mask for the same seed.
            h = self.dropout(self._recalibrate(h).contiguous())
        return h

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> MARNOutput:
        features = self.encode(tokens, lengths)
        icd = self._head_logits(self.icd_head, features, lengths)
        ccs = self._head_logits(self.ccs_head, features, lengths) if self.ccs_head is not None else None
        return MARNOutput(icd_logits=icd, ccs_logits=ccs)

    def compute_loss(self, output: MARNOutput, icd_targets: torch.Tensor,
                     ccs_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar training loss: λ_icd·L(icd) + λ_ccs·L(ccs), or L(icd) alone without the CCS branch."""
        if not isinstance(output, MARNOutput):
            raise ValueError(f"output: expected a MARNOutput, got {type(output).__name__}")
        check_targets("icd_targets", icd_targets, output.icd_logits.shape)
        if output.ccs_logits is None:
            if ccs_targets is not None:
                raise ValueError("ccs_targets: given, but this model has no CCS branch (num_ccs=0); pass None")
            return self._loss(output.icd_logits, icd_targets)
        if ccs_targets is None:
            raise ValueError(f"ccs_targets: required with the CCS branch (num_ccs={self.config.num_ccs}), "
                             f"expected shape {tuple(output.ccs_logits.shape)}, got None")
        check_targets("ccs_targets", ccs_targets, output.ccs_logits.shape)
        return self._multitask_loss(output, icd_targets, ccs_targets)

    def _multitask_loss(self, output: MARNOutput, icd_targets: torch.Tensor,
                        ccs_targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return (cfg.lambda_icd * self._loss(output.icd_logits, icd_targets)
                + cfg.lambda_ccs * self._loss(output.ccs_logits, ccs_targets))
