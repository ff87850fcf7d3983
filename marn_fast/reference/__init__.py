"""Plain-PyTorch reference of every fused op and of the whole model (imports torch only)."""
from .bigru import packed_bigru
from .focal_loss import bce_loss, focal_loss, multitask_focal_loss
from .label_attention import attention_weights, label_attention, topk_evidence
from .model import MARN, LabelAttentionHead, MARNOutput
from .ram import RAM

__all__ = ["MARN", "MARNOutput", "LabelAttentionHead", "RAM", "attention_weights", "bce_loss",
           "focal_loss", "label_attention", "multitask_focal_loss", "packed_bigru", "topk_evidence"]
