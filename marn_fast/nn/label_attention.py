"""`LabelWiseAttention`: the label-wise attention head of MARN, CAML, LAAT/JointLAAT and PLM-ICD.

features H [B, n, C] (any encoder's token states), lengths [B] int64 or None → logits [B, L]
(fp32; fp64 for fp64 features). With values O = H, per document and label l:
    a_l = softmax_t(q_l·k_t),   logit_l = w_l·Σ_t a_lt o_t + b_l
style "marn" and "caml": keys K = H (d_k = C); the queries Q = U.weight [L, C], the per-label
    weights W = final.weight [L, C] and b = final.bias [L], the names of MARN's
    `LabelAttentionHead` and of CAML's ConvAttnPool (jamesmullenbach/caml-mimic,
    learn/models.py). CAML's U has a bias that its forward never reads: style "caml" keeps it, so
    CAML's state_dict loads as it is. Init: Xavier-uniform U and final weights (both originals).
style "laat": keys K = tanh(H·W_aᵀ) [B, n, d_a]; W_a = first_linears.weight [d_a, C] (no bias),
    Q = second_linears.weight [L, d_a] (no bias), W = third_linears.weight [L, C],
    b = third_linears.bias [L]: LAAT's AttentionLayer (aehrc/LAAT,
    src/models/attentions/attention_layer.py, attention_mode "label"), which PLM-ICD puts on
    RoBERTa token states (d_a = C = 768). d_a=None gives d_a = C, as both originals do when no
    d_a is set. Init: N(0, 0.03) for the three weights, nn.Linear's default for the bias (LAAT's
    `_init_weights`).
mask=True ignores tokens t ≥ lengths[b]; mask=False attends over all n tokens whatever the
lengths, as the official LAAT and PLM-ICD code do (they do not mask padding).

Every style runs the fused op `marn_fast.ops.label_attention` (memory linear in n + L, an online
softmax that cannot overflow): "marn" and "caml" in MARN's form (keys=None), "laat" with
keys=K (computed here, [B, n, d_a]; under autocast in the autocast dtype), each with the
layer's mask.
`reference_logits` is the plain formula for every style (the oracle, which materialises the
[B, L, n] scores); `original_head_state_dict` renames an original checkpoint's head weights to
this module's (docs/model.md has the table).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..ops.label_attention import label_attention, label_attention_topk
from ..reference.checks import FLOAT_DTYPES, check_lengths, check_tensor
from ..reference.label_attention import label_attention as reference_label_attention

STYLES = ("marn", "caml", "laat")
# LAAT's init of W_a, U and the per-label weights: normal(mean 0, std 0.03) (aehrc/LAAT,
# AttentionLayer._init_weights(mean=0.0, std=0.03)).
LAAT_INIT_STD = 0.03

# The heads of the original implementations: source → (style, default prefix of the head's keys in
# the original model's state_dict, {original key after the prefix: this module's key}).
ORIGINAL_HEADS: dict[str, tuple[str, str, dict[str, str]]] = {
    # marn_fast.MARN / marn_fast.reference.MARN: the ICD head (the CCS head: prefix "ccs_head.").
    "marn": ("marn", "icd_head.", {k: k for k in ("U.weight", "final.weight", "final.bias")}),
    # jamesmullenbach/caml-mimic learn/models.py ConvAttnPool: U (its bias unused) and final.
    "caml": ("caml", "", {k: k for k in ("U.weight", "U.bias", "final.weight", "final.bias")}),
    # aehrc/LAAT: RNN(...).attention, an AttentionLayer with one ModuleList entry per label level
    # (".0." is level 0, the only level of joint_mode "flat"; its unused `linear` is not read).
    "laat": ("laat", "attention.", {"first_linears.0.weight": "first_linears.weight",
                                    "second_linears.0.weight": "second_linears.weight",
                                    "third_linears.0.weight": "third_linears.weight",
                                    "third_linears.0.bias": "third_linears.bias"}),
    # MiuLab/PLM-ICD src/modeling_roberta.py, model_mode "laat": first_linear, second_linear,
    # third_linear on the model itself (the MIMIC reproducibility code's LabelAttention uses the
    # same names under prefix "attention.").
    "plm-icd": ("laat", "", {"first_linear.weight": "first_linears.weight",
                             "second_linear.weight": "second_linears.weight",
                             "third_linear.weight": "third_linears.weight",
                             "third_linear.bias": "third_linears.bias"}),
}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


class LabelWiseAttention(nn.Module):
    """Label-wise attention logits over token states; see the module docstring.

    LabelWiseAttention(in_features=C, num_labels=L, style="marn"|"caml"|"laat", d_a=None,
    mask=True); forward(features [B, n, C], lengths [B] int64 or None) → logits [B, L].
    """

    def __init__(self, in_features: int, num_labels: int, style: str = "marn", d_a: Optional[int] = None,
                 mask: bool = True) -> None:
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
        self.in_features = _positive_int("in_features", in_features)
        self.num_labels = _positive_int("num_labels", num_labels)
        if not isinstance(mask, bool):
            raise ValueError(f"mask: expected a bool, got {mask!r}")
        self.style, self.mask = style, mask
        if style == "laat":
            self.d_a = in_features if d_a is None else _positive_int("d_a", d_a)
            self.first_linears = nn.Linear(in_features, self.d_a, bias=False)
            self.second_linears = nn.Linear(self.d_a, num_labels, bias=False)
            self.third_linears = nn.Linear(in_features, num_labels)
            for linear in (self.first_linears, self.second_linears, self.third_linears):
                nn.init.normal_(linear.weight, 0.0, LAAT_INIT_STD)
        else:
            if d_a is not None:
                raise ValueError(f"d_a: style {style!r} has no key projection (keys are the features); "
                                 f"d_a applies to style 'laat' only, got d_a={d_a!r}")
            self.d_a = in_features
            self.U = nn.Linear(in_features, num_labels, bias=style == "caml")
            self.final = nn.Linear(in_features, num_labels)
            nn.init.xavier_uniform_(self.U.weight)
            nn.init.xavier_uniform_(self.final.weight)

    @classmethod
    def from_original(cls, state_dict: Mapping[str, Tensor], source: str, prefix: Optional[str] = None,
                      mask: bool = True) -> "LabelWiseAttention":
        """A head sized and loaded from an original model's state_dict (`ORIGINAL_HEADS[source]`;
        prefix: where the head's keys start, default the original's). mask=False reproduces the
        logits of LAAT and PLM-ICD, which do not mask padding."""
        style = ORIGINAL_HEADS[source][0] if source in ORIGINAL_HEADS else None
        state = original_head_state_dict(state_dict, source, prefix)
        if style == "laat":
            d_a, c = state["first_linears.weight"].shape
            head = cls(c, state["second_linears.weight"].shape[0], style="laat", d_a=d_a, mask=mask)
        else:
            num_labels, c = state["U.weight"].shape
            head = cls(c, num_labels, style=str(style), mask=mask)
        head.load_state_dict(state)
        return head

    def extra_repr(self) -> str:
        d_a = f", d_a={self.d_a}" if self.style == "laat" else ""
        return (f"in_features={self.in_features}, num_labels={self.num_labels}, style={self.style!r}{d_a}, "
                f"mask={self.mask}")

    # ------------------------------------------------------------------ the parameters by role
    @property
    def queries(self) -> Tensor:
        """Q [L, d_k]: U.weight ("marn", "caml") or second_linears.weight ("laat")."""
        return self.second_linears.weight if self.style == "laat" else self.U.weight

    @property
    def label_weights(self) -> Tensor:
        """W [L, C]: final.weight or third_linears.weight."""
        return self.third_linears.weight if self.style == "laat" else self.final.weight

    @property
    def bias(self) -> Tensor:
        """b [L]: final.bias or third_linears.bias."""
        return self.third_linears.bias if self.style == "laat" else self.final.bias

    def keys(self, features: Tensor) -> Optional[Tensor]:
        """K [B, n, d_a] = tanh(H·W_aᵀ) for style "laat" (W_a in the features' dtype); None for the
        styles whose keys are the features."""
        if self.style != "laat":
            return None
        return torch.tanh(nn.functional.linear(features, self.first_linears.weight.to(features.dtype)))

    # ------------------------------------------------------------------ forward
    def _check(self, features: Tensor, lengths: Optional[Tensor]) -> None:
        check_tensor("features", features, ndim=3, dtypes=FLOAT_DTYPES, expected=f"[B, n, C={self.in_features}] float")
        batch, n, c = features.shape
        if c != self.in_features or batch == 0 or n == 0:
            raise ValueError(f"features: expected a non-empty [B, n, C={self.in_features}] batch (C = in_features), "
                             f"got shape {tuple(features.shape)}")
        if features.device != self.bias.device:
            raise ValueError(f"features: expected device {self.bias.device} (the layer's), got {features.device}")
        check_lengths(lengths, batch, n, features.device)

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """Logits [B, L] (fp32; fp64 for fp64 features); see the module docstring."""
        self._check(features, lengths)
        return label_attention(features, self.queries, self.label_weights, self.bias, lengths,
                               keys=self.keys(features), mask=self.mask)

    def reference_logits(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """The same logits from the plain formula `marn_fast.reference.label_attention` (which
        materialises the scores), every style: the oracle of `forward`."""
        self._check(features, lengths)
        dtype = features.dtype
        logits = reference_label_attention(features, self.queries.to(dtype), self.label_weights.to(dtype),
                                           self.bias.to(dtype), lengths, keys=self.keys(features), mask=self.mask)
        return logits.to(_accumulation_dtype(dtype))

    def topk(self, features: Tensor, labels: Tensor, k: int, lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The k tokens of largest attention weight for chosen labels (labels [B, K] or [K] int64)
        → (indices [B, K, k], weights [B, K, k]); `marn_fast.ops.label_attention_topk` on the keys."""
        self._check(features, lengths)
        return label_attention_topk(features, self.queries, labels, k, lengths, keys=self.keys(features),
                                    mask=self.mask)


def original_head_state_dict(state_dict: Mapping[str, Tensor], source: str,
                             prefix: Optional[str] = None) -> dict[str, Tensor]:
    """The head's weights of an original model's state_dict, renamed to `LabelWiseAttention`'s keys
    (`ORIGINAL_HEADS[source]`; prefix: where the head's keys start, default the original's);
    keys of the rest of the model are not read. ValueError names the keys that are missing."""
    if source not in ORIGINAL_HEADS:
        raise ValueError(f"source: expected one of {tuple(ORIGINAL_HEADS)}, got {source!r}")
    _, default_prefix, names = ORIGINAL_HEADS[source]
    prefix = default_prefix if prefix is None else prefix
    missing = [prefix + key for key in names if prefix + key not in state_dict]
    if missing:
        found = sorted(k for k in state_dict if k.startswith(prefix))[:6]
        raise ValueError(f"state_dict: no {source} head at prefix {prefix!r}: missing {missing} "
                         f"(keys under that prefix: {found or 'none'}); pass prefix= where the head's keys start")
    return {ours: state_dict[prefix + theirs] for theirs, ours in names.items()}


__all__ = ["LAAT_INIT_STD", "ORIGINAL_HEADS", "STYLES", "LabelWiseAttention", "original_head_state_dict"]
