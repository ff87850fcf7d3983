"""Checkpoints: weights, config, vocabulary, label maps and training state in one file.

A checkpoint is a dict:
    format, config (the model config's dict: MARNConfig's, or LAATConfig's with "model": "laat"),
    model (state_dict), vocab (list of words, id order),
    icd_labels, ccs_labels (lists of code strings), data (dict describing the data source),
    train (optimizer state, RNG states, epoch, early-stopping state, history) — optional.

Writing (`save_checkpoint`): the payload is serialised in memory, written to a temporary file in
the destination folder, fsynced and moved into place with `os.replace` (`marn_fast.files.atomic_path`).
A crash or SIGKILL at any point leaves the previous file or the new one under the final name,
never a mix; a full disk (ENOSPC) or any other write error raises OSError naming the file, and
the previous file stays as it was.

Reading (`load_checkpoint`, `load_model`, `load_weights`): `torch.load(weights_only=True)`, so only
tensors and plain Python containers, never arbitrary pickle. Every unusable file (missing,
empty, truncated, not a torch file, foreign, another format, weights that do not fit the config,
another model config or data than expected) raises `CheckpointError`, a ValueError whose message
is one line naming the file and the problem (the CLI prints it and exits with code 2).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Optional

import torch

from ..config import LAATConfig, ModelConfig, config_from_dict
from ..files import atomic_path
from ..laat import LAAT
from ..model import MARN

FORMAT = "marn_fast.checkpoint/1"
REQUIRED_KEYS = ("format", "config", "model", "vocab", "icd_labels", "ccs_labels")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""

    def __init__(self, path, problem: str) -> None:
        super().__init__(f"checkpoint {path}: {problem}")


def one_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened: torch's messages run over many lines."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_checkpoint(path, payload: dict) -> Path:
    """Write `payload` (with FORMAT added) to `path` atomically and durably (see the module doc)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    existed = path.is_file()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
    except OSError as exc:
        kept = f"the previous {path.name} is unchanged" if existed else "nothing was written"
        raise OSError(exc.errno, f"checkpoint: cannot write {path} ({exc.strerror or one_line(exc)}); {kept}") from exc
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint and check its structure (CheckpointError if
    it is not one; FileNotFoundError if there is no file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a folder; give a checkpoint file (best.pt or last.pt of a run)")
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if not head:
        raise CheckpointError(path, "empty file (0 bytes)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if head == _ZIP_MAGIC:
            problem = ("holds Python objects other than tensors and containers, which are not loaded "
                       f"(weights_only); not a marn_fast checkpoint ({one_line(exc, 100)})")
        else:
            problem = f"not a torch checkpoint file ({one_line(exc, 100)})"
        raise CheckpointError(path, problem) from exc
    except Exception as exc:  # a truncated or damaged archive, or bytes torch cannot parse
        kind = "truncated or damaged torch file" if head == _ZIP_MAGIC else "not a torch checkpoint file"
        raise CheckpointError(path, f"{kind}, {path.stat().st_size} bytes ({one_line(exc, 100)})") from exc
    _check_structure(path, payload)
    return payload


def _check_structure(path: Path, payload) -> None:
    if not isinstance(payload, dict):
        raise CheckpointError(path, f"not a marn_fast checkpoint: it holds a {type(payload).__name__}, not a dict")
    if "format" not in payload:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise CheckpointError(path, f"a bare state_dict ({len(payload)} tensors), not a marn_fast checkpoint; "
                                        "the official MARN code's are converted by `marn-fast import-official`")
        keys = sorted(map(str, payload))[:6]
        raise CheckpointError(path, f"not a marn_fast checkpoint (no 'format' key; keys {keys})")
    if payload["format"] != FORMAT:
        raise CheckpointError(path, f"format {payload['format']!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(path, f"incomplete {FORMAT} file: missing keys {missing}")
    for key in ("config", "model"):
        if not isinstance(payload[key], dict):
            raise CheckpointError(path, f"'{key}' is a {type(payload[key]).__name__}, expected a dict")
    for key in ("vocab", "icd_labels", "ccs_labels"):
        if not isinstance(payload[key], (list, tuple)) or not all(isinstance(v, str) for v in payload[key]):
            raise CheckpointError(path, f"'{key}' must be a list of strings")


def checkpoint_config(payload: dict, path) -> ModelConfig:
    """The model config stored in a checkpoint (MARNConfig, or LAATConfig for "model": "laat"),
    checked against its vocabulary and label lists."""
    try:
        config = config_from_dict(dict(payload["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"its model config is not valid ({one_line(exc)})") from exc
    sizes = {"vocab": (len(payload["vocab"]) + 2, config.vocab_size, "vocab_size (words + PAD + UNK)"),
             "icd_labels": (len(payload["icd_labels"]), config.num_icd, "num_icd")}
    if config.num_ccs:
        sizes["ccs_labels"] = (len(payload["ccs_labels"]), config.num_ccs, "num_ccs")
    for key, (have, want, what) in sizes.items():
        if have != want:
            raise CheckpointError(path, f"'{key}' gives {have} but the config's {what} is {want}")
    return config


def _config_difference(ours: ModelConfig, theirs: ModelConfig) -> str:
    if type(ours) is not type(theirs):
        return f"model {type(ours).__name__} here vs {type(theirs).__name__} in the checkpoint"
    a, b = ours.to_dict(), theirs.to_dict()
    return ", ".join(f"{k} {a[k]!r} here vs {b[k]!r} in the checkpoint" for k in a if a[k] != b.get(k))


def load_weights(model: torch.nn.Module, payload: dict, path) -> None:
    """Copy a checkpoint's weights into `model` after checking that it was built with the same
    model config (CheckpointError naming the differing fields, or the first weight that does not fit)."""
    stored = checkpoint_config(payload, path)
    difference = _config_difference(model.config, stored)
    if difference:
        raise CheckpointError(path, f"written for another model config: {difference}")
    state = payload["model"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(path, f"its weights do not fit its config: {len(missing)} missing (e.g. {missing[:3]}), "
                                    f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(path, f"weight {key} has shape {shape}, its config needs "
                                        f"{tuple(expected[key].shape)}")
    model.load_state_dict(state)


def model_from_config(config: ModelConfig, backend: str = "auto") -> torch.nn.Module:
    """The model a config describes: `marn_fast.LAAT` for a LAATConfig, else `marn_fast.MARN`."""
    return LAAT(config, backend=backend) if isinstance(config, LAATConfig) else MARN(config, backend=backend)


def load_model(path, backend: str = "auto", config: Optional[ModelConfig] = None,
               map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint was written for (`marn_fast.MARN`, or `marn_fast.LAAT` when its config
    says "model": "laat") with its weights, and the checkpoint (for its vocabulary and labels).
    With `config`, the checkpoint must have been written for that config."""
    payload = load_checkpoint(path, map_location=map_location)
    stored = checkpoint_config(payload, path)
    if config is not None and _config_difference(config, stored):
        raise CheckpointError(path, f"written for another model config: {_config_difference(config, stored)}")
    model = model_from_config(stored, backend=backend)
    load_weights(model, payload, path)
    return model, payload
