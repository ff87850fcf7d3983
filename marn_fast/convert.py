"""Bringing weights trained with the official MARN code (VRCMF/MARN) into marn_fast.

The official `RNNmodel_MTL` state_dict uses these keys (its non-multitask `RNNmodel` has no RAM
and no `*_ccs` heads):
    word_rep.embed.weight                     [V + 2, d_e]  rows: 0 PAD, 1..V vocabulary file order, V+1 UNK
    encoder.{weight,bias}_{ih,hh}_l0[_reverse] nn.GRU(d_e, d_r, bidirectional=True)
    output_layer.ram.<block>.<i>.*            RAM: the same block/index layout as marn_fast
    output_layer.U.weight, output_layer.U.bias          Q of the ICD head (the bias is never used)
    output_layer.final.weight, output_layer.final.bias  W, b of the ICD head
    output_layer.U_ccs.*, output_layer.final_ccs.*      the CCS head
marn_fast's vocabulary puts UNK at row 1 and the words after it, so the embedding rows are
permuted; everything else is renamed. Shapes that do not fit the config are refused with the key
named, and keys that are not used are reported.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import MARNConfig
from .model import MARN

_RENAMES = (
    ("output_layer.ram.", "ram."),
    ("output_layer.U_ccs.", "ccs_head.U."),
    ("output_layer.final_ccs.", "ccs_head.final."),
    ("output_layer.U.", "icd_head.U."),
    ("output_layer.final.", "icd_head.final."),
    ("encoder.", "encoder."),
)
EMBEDDING_KEY = "word_rep.embed.weight"


def official_embedding_to_ours(weight: torch.Tensor) -> torch.Tensor:
    """Rows [PAD, w_1..w_V, UNK] (official) → [PAD, UNK, w_1..w_V] (marn_fast)."""
    return torch.cat([weight[:1], weight[-1:], weight[1:-1]], dim=0)


def from_official(state_dict: dict, config: MARNConfig, backend: str = "auto",
                  strict: bool = True) -> tuple[MARN, list]:
    """A marn_fast.MARN holding an official checkpoint's weights, and the official keys not used.

    config must describe the official model: vocab_size = V + 2 (the official embedding rows),
    num_icd, num_ccs, embed_dim, hidden_size and use_ram as trained. Raises ValueError when a
    key is missing or a shape does not fit (naming both)."""
    model = MARN(config, backend=backend)
    ours = model.state_dict()
    converted, unused = {}, []
    for key, value in state_dict.items():
        if key == EMBEDDING_KEY:
            converted["embedding.weight"] = official_embedding_to_ours(value)
            continue
        target = next((new + key[len(old):] for old, new in _RENAMES if key.startswith(old)), None)
        if target is None or target not in ours:
            unused.append(key)
            continue
        converted[target] = value
    for key, value in converted.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(f"state_dict: {key} has shape {tuple(value.shape)} but the config expects "
                             f"{tuple(ours[key].shape)} (check vocab_size, num_icd, num_ccs, hidden_size)")
    missing = sorted(set(ours) - set(converted))
    if missing and strict:
        raise ValueError(f"state_dict: the official checkpoint lacks {len(missing)} weights that this config "
                         f"needs, e.g. {missing[:6]} (use_ram={config.use_ram}, num_ccs={config.num_ccs})")
    model.load_state_dict(converted, strict=strict)
    return model, sorted(unused)


def read_lines(path) -> list:
    """One entry per non-empty line (vocabulary words or label codes, in column order), as strings."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def official_config(state_dict: dict, num_icd: int, num_ccs: int, **overrides) -> MARNConfig:
    """A MARNConfig whose sizes are read off an official state_dict."""
    embed = state_dict[EMBEDDING_KEY]
    hidden = state_dict["encoder.weight_hh_l0"].shape[1]
    values = dict(vocab_size=embed.shape[0], num_icd=num_icd, num_ccs=num_ccs, embed_dim=embed.shape[1],
                  hidden_size=hidden, use_ram=any(k.startswith("output_layer.ram.") for k in state_dict))
    values.update(overrides)
    return MARNConfig(**values)


def import_official(checkpoint_path, vocab_path, labels_path, ccs_labels_path: Optional[str] = None,
                    backend: str = "auto") -> tuple[MARN, dict, list]:
    """Load an official checkpoint with its vocabulary and label files; returns (model, metadata, unused)."""
    state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or EMBEDDING_KEY not in state_dict:
        raise ValueError(f"{checkpoint_path}: not an official MARN state_dict (no {EMBEDDING_KEY})")
    words, labels = read_lines(vocab_path), read_lines(labels_path)
    ccs = read_lines(ccs_labels_path) if ccs_labels_path else []
    if len(words) + 2 != state_dict[EMBEDDING_KEY].shape[0]:
        raise ValueError(f"{vocab_path}: {len(words)} words, but the checkpoint's embedding has "
                         f"{state_dict[EMBEDDING_KEY].shape[0]} rows (expected words + PAD + UNK)")
    config = official_config(state_dict, num_icd=len(labels), num_ccs=len(ccs))
    model, unused = from_official(state_dict, config, backend=backend)
    metadata = {"vocab": words, "icd_labels": labels, "ccs_labels": ccs,
                "data": {"source": "official MARN checkpoint", "checkpoint": str(checkpoint_path)}}
    return model, metadata, unused
