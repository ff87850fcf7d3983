"""`marn_fast.MARN`: the drop-in MARN that runs each op on its fastest implementation.

Same constructor arguments, forward, compute_loss and state_dict keys as
`marn_fast.reference.MARN` (it subclasses it and replaces only the compute steps), so
`load_state_dict` works in both directions.

backend:
  "auto":      each op (BiGRU, RAM, label attention, focal loss) with impl="auto": the measured
               dispatcher (`marn_fast.ops.dispatch`) runs, per op and shape bucket, the candidate
               it timed fastest at these shapes among those within the memory budget (the
               reference among them), from a shipped table, the user's cache (entries measured
               with this setup) or a measurement on the first call; never an error for lack of a
               GPU or a build (candidates that cannot run are not timed).
  "fused":     each op's static fused default (`default_impl`: Triton kernels on CUDA, the
               compiled C++/CUDA extension for the RAM, the O(n) BiGRU and memory-bounded
               attention on the CPU), no measurement. Needs the compiled extension.
  "reference": the plain-PyTorch steps, unchanged.
The implementations each op ran are in `marn_fast.ops.dispatch.choices()` (and in every run's
manifest.json).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, cast

import torch

from .config import MARNConfig
from .ops import cpu_extension_available
from .ops.bigru import bigru
from .ops.bigru import default_impl as bigru_default
from .ops.focal_loss import default_impl as focal_default
from .ops.focal_loss import focal_loss, multitask_focal_loss
from .ops.label_attention import default_impl as attention_default
from .ops.label_attention import label_attention, label_attention_topk
from .ops.ram import default_impl as ram_default
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
        self.backend = backend

    @property
    def measured(self) -> bool:
        return self.backend == "auto"

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def _encode_tokens(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if self.backend == "reference" or self.config.encoder != "bigru":
            return super()._encode_tokens(x, lengths)
        weights = cast(List[torch.Tensor], self.encoder._flat_weights)
        impl = "auto" if self.measured else bigru_default(x, lengths)
        return bigru(x, lengths, weights, impl)

    def _recalibrate(self, h: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return super()._recalibrate(h)
        ram = self.ram
        assert ram is not None, "called only when the model has a RAM"
        h = h.transpose(1, 2)
        impl = "auto" if self.measured else ram_default(ram, h)
        return ram_forward(ram, h, impl).transpose(1, 2)

    def _head_logits(self, head: LabelAttentionHead, features: torch.Tensor,
                     lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if self.backend == "reference":
            return super()._head_logits(head, features, lengths)
        impl = "auto" if self.measured else attention_default(features)
        return label_attention(features, head.U.weight, head.final.weight, head.final.bias, lengths, impl=impl)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.backend == "reference" or cfg.loss != "focal":
            return super()._loss(logits, targets)
        impl = "auto" if self.measured else focal_default(logits)
        return focal_loss(logits, targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, balanced=cfg.focal_balanced,
                          impl=impl)

    def _multitask_loss(self, output: MARNOutput, icd_targets: torch.Tensor,
                        ccs_targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.backend == "reference" or cfg.loss != "focal":
            return super()._multitask_loss(output, icd_targets, ccs_targets)
        assert output.ccs_logits is not None, "called only with the CCS branch"
        impl = "auto" if self.measured else focal_default(output.icd_logits)
        return multitask_focal_loss(output.icd_logits, icd_targets, output.ccs_logits, ccs_targets,
                                    lambda_icd=cfg.lambda_icd, lambda_ccs=cfg.lambda_ccs, impl=impl,
                                    alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, balanced=cfg.focal_balanced)

    def evidence_topk(self, features: torch.Tensor, labels: torch.Tensor, k: int,
                      lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The k tokens of largest ICD attention weight for chosen labels ([B, K] or [K] int64) in
        features O from `encode`: (indices [B, K, k], weights [B, K, k]); `label_attention_topk`."""
        return label_attention_topk(features, self.icd_head.U.weight, labels, k, lengths)
