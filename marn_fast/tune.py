"""`marn-fast tune`: resolve the measured dispatch ahead of time, at given shapes or for a data set.

`tune(shapes)`: for each shape B×n×L_icd[×L_ccs] it builds `marn_fast.MARN(backend="auto")`
(random weights, a small vocabulary: the vocabulary size does not enter any op's key) and runs one
training step (forward, loss, backward) and one inference call on a random batch whose first
document is n tokens long and the others shorter, in the precision the model will run in (bf16:
under autocast, so that the bf16 keys are the ones resolved).
`tune_data(settings, ...)`: what training on that data does before its first epoch
(`Trainer.tune_dispatch`, training/pretune.py): one training step per dispatch key its training
batches will hit and one evaluation forward per key of its dev batches, found from the data's
length histogram, with that run's model (MARN, or LAAT), batch sizes and precision (random
weights: word2vec is not trained, the embedding's values enter no key).
Every op resolves its dispatch key on the way (measured unless a cache or shipped table already
holds it; `fresh=True` measures anyway), and the resolved table is returned: per op and key, the
candidates' milliseconds and the one chosen.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import torch

from .config import MARNConfig
from .model import MARN
from .ops import dispatch
from .training.precision import autocast, resolve_precision

if TYPE_CHECKING:
    from .training import DataSettings, TrainConfig

SHAPE_PATTERN = re.compile(r"^(\d+)x(\d+)x(\d+)(?:x(\d+))?$")
MODES = ("train", "infer")
TUNE_VOCAB = 1000
DEFAULT_MAX_LENGTH = MARNConfig.__dataclass_fields__["max_length"].default


@dataclass(frozen=True)
class TuneShape:
    batch: int
    n: int
    num_icd: int
    num_ccs: int = 0

    @classmethod
    def parse(cls, text: str) -> "TuneShape":
        match = SHAPE_PATTERN.match(text.strip())
        if not match or any(int(v) < 1 for v in match.groups()[:3]):
            raise ValueError(f"shape: expected BxNxL_ICD[xL_CCS] with positive sizes (e.g. 4x500x8921x295), "
                             f"got {text!r}")
        b, n, icd, ccs = match.groups()
        return cls(int(b), int(n), int(icd), int(ccs or 0))


def _batch(shape: TuneShape, device: torch.device, generator: torch.Generator):
    lengths = torch.tensor([max(1, shape.n - (i * shape.n) // (2 * shape.batch)) for i in range(shape.batch)])
    tokens = torch.randint(2, TUNE_VOCAB, (shape.batch, shape.n), generator=generator)
    tokens[torch.arange(shape.n)[None, :] >= lengths[:, None]] = 0
    icd = (torch.rand(shape.batch, shape.num_icd, generator=generator) < 0.05).float()
    ccs = (torch.rand(shape.batch, shape.num_ccs, generator=generator) < 0.1).float() if shape.num_ccs else None
    move = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return move(tokens), move(lengths), move(icd), move(ccs)


def tune(shapes: Sequence[TuneShape], hidden_size: Optional[int] = None, precision: str = "fp32",
         device: str | torch.device = "cpu", modes: Sequence[str] = MODES, fresh: bool = False,
         rounds: int = dispatch.ROUNDS) -> List[dict]:
    """Resolve every op's key at these shapes (see the module docstring) → dispatch.choices()
    rows of the keys met here. fresh: measure even where a cache or table has the key, with up
    to `rounds` timed rounds per key."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes: expected values in {MODES}, got {m!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no GPU is visible")
    generator = torch.Generator().manual_seed(0)
    seen = {row["key"] for row in dispatch.choices()}
    context = (dispatch.fresh_measurements(rounds, budget_s=rounds * dispatch.TIME_BUDGET_S / dispatch.ROUNDS)
               if fresh else contextlib.nullcontext())
    with context:
        for shape in shapes:
            config = MARNConfig(vocab_size=TUNE_VOCAB, num_icd=shape.num_icd, num_ccs=shape.num_ccs,
                                max_length=max(shape.n, DEFAULT_MAX_LENGTH),
                                **({"hidden_size": hidden_size} if hidden_size else {}))
            model = MARN(config, backend="auto").to(device)
            tokens, lengths, icd, ccs = _batch(shape, device, generator)
            if "train" in modes:
                model.train()
                with autocast(device, precision):
                    loss = model.compute_loss(model(tokens, lengths), icd, ccs)
                loss.backward()
            if "infer" in modes:
                model.eval()
                with torch.no_grad(), autocast(device, precision):
                    model(tokens, lengths)
    return [row for row in dispatch.choices() if row["key"] not in seen]


def tune_data(settings: DataSettings, model_options: dict, train_config: TrainConfig,
              device: str | torch.device = "cpu", fresh: bool = False, rounds: int = dispatch.ROUNDS,
              log: Callable[[str], None] = print) -> List[dict]:
    """Resolve every key a training run with these settings will hit (see the module docstring) →
    the dispatch.choices() rows of the keys met here. ValueError when the dispatcher cannot
    measure here (MARN_FAST_DISPATCH is not tune, or Triton is interpreted)."""
    from .training import Experiment, Trainer
    from .training.checkpoint import model_from_config
    from .training.run import model_config

    if dispatch.mode() != "tune":
        raise ValueError(f"{dispatch.ENV_MODE}={dispatch.mode()}: tuning needs {dispatch.ENV_MODE}=tune (the default)")
    blocked = dispatch.measurement_blocked()
    if blocked:
        raise ValueError(blocked)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no GPU is visible")
    exp = Experiment(settings)
    log(f"data: {exp.summary()}")
    model = model_from_config(model_config(exp, model_options), backend="auto")  # MARN, or LAAT with --model laat
    # The trainer serves its tuning step only: nothing is written to its folder.
    trainer = Trainer(model, train_config, ".", exp.metadata(), device=device, log=log)
    seen = {row["key"] for row in dispatch.choices()}
    context = (dispatch.fresh_measurements(rounds, budget_s=rounds * dispatch.TIME_BUDGET_S / dispatch.ROUNDS)
               if fresh else contextlib.nullcontext())
    with context:
        trainer.tune_dispatch(exp.loader("train"), exp.loader("dev"))
    return [row for row in dispatch.choices() if row["key"] not in seen]


def format_table(rows: Sequence[dict]) -> str:
    """One line per key: op, mode, dtype, bucketed sizes, the chosen impl and where it came from,
    then every candidate's milliseconds (measured keys), the margin to the runner-up, and the
    skipped (memory) and rejected ones with why."""
    lines = [f"{'op':<20} {'mode':<5} {'dtype':<8} {'sizes':<32} {'chosen':<14} {'source':<9} candidates (ms)"]
    for row in rows:
        sizes = ",".join(f"{k}={v}" for k, v in row["sizes"].items())
        ms = "  ".join(f"{impl} {value:.2f}" for impl, value in sorted(row["ms"].items(), key=lambda kv: kv[1]))
        notes = ([dispatch.describe_margin(row["margin"], row["runner_up"])] if row["margin"] is not None else [])
        notes += [f"skipped {impl}: {why}" for impl, why in row["skipped"].items()]
        notes += [f"rejected {impl}: {why}" for impl, why in row["rejected"].items()]
        lines.append(f"{row['op']:<20} {row['mode']:<5} {row['dtype']:<8} {sizes:<32} {row['impl']:<14} "
                     f"{row['source']:<9} {ms}" + "".join(f"  ({note})" for note in notes))
    return "\n".join(lines)


def write_rows(path: Path, rows: Sequence[dict]) -> int:
    """Merge the measured rows into a dispatch table file (e.g. one shipped in
    marn_fast/ops/dispatch_tables/), in the cache's format (each entry with what it was measured
    with); rows resolved otherwise (cache, table, default) are left out. Returns how many were written."""
    measured = [row for row in rows if row["source"] == "measured"]
    if measured:
        dispatch.write_table(Path(path), measured[0]["device"],
                             {row["key"]: {name: row[name] for name in dispatch.ENTRY_FIELDS} for row in measured})
    return len(measured)
