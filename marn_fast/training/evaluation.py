"""`marn-fast evaluate`: score a checkpoint on a split, refusing data whose vocabulary or label
space does not match the checkpoint (naming the difference)."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch

from .. import metrics
from .checkpoint import load_model
from .experiment import DataSettings, Experiment
from .manifest import evaluation_manifest, manifest_path
from .report import comparison_table, write_json
from .trainer import evaluate_result, predict_loader


def _difference(name: str, ours: list, theirs: list) -> str:
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    return (f"{name}: the checkpoint has {len(ours)}, the data {len(theirs)}; "
            f"{len(missing)} only in the checkpoint (e.g. {missing[:5]}), {len(extra)} only in the data "
            f"(e.g. {extra[:5]})")


def evaluate_checkpoint(checkpoint, data_dir: Optional[str] = None, split: str = "test",
                        threshold: Optional[float] = None, backend: str = "auto",
                        out: Optional[str] = None, precision: str = "auto") -> dict:
    """Metrics of a checkpoint on `split` (threshold tuned on dev unless given), computed in
    `precision` (training/precision.py)."""
    model, payload = load_model(checkpoint, backend=backend)
    config = model.config
    stored = dict(payload.get("data", {}))
    known = {f.name for f in fields(DataSettings)}
    if not (data_dir or stored.get("data_dir")):
        raise ValueError(f"data_dir: the checkpoint {checkpoint} names no data folder; pass --data-dir")
    settings = DataSettings(**{**{k: v for k, v in stored.items() if k in known},
                               "data_dir": str(data_dir or stored["data_dir"])})
    if config.num_ccs == 0:
        settings.ccs = "none"
    # The vocabulary and label spaces that the data itself yields must be the checkpoint's.
    exp = Experiment(settings)
    pairs = [("ICD labels", list(payload["icd_labels"]), exp.icd_space.codes),
             ("words", list(payload["vocab"]), exp.vocab.itos[2:])]
    if config.num_ccs:
        pairs.append(("CCS labels", list(payload["ccs_labels"]), exp.ccs_space.codes if exp.ccs_space else []))
    for name, ours, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"the data does not match the checkpoint: {_difference(name, ours, theirs)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    threshold_source = "given" if threshold is not None else "tuned on dev"
    if threshold is None:
        dev = predict_loader(model, exp.loader("dev"), device, precision)
        threshold = metrics.tune_threshold(dev.icd_scores, dev.icd_targets)
    result = evaluate_result(predict_loader(model, exp.loader(split), device, precision), threshold)
    report = {"checkpoint": str(checkpoint), "split": split, "threshold": threshold, "metrics": result,
              "table": comparison_table(result, settings.setting, title=f"{split} @{threshold:.3f}")}
    if out:
        write_json(Path(out), {k: v for k, v in report.items() if k != "table"})
        report["manifest"] = str(manifest_path(out))
        write_json(manifest_path(out), evaluation_manifest(checkpoint, payload, model, settings, exp, split,
                                                           threshold, threshold_source, precision))
    return report
