"""The MARN trainer: AdamW, gradient clipping, early stopping on a dev metric, best-checkpoint
selection, bit-exact resume, bf16 autocast on CUDA, DistributedDataParallel under torchrun.

Defaults are the official recipe: AdamW lr 1e-3, weight decay 0, clip 1.0, up to 50 epochs,
patience 10 on dev micro-F1. The *best* checkpoint (not the last epoch's weights, which the
official code scored) is the one to evaluate on test.
"""
from __future__ import annotations

import datetime
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import metrics as metric_fns
from ..files import remove_stale_temporaries
from ..ops import dispatch
from .checkpoint import CheckpointError, load_checkpoint, load_weights, one_line, save_checkpoint
from .distributed import gather_objects, is_main_process, world
from .precision import PRECISIONS, autocast
from .pretune import plan_for, tune_buckets

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


@dataclass
class TrainConfig:
    """Optimisation settings (the official recipe by default)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    # Decay only weight matrices and conv kernels (parameters with 2+ dimensions), not biases or
    # BatchNorm scales and shifts: decaying a BatchNorm scale shrinks the RAM's output towards 0.
    decay_matrices_only: bool = False
    grad_clip: float = 1.0
    max_epochs: int = 50
    patience: int = 10
    metric: str = "f1_micro"
    threshold: float = 0.5
    seed: int = 0
    precision: str = "auto"  # "fp32", "bf16" (autocast on either device) or "auto": bf16 on CUDA, fp32 on the CPU
    max_minutes: Optional[float] = None  # stop starting new epochs after this wall time
    progress: bool = True  # progress bars, shown only when stderr is a terminal (show_progress_bars)
    # After each training epoch, recompute every BatchNorm's running statistics as the exact
    # average over one pass of the training data (dropout off, no gradients): eval-mode
    # BatchNorm then sees the statistics of the current weights instead of a momentum-lagged
    # average (which, at high learning rates on small data, made eval-mode outputs unstable).
    bn_recalibrate: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig: {name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig: weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"TrainConfig: max_epochs and patience must be >= 1, got "
                             f"{self.max_epochs}, {self.patience}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"TrainConfig: threshold must be in (0, 1), got {self.threshold}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class EvalResult:
    """Probabilities and targets of one pass over a split, in document order (rank 0 has all)."""

    ids: list
    icd_scores: np.ndarray
    icd_targets: np.ndarray
    ccs_scores: Optional[np.ndarray] = None
    ccs_targets: Optional[np.ndarray] = None
    loss: float = float("nan")


@dataclass
class TrainState:
    epoch: int = -1  # last finished epoch
    best_epoch: int = -1
    best_metric: float = -math.inf
    bad_epochs: int = 0
    history: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def show_progress_bars(enabled: bool, stream: Optional[TextIO] = None) -> bool:
    """Whether to draw tqdm bars: when enabled, on the main process, and only if the bars' stream
    (stderr by default) is a terminal. A redirected log gets one line per epoch (`epoch_line`)
    instead of every bar refresh and its carriage returns."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(enabled and is_main_process() and callable(isatty) and isatty())


def epoch_line(record: dict[str, Any], config: TrainConfig) -> str:
    """The log line of one epoch: training loss, throughput, dev loss and metric, the epoch's and
    the run's elapsed time, e.g.
    `epoch  3/16  train loss 0.01234  91.2 docs/s  dev loss 0.01301  dev map 0.2345 (best: 3)  12.3 s
    elapsed 0:00:37` (one line)."""
    speed = record.get("docs_per_second")
    elapsed = datetime.timedelta(seconds=round(record.get("elapsed_seconds", record["seconds"])))
    return (f"epoch {record['epoch']:>3}/{config.max_epochs}  train loss {record['train_loss']:.5f}  "
            + (f"{speed:.1f} docs/s  " if speed is not None else "")
            + f"dev loss {record['dev_loss']:.5f}  dev {config.metric} {record[config.metric]:.4f} "
            f"(best: {record['best_epoch']})  {record['seconds']:.1f} s  elapsed {elapsed}")


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: Iterable[Any], device: torch.device,
                   precision: str = "auto") -> EvalResult:
    """Run `model` over `loader`; gather sigmoid probabilities and targets from every rank,
    dropping the duplicates a distributed sampler pads with."""
    core = _unwrap(model)
    was_training = core.training
    core.eval()
    ids, icd_s, icd_t, ccs_s, ccs_t, losses = [], [], [], [], [], []
    for batch in loader:
        tokens, lengths = batch.tokens.to(device), batch.lengths.to(device)
        with autocast(device, precision):
            out = core(tokens, lengths)
        has_ccs = batch.ccs_targets is not None and out.ccs_logits is not None
        ccs_target = batch.ccs_targets.to(device) if has_ccs else None
        losses.append(float(core.compute_loss(out, batch.icd_targets.to(device), ccs_target)) * len(batch.ids))
        ids.extend(batch.ids)
        icd_s.append(torch.sigmoid(out.icd_logits.float()).cpu().numpy())
        icd_t.append(batch.icd_targets.cpu().numpy())
        if ccs_target is not None:
            ccs_s.append(torch.sigmoid(out.ccs_logits.float()).cpu().numpy())
            ccs_t.append(batch.ccs_targets.cpu().numpy())
    core.train(was_training)
    local = (ids, icd_s, icd_t, ccs_s, ccs_t, sum(losses))
    parts = gather_objects(local)
    seen, order = set(), []
    all_ids = [i for p in parts for i in p[0]]
    for idx, doc_id in enumerate(all_ids):
        if doc_id not in seen:
            seen.add(doc_id)
            order.append(idx)

    def cat(pos):
        arrays = [a for p in parts for a in p[pos]]
        return np.concatenate(arrays)[order] if arrays else None

    total = sum(p[5] for p in parts)
    return EvalResult(ids=[all_ids[i] for i in order], icd_scores=cat(1), icd_targets=cat(2),
                      ccs_scores=cat(3), ccs_targets=cat(4), loss=total / max(len(all_ids), 1))


def evaluate_result(result: EvalResult, threshold: float = 0.5, ks: Sequence[int] = (5, 8, 15)) -> dict[str, Any]:
    """marn_fast.metrics.evaluate on the ICD head (and the CCS head under 'ccs')."""
    out = metric_fns.evaluate(result.icd_scores, result.icd_targets, ks=ks, threshold=threshold)
    out["loss"] = result.loss
    if result.ccs_scores is not None:
        out["ccs"] = metric_fns.evaluate(result.ccs_scores, result.ccs_targets, ks=ks, threshold=threshold)
    return out


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups: one group at `config.weight_decay`, or with
    `decay_matrices_only` the 2+-dimensional ones at it and the rest (biases, norm affines) at 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not config.decay_matrices_only:
        return [{"params": params, "weight_decay": config.weight_decay}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Trainer:
    """Trains a MARN (reference or fused) on loaders of `Batch` objects.

    `metadata` (vocab, icd_labels, ccs_labels, data) is stored in every checkpoint so a
    checkpoint alone can serve predict/evaluate.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, out_dir: str | Path, metadata: dict[str, Any],
                 device: Optional[torch.device] = None,
                 on_epoch_end: Optional[Callable[[dict], None]] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.config = config
        self.log = log or (lambda line: print(line, flush=True))
        self.out_dir = Path(out_dir)
        self.metadata = metadata
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, config), lr=config.lr)
        rank, size = world()
        self.ddp = size > 1
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(self.model, device_ids=device_ids) if self.ddp else self.model
        self.state = TrainState()
        self.on_epoch_end = on_epoch_end

    # -------------------------------------------------------------- checkpoints
    def _payload(self, with_train_state: bool) -> dict:
        payload = {"config": self.model.config.to_dict(), "model": self.model.state_dict(), **self.metadata}
        if with_train_state:
            payload["train"] = {"optimizer": self.optimizer.state_dict(), "rng": _rng_state(),
                                "state": asdict(self.state), "train_config": asdict(self.config)}
        return payload

    def _save(self, name: str, with_train_state: bool) -> None:
        if is_main_process():
            save_checkpoint(self.out_dir / name, self._payload(with_train_state))

    def resume(self) -> None:
        """Continue from out_dir/last.pt: model, optimiser, RNG and early-stopping state.

        CheckpointError (one line) when last.pt is unusable, was written for another model
        config or another vocabulary/label space, or holds no training state."""
        path = self.out_dir / LAST_CHECKPOINT
        payload = load_checkpoint(path, map_location=self.device)
        train = payload.get("train")
        if not isinstance(train, dict) or not {"optimizer", "rng", "state"} <= set(train):
            raise CheckpointError(path, "holds no training state to resume from (a best.pt or an imported model?)")
        load_weights(self.model, payload, path)
        for key in ("vocab", "icd_labels", "ccs_labels"):
            if key in self.metadata and list(payload[key]) != list(self.metadata[key]):
                raise CheckpointError(path, f"written for other data: its {key} ({len(payload[key])}) differ from "
                                            f"this run's ({len(self.metadata[key])}); use another --out")
        try:
            self.optimizer.load_state_dict(train["optimizer"])
            _set_rng_state(train["rng"])
            self.state = TrainState(**train["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(path, f"its training state does not fit this run ({one_line(exc)})") from exc

    # -------------------------------------------------------------- measured dispatch
    def tune_dispatch(self, train_loader: Iterable[Any], dev_loader: Optional[Iterable[Any]] = None,
                      epoch: int = 0) -> Optional[dict]:
        """Resolve, before training, every dispatch key the loaders will hit (training/pretune.py):
        one training step's forward and backward (no optimiser step) per key of the training
        loader's batches from `epoch` on, one evaluation forward per key of the dev loader's, under
        the autocast the training uses. The model's weights, buffers (BatchNorm statistics),
        gradients and the random state are left as they were. Runs only for a model with
        backend "auto" while the dispatcher measures (MARN_FAST_DISPATCH=tune); returns
        tune_buckets' summary, or None when it did not run."""
        core = self.model
        if getattr(core, "backend", None) != "auto" or dispatch.mode() != "tune" or dispatch.measurement_blocked():
            return None
        plan = plan_for([(train_loader, True), (dev_loader, False)], epoch)
        if not plan:
            return None
        buffers = [(b, b.detach().clone()) for b in core.buffers()]
        rng, was_training = _rng_state(), core.training
        main = is_main_process()
        try:
            summary = tune_buckets(plan, self._tuning_step, self.log if main else (lambda line: None),
                                   progress=show_progress_bars(self.config.progress))
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for p in core.parameters():
                p.grad = None
            _set_rng_state(rng)
            core.train(was_training)
        if main:
            self.log(f"dispatch: {summary['batches']} batch shapes resolved before epoch {epoch + 1} "
                     f"({summary['measured']} keys measured) in {summary['seconds']:.1f} s")
        return summary

    def _tuning_step(self, batch: Any, train: bool) -> None:
        """A training step's forward, loss and backward (train), or an evaluation forward, on the
        unwrapped model (no DistributedDataParallel collectives), as train_epoch and
        predict_loader run them."""
        core = self.model
        tokens, lengths = batch.tokens.to(self.device), batch.lengths.to(self.device)
        icd_t = batch.icd_targets.to(self.device)
        has_ccs = batch.ccs_targets is not None and core.ccs_head is not None
        ccs_t = batch.ccs_targets.to(self.device) if has_ccs else None
        core.train(train)
        with torch.set_grad_enabled(train):
            with autocast(self.device, self.config.precision):
                out = core(tokens, lengths)
                loss = core.compute_loss(out, icd_t, ccs_t) if train else None
            if loss is not None:
                loss.backward()
            else:
                core.compute_loss(out, icd_t, ccs_t)

    # -------------------------------------------------------------- loops
    def train_epoch(self, loader: Iterable[Any], epoch: int) -> float:
        self.wrapped.train()
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, docs, start = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show_progress_bars(self.config.progress))
        for step, batch in enumerate(bar):
            tokens, lengths = batch.tokens.to(self.device), batch.lengths.to(self.device)
            icd_t = batch.icd_targets.to(self.device)
            has_ccs = batch.ccs_targets is not None and self.model.ccs_head is not None
            ccs_t = batch.ccs_targets.to(self.device) if has_ccs else None
            with autocast(self.device, self.config.precision):
                out = self.wrapped(tokens, lengths)
                loss = self.model.compute_loss(out, icd_t, ccs_t)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at epoch {epoch + 1}, step {step}, "
                                         f"batch ids {list(batch.ids)[:8]}: tensor 'loss' "
                                         f"(icd_logits finite: {bool(torch.isfinite(out.icd_logits).all())})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            total += loss.item() * len(batch.ids)
            docs += len(batch.ids)
            bar.set_postfix(loss=f"{total / docs:.4f}", docs_s=f"{docs / (time.perf_counter() - start):.1f}")
        return total / max(docs, 1)

    @torch.no_grad()
    def recalibrate_batchnorm(self, loader: Iterable[Any]) -> int:
        """Reset every BatchNorm's running mean/var and refill them with the cumulative average
        (momentum None) of the batch statistics over one pass of `loader`, in train mode with
        dropout off and no gradients. Only `encode` runs (the BatchNorms are in the encoder and the
        RAM; the label-wise attention heads have none). Parameters do not change. Returns the BatchNorm layers reset
        (0: nothing to do, no pass made)."""
        core = _unwrap(self.wrapped)
        norms = [m for m in core.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return 0
        was_training = core.training
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        core.train()
        dropouts = [m for m in core.modules() if isinstance(m, torch.nn.Dropout)]
        for m in dropouts:
            m.eval()
        try:
            for batch in loader:
                with autocast(self.device, self.config.precision):
                    core.encode(batch.tokens.to(self.device), batch.lengths.to(self.device))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            core.train(was_training)
        return len(norms)

    def fit(self, train_loader: Iterable[Any], dev_loader: Iterable[Any], resume: bool = False) -> TrainState:
        cfg = self.config
        if is_main_process() and self.out_dir.is_dir():
            remove_stale_temporaries(self.out_dir)  # left by a process killed mid-write
        if resume:
            self.resume()
        else:
            seed_everything(cfg.seed)
        if self.state.epoch + 1 < cfg.max_epochs and self.state.bad_epochs < cfg.patience:
            self.tune_dispatch(train_loader, dev_loader, epoch=self.state.epoch + 1)
        start = time.perf_counter()
        for epoch in range(self.state.epoch + 1, cfg.max_epochs):
            if self.state.bad_epochs >= cfg.patience:  # a resumed run that had stopped early
                break
            epoch_start = time.perf_counter()
            train_loss = self.train_epoch(train_loader, epoch)
            if cfg.bn_recalibrate:
                self.recalibrate_batchnorm(train_loader)
            train_seconds = time.perf_counter() - epoch_start
            dev = evaluate_result(predict_loader(self.wrapped, dev_loader, self.device, cfg.precision), cfg.threshold)
            if cfg.metric not in dev:
                raise ValueError(f"metric: {cfg.metric!r} is not one of {sorted(k for k in dev if k != 'ccs')}")
            value = float(dev[cfg.metric])
            improved = value > self.state.best_metric
            self.state.epoch = epoch
            if improved:
                self.state.best_metric, self.state.best_epoch, self.state.bad_epochs = value, epoch, 0
            else:
                self.state.bad_epochs += 1
            record = {"epoch": epoch + 1, "train_loss": train_loss, "dev_loss": dev["loss"],
                      cfg.metric: value, "best_epoch": self.state.best_epoch + 1, "seconds": train_seconds,
                      "elapsed_seconds": time.perf_counter() - start,
                      "docs_per_second": (len(train_loader.dataset) / max(train_seconds, 1e-9)
                                          if hasattr(train_loader, "dataset") else None),
                      "dev": {k: v for k, v in dev.items() if not isinstance(v, dict)}}
            self.state.history.append(record)
            if improved:
                self._save(BEST_CHECKPOINT, with_train_state=False)
            self._save(LAST_CHECKPOINT, with_train_state=True)
            if self.on_epoch_end is not None and is_main_process():
                self.on_epoch_end(record)
            if self.state.bad_epochs >= cfg.patience:
                break
            if cfg.max_minutes is not None and (time.perf_counter() - start) / 60 >= cfg.max_minutes:
                break
        return self.state

    def load_best(self) -> None:
        path = self.out_dir / BEST_CHECKPOINT
        load_weights(self.model, load_checkpoint(path, map_location=self.device), path)
