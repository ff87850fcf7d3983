"""Checkpoints: weights, config, vocabulary, label maps and training state in one file.

Written atomically (temporary file in the same folder, then os.replace) and read with
`torch.load(weights_only=True)`: only tensors and plain Python containers, never arbitrary
pickle. A checkpoint is a dict:
    format, config (MARNConfig dict), model (state_dict), vocab (list of words, id order),
    icd_labels, ccs_labels (lists of code strings), data (dict describing the data source),
    train (optimizer state, RNG states, epoch, early-stopping state, history) — optional.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data._io import atomic_path

FORMAT = "marn_fast.checkpoint/1"
REQUIRED_KEYS = ("format", "config", "model", "vocab", "icd_labels", "ccs_labels")


def save_checkpoint(path, payload: dict) -> Path:
    """Write `payload` (with FORMAT added) to `path` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint (weights_only: tensors and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated file, or pickle that weights_only refuses
        raise ValueError(f"checkpoint: {path} is not a readable marn_fast checkpoint ({exc})") from exc
    missing = [k for k in REQUIRED_KEYS if k not in payload] if isinstance(payload, dict) else list(REQUIRED_KEYS)
    if missing or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a {FORMAT} file (missing keys {missing})")
    return payload
