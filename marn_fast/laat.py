"""`LAAT`: the label attention model of Vu, Nguyen and Nguyen (IJCAI 2020), on this package's
layers, data, training loop, metrics and checkpoints (`marn-fast train --model laat`).

tokens [B, n] int64 (0 = PAD) → embedding (word2vec, frozen by default) → dropout → BiLSTM
(H [B, n, C], C = 2u, zero past each length) → `marn_fast.nn.LabelWiseAttention(style="laat")`:
K = tanh(H·W_aᵀ), a_l = softmax_t(q_l·k_t), logit_l = w_l·Σ_t a_lt h_t + b_l → MARNOutput
(icd_logits; ccs_logits None: LAAT has no auxiliary head). Loss: BCE (LAAT's), or MARN's focal
loss. Same interface as `marn_fast.MARN` (encode, forward, compute_loss, evidence_topk, config,
backend), so the trainer, evaluation, prediction and checkpoints take either model.

The BiLSTM runs as the LAAT code runs it, `nn.LSTM` on the packed sequence, with backend
"reference" and on CUDA (cuDNN's packed RNN). On the CPU the packed backward is quadratic in n
(one slice-backward per step, as for MARN's BiGRU), so backends "auto" and "fused" run it there
as two unidirectional LSTMs on the padded batch, the reverse one on each document reversed
within its own length (`split_bilstm`: the same outputs and gradients, O(n)). The head runs
`LabelWiseAttention.forward` ("auto", "fused") or its plain formula `reference_logits`
("reference"). Parameter names: embedding.weight, lstm.* (nn.LSTM's), icd_head.first_linears
(W_a), icd_head.second_linears (U), icd_head.third_linears (W, b).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, cast

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import LAATConfig
from .nn import LabelWiseAttention
from .ops.bigru import gather_time, needs_grad, reverse_within_lengths_index
from .ops.focal_loss import default_impl as focal_default
from .ops.focal_loss import focal_loss
from .reference.checks import check_targets
from .reference.focal_loss import bce_loss
from .reference.focal_loss import focal_loss as reference_focal_loss
from .reference.model import MARNOutput, check_tokens, copy_embeddings

BACKENDS = ("auto", "fused", "reference")


def packed_bilstm(lstm: nn.LSTM, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """H [B, n, 2u] of a bidirectional `nn.LSTM` on the packed sequence (the LAAT code's call);
    zero at t ≥ lengths[b]."""
    if lengths is None:
        return lstm(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def split_bilstm(lstm: nn.LSTM, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """`packed_bilstm`'s H, O(n) in backward: the forward direction as a unidirectional LSTM on the
    padded batch (padding follows each document's tokens, so valid positions never see it), the
    reverse direction as one on each document reversed within its own length, reversed back;
    padded outputs zeroed. Runs in x's dtype with autocast off (the LSTM state stays fp32)."""
    if lengths is None:
        return lstm(x)[0]
    weights = cast(List[torch.Tensor], lstm._flat_weights)
    batch, n, _ = x.shape
    index = reverse_within_lengths_index(lengths, n)
    state = x.new_zeros(1, batch, lstm.hidden_size)
    train = needs_grad(x, weights)
    outs = []
    with torch.autocast(x.device.type, enabled=False):
        for direction, inputs in ((0, x), (1, gather_time(x, index))):
            params = [w.to(x.dtype) for w in weights[4 * direction:4 * direction + 4]]
            outs.append(torch.lstm(inputs, [state, state], params, True, 1, 0.0, train, False, True)[0])
    out = torch.cat([outs[0], gather_time(outs[1], index)], dim=2)
    valid = (torch.arange(n, device=x.device)[None, :] < lengths[:, None])[:, :, None]
    return out * valid


class LAAT(nn.Module):
    """LAAT. forward(tokens [B, n] int64, lengths [B] int64 or None) → MARNOutput (icd_logits [B, L])."""

    ccs_head = None  # no auxiliary head (the trainer and evaluation ask)

    def __init__(self, config: LAATConfig, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, LAATConfig):
            raise ValueError(f"config: expected a LAATConfig, got {type(config).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        config.validate()
        self.config, self.backend = config, backend
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.embedding.weight.requires_grad_(not config.freeze_embeddings)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, batch_first=True, bidirectional=True)
        self.icd_head = LabelWiseAttention(config.feature_size, config.num_icd, style="laat", d_a=config.d_a,
                                           mask=config.attention_mask)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def set_embeddings(self, matrix, normalize: bool = False) -> None:
        """Copy a [vocab_size, embed_dim] matrix (e.g. word2vec) into the embedding; normalize=True
        L2-normalises every non-zero row."""
        copy_embeddings(self.embedding, matrix, normalize)

    @classmethod
    def from_pretrained(cls, config: LAATConfig, embeddings, normalize: bool = True, **kwargs) -> "LAAT":
        """A model whose embedding is `embeddings` [vocab_size, embed_dim] (rows L2-normalised)."""
        model = cls(config, **kwargs)
        model.set_embeddings(embeddings, normalize=normalize)
        return model

    def check_inputs(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
        check_tokens(tokens, lengths, self.config.vocab_size, self.config.max_length)

    # ----------------------------------------------------------------- the steps
    def _bilstm(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if self.backend == "reference" or x.is_cuda:
            return packed_bilstm(self.lstm, x, lengths)
        return split_bilstm(self.lstm, x, lengths)

    def _head_logits(self, head: LabelWiseAttention, features: torch.Tensor,
                     lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if self.backend == "reference":
            return head.reference_logits(features, lengths)
        return head(features, lengths)

    # ----------------------------------------------------------------- public API
    def encode(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The BiLSTM states H [B, n, C] (zero past each length)."""
        self.check_inputs(tokens, lengths)
        return self._bilstm(self.dropout(self.embedding(tokens)), lengths)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> MARNOutput:
        features = self.encode(tokens, lengths)
        return MARNOutput(icd_logits=self._head_logits(self.icd_head, features, lengths))

    def compute_loss(self, output: MARNOutput, icd_targets: torch.Tensor,
                     ccs_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar loss of the ICD logits: BCE (mean over B×L) or the focal loss of the config."""
        if not isinstance(output, MARNOutput):
            raise ValueError(f"output: expected a MARNOutput, got {type(output).__name__}")
        if ccs_targets is not None:
            raise ValueError("ccs_targets: given, but LAAT has no auxiliary (CCS) head; pass None")
        check_targets("icd_targets", icd_targets, output.icd_logits.shape)
        cfg, logits = self.config, output.icd_logits
        if cfg.loss == "bce":
            return bce_loss(logits, icd_targets)
        if self.backend == "reference":
            return reference_focal_loss(logits, icd_targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                        balanced=cfg.focal_balanced)
        impl = "auto" if self.backend == "auto" else focal_default(logits)
        return focal_loss(logits, icd_targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                          balanced=cfg.focal_balanced, impl=impl)

    def evidence_topk(self, features: torch.Tensor, labels: torch.Tensor, k: int,
                      lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The k tokens of largest ICD attention weight for chosen labels ([B, K] or [K] int64):
        (indices [B, K, k], weights [B, K, k]); see `LabelWiseAttention.topk`."""
        return self.icd_head.topk(features, labels, k, lengths)
