"""One training run end to end: data → MARN (or LAAT) → early-stopped training → best checkpoint →
dev threshold tuning → test metrics → report folder (used by `marn-fast train` and `demo`)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import metrics
from ..config import LAATConfig, MARNConfig, ModelConfig
from .alarms import degenerate_run_warnings
from .checkpoint import model_from_config
from .distributed import is_main_process
from .experiment import DataSettings, Experiment
from .manifest import run_manifest
from .report import comparison_table, plot_frequency_buckets, plot_history, write_json
from .trainer import BEST_CHECKPOINT, LAST_CHECKPOINT, TrainConfig, Trainer, epoch_line, evaluate_result, predict_loader

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"


def model_config(exp: Experiment, model_options: dict) -> ModelConfig:
    """The model config of a run: LAATConfig for model_options["model"] == "laat", else MARNConfig,
    sized for the experiment's vocabulary and label spaces."""
    options = dict(model_options)
    model = options.pop("model", "marn")
    no_mtl = options.pop("no_mtl", False)
    sizes = dict(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), max_length=exp.settings.max_length)
    if model == "laat":
        return LAATConfig(**sizes, **options)
    return MARNConfig(**sizes, num_ccs=0 if no_mtl else exp.num_ccs, **options)


def build_model(exp: Experiment, model_options: dict, backend: str, cache_dir: Optional[Path]) -> torch.nn.Module:
    """The run's model (MARN, or LAAT for model_options["model"] == "laat") sized for the
    experiment, word2vec embedding loaded."""
    model = model_from_config(model_config(exp, model_options), backend=backend)
    model.set_embeddings(exp.word2vec(cache_dir), normalize=False)
    return model


def train_and_report(settings: DataSettings, model_options: dict, train_config: TrainConfig, out_dir,
                     backend: str = "auto", resume: bool = False,
                     log: Optional[Callable[[str], None]] = None, codiesp_options: Optional[dict] = None,
                     config_file: Optional[dict] = None) -> dict:
    """Train, pick the best dev epoch, tune the threshold on dev, score test; write the report.

    CodiEsp data (settings.source "codiesp") adds a "codiesp" section: the track's MAP, the
    TF-IDF baseline and the evidence scores (training/codiesp.py; `codiesp_options` are its
    keyword options, e.g. baseline=False, evidence_k=5). `config_file`: the record of the config file
    the run applied (marn_fast.config_files.apply_config), kept in manifest.json.
    Returns the report dict (also written to out_dir/metrics.json)."""
    out_dir = Path(out_dir)
    log = log or (lambda line: print(line, flush=True))
    started = time.perf_counter()
    torch.manual_seed(train_config.seed)
    exp = Experiment(settings)
    log(f"data: {exp.summary()}")
    model = build_model(exp, model_options, backend, cache_dir=out_dir / "cache")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {type(model).__name__} backend={model.backend}, C={model.config.feature_size}, "
        f"L_icd={model.config.num_icd}, L_ccs={model.config.num_ccs}, {trainable:,} trainable parameters")
    if is_main_process():
        write_json(out_dir / CONFIG_FILE, {"model": model.config.to_dict(), "data": asdict(settings),
                                            "train": asdict(train_config), "backend": model.backend})

    def on_epoch_end(record: dict) -> None:
        log(epoch_line(record, train_config))

    if resume and not (out_dir / LAST_CHECKPOINT).is_file():
        log(f"resume: no {out_dir / LAST_CHECKPOINT} yet (killed before the first epoch ended?); starting from epoch 1")
        resume = False
    trainer = Trainer(model, train_config, out_dir, exp.metadata(), on_epoch_end=on_epoch_end, log=log)
    state = trainer.fit(exp.loader("train"), exp.loader("dev"), resume=resume)
    trainer.load_best()
    dev = predict_loader(trainer.wrapped, exp.loader("dev"), trainer.device, train_config.precision)
    test = predict_loader(trainer.wrapped, exp.loader("test"), trainer.device, train_config.precision)
    if not is_main_process():
        return {}
    threshold = metrics.tune_threshold(dev.icd_scores, dev.icd_targets)
    counts = np.array([exp.train_code_counts.get(code, 0) for code in exp.icd_space.codes], dtype=np.int64)
    alarms = (degenerate_run_warnings(test.icd_scores, test.icd_targets, train_config.threshold, counts)
              + degenerate_run_warnings(test.icd_scores, test.icd_targets, threshold, tuned=True))
    for message in alarms:
        log(f"WARNING: degenerate run: {message}")
    report = {
        "warnings": alarms,
        "best_epoch": state.best_epoch + 1, "epochs_run": state.epoch + 1,
        "dev_" + train_config.metric: state.best_metric,
        "test": evaluate_result(test, train_config.threshold),
        "tuned_threshold": threshold,
        "test_at_tuned_threshold": metrics.evaluate(test.icd_scores, test.icd_targets, threshold=threshold),
        "frequency_buckets": metrics.frequency_buckets(counts, test.icd_scores, test.icd_targets,
                                                       threshold=train_config.threshold),
        "history": state.history, "data": exp.summary(), "backend": model.backend,
        "checkpoint": str(out_dir / BEST_CHECKPOINT), "seconds": time.perf_counter() - started,
    }
    if settings.source == "codiesp":
        from .codiesp import codiesp_report

        report["codiesp"] = codiesp_report(exp, trainer.model, test, threshold, trainer.device, log=log,
                                           **(codiesp_options or {}))
        report["seconds"] = time.perf_counter() - started
    write_json(out_dir / METRICS_FILE, report)
    write_json(out_dir / MANIFEST_FILE, run_manifest(model, settings, train_config, exp, config_file=config_file))
    plot_history(state.history, out_dir / "loss_curve.png")
    plot_frequency_buckets(report["frequency_buckets"], out_dir / "f1_by_frequency.png")
    if settings.source != "codiesp":  # the MIMIC-III paper numbers mean nothing next to CodiEsp
        log("\n" + comparison_table(report["test"], settings.setting, title=f"test @{train_config.threshold}"))
    return report
