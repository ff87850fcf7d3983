"""manifest.json: what a result needs so it can be reproduced and trusted later — the resolved
config, preprocessing and truncation, label spaces, seeds, package versions, commit, device,
dtype, backend, and the implementation each op ran per shape bucket (the measured dispatch)."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..data import MIN_DOC_FREQ
from ..ops import dispatch
from .precision import precision_record

if TYPE_CHECKING:
    from ..model import MARN
    from .experiment import DataSettings, Experiment
    from .trainer import TrainConfig


def package_version(package: str) -> Optional[str]:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(source_dir: Optional[str | Path] = None) -> Optional[str]:
    """The commit of the marn_fast source tree (or of `source_dir`), when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=source_dir or Path(__file__).resolve().parents[2])
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(source_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Package versions, device, git commit (of marn_fast's tree, or of `source_dir`: a
    benchmark's checkout when marn_fast is installed elsewhere) and the date."""
    cuda = torch.cuda.is_available()
    return {
        "versions": {"marn_fast": package_version("marn_fast"), "torch": torch.__version__,
                     "triton": package_version("triton"), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if cuda else None, "numpy": package_version("numpy"),
                     "gensim": package_version("gensim"), "python": platform.python_version()},
        "device": (torch.cuda.get_device_name() if cuda
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "commit": git_commit(source_dir),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _top50(experiment):
    """The top-50 codes and their source (setting "50"), else None."""
    stats = getattr(getattr(experiment, "corpus", None), "stats", None)
    return stats.get("top50") if isinstance(stats, dict) else None


def run_manifest(model: "MARN", settings: "DataSettings", train_config: "TrainConfig", experiment: "Experiment",
                 config_file: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """manifest.json of a train run; `config_file` records the config file the run applied (its
    name, path, whether it is a shipped recipe, how it was chosen, its values and the flags that
    overrode them), or None when it ran on flags and the package defaults alone."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = precision_record(train_config.precision, device)
    return {
        "config_file": config_file,
        "model": model.config.to_dict(), "backend": model.backend, "dispatch": dispatch.choices(),
        "dtype": record["dtype"], "precision": record,
        "train": asdict(train_config), "seeds": {"train": train_config.seed, "data": settings.seed},
        "data": asdict(settings),
        "preprocessing": {"tokenizer": "CAML: \\w+ tokens, lower-cased, purely numeric tokens dropped",
                          "min_doc_freq": settings.min_doc_freq, "default_min_doc_freq": MIN_DOC_FREQ,
                          "max_length": settings.max_length,
                          "truncated_documents": {k: v.stats["truncated"] for k, v in experiment.datasets.items()},
                          "tokens_dropped": {k: v.stats["tokens_dropped"] for k, v in experiment.datasets.items()}},
        "label_spaces": {"icd": {"size": len(experiment.icd_space),
                                 "source": "train+dev+test" if settings.label_union else "train",
                                 "top50": _top50(experiment)},
                         "ccs": {"size": experiment.num_ccs, "mode": settings.ccs}},
        **environment(),
    }


def _device_of(model: "MARN") -> torch.device:
    return next(model.parameters()).device


def evaluation_manifest(checkpoint: str | Path, payload: dict[str, Any], model: "MARN", settings: "DataSettings",
                        experiment: "Experiment", split: str, threshold: float,
                        threshold_source: str, precision: str = "auto") -> dict:
    """manifest.json of `marn-fast evaluate`: the checkpoint and its config, the data settings, the
    label-space and vocabulary sizes, the threshold and where it came from, and the environment."""
    return {
        "kind": "evaluate", "checkpoint": str(Path(checkpoint).resolve()), "model": model.config.to_dict(),
        "backend": model.backend, "dispatch": dispatch.choices(), "split": split,
        "dtype": precision_record(precision, _device_of(model))["dtype"],
        "precision": precision_record(precision, _device_of(model)),
        "threshold": threshold, "threshold_source": threshold_source,
        "trained_with": {"data": payload.get("data"), "train": (payload.get("train") or {}).get("train_config")},
        "data": asdict(settings),
        "label_spaces": {"icd": {"size": len(experiment.icd_space), "top50": _top50(experiment)},
                         "ccs": {"size": experiment.num_ccs, "mode": settings.ccs}},
        "vocabulary": {"size": len(experiment.vocab), "min_doc_freq": settings.min_doc_freq},
        "documents": {k: len(v) for k, v in experiment.datasets.items()},
        "truncated_documents": {k: v.stats["truncated"] for k, v in experiment.datasets.items()},
        **environment(),
    }


def manifest_path(metrics_path: str | Path) -> Path:
    """Where the manifest of a metrics file goes: `eval/test.json` → `eval/test.manifest.json`
    (beside it; never over a train run's manifest.json)."""
    path = Path(metrics_path)
    return path.with_name(f"{path.stem}.manifest.json")
