"""Public layers for other models, usable on any encoder: nn.Modules over `marn_fast.ops`."""
from .label_attention import ORIGINAL_HEADS, STYLES, LabelWiseAttention, original_head_state_dict

__all__ = ["ORIGINAL_HEADS", "STYLES", "LabelWiseAttention", "original_head_state_dict"]
