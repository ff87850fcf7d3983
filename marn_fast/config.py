"""MARNConfig: the one source of truth for MARN's hyper-parameters and defaults.

Defaults follow the official MARN code (VRCMF/MARN), which produced the published numbers;
the paper's forms are options (docs/model.md, "Where the paper and the official code differ").
Recipes that change the defaults for one dataset are the shipped configs (configs/*.yaml).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

LOSS_FORMS = ("focal", "bce")
ENCODERS = ("bigru", "cnn", "multirescnn")


@dataclass
class MARNConfig:
    """Hyper-parameters of a MARN model.

    vocab_size: embedding rows; id 0 is PAD (and 1 UNK by the data module's convention).
    num_icd: ICD codes (L_icd). num_ccs: CCS codes (L_ccs); 0 disables the CCS branch ("w/o MTL").
    embed_dim: d_e. hidden_size: d_r, per GRU direction, so H has C = 2·d_r features.
    dropout: applied after the embedding and after the RAM output.
    use_ram: the Recalibrated Aggregation Module ("w/o RAM" when False).
    ram_output_tanh: O = tanh(up2(U1) ⊙ H) as the official code (True) or O = up2(U1) ⊙ H as
        the paper's eq. 11 (False).
    loss: "focal" or "bce". focal_alpha (α), focal_gamma (γ). focal_balanced: False is the
        official α·(1−p_t)^γ·BCE; True is the paper's eq. 16 (α for positives, 1−α for negatives).
    lambda_icd, lambda_ccs: λ_d, λ_s of eq. 17.
    max_length: tokens kept per document (the data module truncates and counts).
    freeze_embeddings: keep the word2vec embedding fixed during training.
    encoder: the base model: "bigru" (MARN), or "cnn" (CAML: one conv of `filter_size` with
        `num_filter_maps` filters) or "multirescnn" (one residual channel per size in
        `multirescnn_filter_sizes`), the paper's Fig. 7 variants with MARN's blocks on top.
    """

    vocab_size: int
    num_icd: int
    num_ccs: int = 0
    embed_dim: int = 100
    hidden_size: int = 300
    dropout: float = 0.2
    use_ram: bool = True
    ram_output_tanh: bool = True
    loss: str = "focal"
    focal_alpha: float = 0.999
    focal_gamma: float = 2.0
    focal_balanced: bool = False
    lambda_icd: float = 0.7
    lambda_ccs: float = 0.3
    max_length: int = 4000
    freeze_embeddings: bool = True
    encoder: str = "bigru"
    num_filter_maps: int = 50
    filter_size: int = 10
    multirescnn_filter_sizes: tuple[int, ...] = (3, 5, 9, 15, 19, 25)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"MARNConfig: {msg}")

        for name in ("vocab_size", "num_icd", "num_ccs", "embed_dim", "hidden_size", "max_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an int, got {type(value).__name__} {value!r}")
        need(self.vocab_size >= 2, f"vocab_size must be >= 2 (PAD and at least one word), got {self.vocab_size}")
        need(self.num_icd >= 1, f"num_icd must be >= 1, got {self.num_icd}")
        need(self.num_ccs >= 0, f"num_ccs must be >= 0 (0 disables the CCS branch), got {self.num_ccs}")
        need(self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}")
        need(self.hidden_size >= 1, f"hidden_size must be >= 1, got {self.hidden_size}")
        need(self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        need(isinstance(self.num_filter_maps, int) and self.num_filter_maps >= 1,
             f"num_filter_maps must be an int >= 1, got {self.num_filter_maps!r}")
        need(isinstance(self.filter_size, int) and self.filter_size >= 1,
             f"filter_size must be an int >= 1, got {self.filter_size!r}")
        self.multirescnn_filter_sizes = tuple(self.multirescnn_filter_sizes)
        need(len(self.multirescnn_filter_sizes) >= 1 and all(isinstance(k, int) and k >= 1 and k % 2 == 1
                                                             for k in self.multirescnn_filter_sizes),
             f"multirescnn_filter_sizes must be odd ints >= 1, got {self.multirescnn_filter_sizes!r}")
        if self.use_ram:
            need(self.feature_size >= 4, f"use_ram=True needs C >= 4 features (RAM channels C, C/2, C/4), "
                                         f"got C={self.feature_size}")
        need(self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.loss in LOSS_FORMS, f"loss must be one of {LOSS_FORMS}, got {self.loss!r}")
        need(0.0 <= self.focal_alpha <= 1.0, f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        need(self.focal_gamma >= 0.0, f"focal_gamma must be >= 0, got {self.focal_gamma}")
        need(self.lambda_icd >= 0.0 and self.lambda_ccs >= 0.0,
             f"lambda_icd and lambda_ccs must be >= 0, got {self.lambda_icd}, {self.lambda_ccs}")
        for name in ("use_ram", "ram_output_tanh", "focal_balanced", "freeze_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def feature_size(self) -> int:
        """C, the width of H and O: 2·d_r for the BiGRU, the filter maps of the CNN encoders."""
        if self.encoder == "cnn":
            return self.num_filter_maps
        if self.encoder == "multirescnn":
            return len(self.multirescnn_filter_sizes) * self.num_filter_maps
        return 2 * self.hidden_size

    @property
    def ram_channels(self) -> tuple[int, int, int]:
        """RAM channel counts (C, C//2, C//4): 600, 300, 150 at the official h = 300."""
        c = self.feature_size
        return c, c // 2, c // 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MARNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MARNConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
