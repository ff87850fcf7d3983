"""Fused ops: one module per op holding its entry point, checks, registration and dispatch.

Each has a plain-PyTorch twin in `marn_fast.reference` that the tests compare against.
"""
from ._extension import cpu_extension_available, cuda_extension_available
from .bigru import bigru
from .focal_loss import focal_loss, multitask_focal_loss
from .label_attention import label_attention, label_attention_topk, label_attention_with_lse
from .mul_tanh import mul_tanh

__all__ = ["bigru", "cpu_extension_available", "cuda_extension_available", "focal_loss",
           "label_attention", "label_attention_topk", "label_attention_with_lse", "multitask_focal_loss",
           "mul_tanh"]
