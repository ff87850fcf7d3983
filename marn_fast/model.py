"""`marn_fast.MARN`: the drop-in MARN that runs each op on its fastest available path.

Same constructor arguments, forward, compute_loss and state_dict keys as
`marn_fast.reference.MARN` (it subclasses it and replaces only the compute steps), so
`load_state_dict` works in both directions.

backend:
  "reference": the plain-PyTorch steps, unchanged.
  "fused":     fused ops (Triton kernels on CUDA; the compiled C++/CUDA extension for RAM; the
               O(n) BiGRU and memory-bounded attention on the CPU). Needs the compiled extension.
  "auto":      "fused" where the extension is available, else "reference" (one warning, never an
               error for lack of a GPU or a build).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import MARNConfig
from .ops import bigru, cpu_extension_available, focal_loss, label_attention, multitask_focal_loss
from .ops.ram import ram_forward
from .reference.model import MARN as ReferenceMARN
from .reference.model import LabelAttentionHead, MARNOutput

BACKENDS = ("auto", "fused", "reference")


class MARN(ReferenceMARN):
    """MARN with a selectable backend; see the module docstring."""

    def __init__(self, config: MARNConfig, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        super().__init__(config)
        if backend == "fused" and not cpu_extension_available():
            raise ValueError("backend='fused' needs the compiled extension marn_fast._C; reinstall with "
                             "`pip install --no-build-isolation .`, or use backend='auto'")
        if backend == "auto":
            backend = "fused" if cpu_extension_available() else "reference"
        self.backend = backend

    @property
    def fused(self) -> bool:
        return self.backend == "fused"

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def _encode_tokens(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.fused or self.config.encoder != "bigru":
            return super()._encode_tokens(x, lengths)
        return bigru(x, lengths, self.encoder._flat_weights)

    def _recalibrate(self, h: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super()._recalibrate(h)
        return ram_forward(self.ram, h.transpose(1, 2)).transpose(1, 2)

    def _head_logits(self, head: LabelAttentionHead, features: torch.Tensor,
                     lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.fused:
            return super()._head_logits(head, features, lengths)
        return label_attention(features, head.U.weight, head.final.weight, head.final.bias, lengths)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not self.fused or cfg.loss != "focal":
            return super()._loss(logits, targets)
        return focal_loss(logits, targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                          balanced=cfg.focal_balanced)

    def _multitask_loss(self, output: MARNOutput, icd_targets: torch.Tensor,
                        ccs_targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not self.fused or cfg.loss != "focal":
            return super()._multitask_loss(output, icd_targets, ccs_targets)
        return multitask_focal_loss(output.icd_logits, icd_targets, output.ccs_logits, ccs_targets,
                                    lambda_icd=cfg.lambda_icd, lambda_ccs=cfg.lambda_ccs,
                                    alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, balanced=cfg.focal_balanced)
