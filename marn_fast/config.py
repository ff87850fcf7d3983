"""MARNConfig and LAATConfig: the one source of truth for the models' hyper-parameters and defaults.

MARN's defaults follow the official MARN code (VRCMF/MARN), which produced the published numbers;
the paper's forms are options (docs/model.md, "Where the paper and the official code differ").
LAAT's follow the official LAAT code (aehrc/LAAT). Recipes that change the defaults for one dataset
are the shipped configs (configs/*.yaml).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union

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


@dataclass
class LAATConfig:
    """Hyper-parameters of a LAAT model (Vu, Nguyen and Nguyen, IJCAI 2020): word2vec embedding →
    dropout → BiLSTM (u = hidden_size per direction, C = 2u) → LAAT's label-wise attention
    (K = tanh(H·W_aᵀ), d_a = d_a) → ICD logits. No auxiliary (CCS) head: num_ccs is always 0.

    Defaults follow the official code's MIMIC-III recipe (aehrc/LAAT run.sh and readme.md; its
    src/args_parser.py defaults): embedding 100-d word2vec kept frozen (--mode static), dropout
    0.3 on the embedding (--dropout 0.3), d_a = 512 (--d_a 512), documents cut at 4,000 tokens
    (--max_seq_length 4000), BCE loss (--loss BCE), AdamW at lr 1e-3 with batch size 8
    (`LAAT_TRAINING`). hidden_size: u = 256 per direction here; run.sh trains u = 512 on
    MIMIC-III-full (--hidden_size 512). The official code masks no padding in the attention:
    attention_mask=False reproduces it, True (the default) ignores padded tokens.
    loss "focal" uses MARN's focal loss (focal_alpha, focal_gamma, focal_balanced as MARNConfig).
    """

    MODEL: ClassVar[str] = "laat"

    vocab_size: int
    num_icd: int
    embed_dim: int = MARNConfig.embed_dim
    hidden_size: int = 256
    d_a: int = 512
    dropout: float = 0.3
    loss: str = "bce"
    focal_alpha: float = MARNConfig.focal_alpha
    focal_gamma: float = MARNConfig.focal_gamma
    focal_balanced: bool = MARNConfig.focal_balanced
    max_length: int = MARNConfig.max_length
    freeze_embeddings: bool = MARNConfig.freeze_embeddings
    attention_mask: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"LAATConfig: {msg}")

        for name in ("vocab_size", "num_icd", "embed_dim", "hidden_size", "d_a", "max_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
        need(self.vocab_size >= 2, f"vocab_size must be >= 2 (PAD and at least one word), got {self.vocab_size}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.loss in LOSS_FORMS, f"loss must be one of {LOSS_FORMS}, got {self.loss!r}")
        need(0.0 <= self.focal_alpha <= 1.0, f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        need(self.focal_gamma >= 0.0, f"focal_gamma must be >= 0, got {self.focal_gamma}")
        for name in ("focal_balanced", "freeze_embeddings", "attention_mask"):
            need(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def num_ccs(self) -> int:
        """LAAT has no auxiliary head."""
        return 0

    @property
    def feature_size(self) -> int:
        """C = 2u, the width of the BiLSTM's states H."""
        return 2 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """The fields and "model": "laat" (what a checkpoint stores; `config_from_dict` reads it)."""
        return {"model": self.MODEL, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LAATConfig":
        values = {k: v for k, v in values.items() if k != "model"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"LAATConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


# The LAAT paper's training settings that differ from the package's (MARN's) TrainConfig and
# DataSettings defaults, applied by `marn-fast train --model laat` unless a flag or config sets
# them: batch size 8 (aehrc/LAAT run.sh --batch_size 8) and early stopping after 6 epochs without
# a better dev score (run.sh --patience 5; its trainer stops once check_to_stop > patience).
LAAT_TRAINING: dict[str, Any] = {"batch_size": 8, "patience": 6}

MODELS = ("marn", "laat")
ModelConfig = Union[MARNConfig, LAATConfig]


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """The model config a dict describes: LAATConfig when values["model"] is "laat", MARNConfig
    when "marn" or absent (checkpoints written before LAAT carry no "model" key)."""
    model = values.get("model", "marn")
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    if model == "laat":
        return LAATConfig.from_dict(values)
    return MARNConfig.from_dict({k: v for k, v in values.items() if k != "model"})
