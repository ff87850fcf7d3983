"""`marn-fast train --seeds 1 2 3`: one run per seed (`OUT/seed-<n>/`, each a normal run folder
with its own manifest), then the spread of every metric over the seeds in
`OUT/seeds_summary.json`: mean and the *sample* standard deviation (ddof=1; None for one seed)."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Optional

from .distributed import is_main_process
from .manifest import environment
from .report import write_json

SUMMARY_FILE = "seeds_summary.json"
STD_DDOF = 1  # sample standard deviation
# The report sections whose numeric entries are aggregated (nested "ccs" metrics included).
SECTIONS = ("test", "test_at_tuned_threshold")
TABLE_METRICS = ("f1_micro", "f1_macro", "auc_micro", "auc_macro", "p@5", "p@8", "p@15", "map")


def seed_dir(out_dir, seed: int) -> Path:
    return Path(out_dir) / f"seed-{seed}"


def mean_std(values: Iterable[float]) -> dict:
    """{"mean", "std" (ddof=1, None for fewer than two values), "n", "values"}; NaN values stay in
    (a NaN metric makes its mean NaN rather than hiding a seed)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_std: no values")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - STD_DDOF)) if n > STD_DDOF else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def _numeric(section: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_numeric(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def aggregate(reports: dict[int, dict], dev_metric: str) -> dict:
    """Mean ± sample std over seeds of every numeric test metric (at the fixed threshold and at the
    dev-tuned one), of the tuned threshold, of the best dev `dev_metric` and of the best epoch."""
    if not reports:
        raise ValueError("aggregate: no runs")
    seeds = sorted(reports)
    out: dict = {"seeds": seeds, "std": f"sample standard deviation (ddof={STD_DDOF})"}
    for section in SECTIONS:
        per_seed = [_numeric(reports[s][section]) for s in seeds]
        keys = [k for k in per_seed[0] if all(k in p for p in per_seed)]
        out[section] = {k: mean_std(p[k] for p in per_seed) for k in keys}
    dev_key = "dev_" + dev_metric
    out[dev_key] = mean_std(reports[s][dev_key] for s in seeds)
    for key in ("tuned_threshold", "best_epoch"):
        out[key] = mean_std(reports[s][key] for s in seeds)
    out["warnings"] = {str(s): reports[s].get("warnings", []) for s in seeds if reports[s].get("warnings")}
    return out


def _cell(stat: dict) -> str:
    if stat["std"] is None:
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def format_table(summary: dict, dev_metric: str) -> str:
    """Metric rows (in %) at the fixed and at the dev-tuned threshold, mean ± sample std."""
    n = len(summary["seeds"])
    head = f"{'metric':<14}{'test @0.5':>20}{'test @tuned':>20}"
    lines = [f"{n} seeds {summary['seeds']}: mean ± sample std (ddof={STD_DDOF}), in %", head]
    for key in TABLE_METRICS:
        if key in summary["test"]:
            tuned = summary["test_at_tuned_threshold"].get(key)
            lines.append(f"{key:<14}{_cell(summary['test'][key]):>20}{_cell(tuned) if tuned else '':>20}")
    lines.append(f"{'dev ' + dev_metric:<14}{_cell(summary['dev_' + dev_metric]):>20}")
    return "\n".join(lines)


def train_seeds(settings, model_options: dict, train_config, out_dir, seeds: list[int], backend: str = "auto",
                resume: bool = False, log: Optional[Callable[[str], None]] = None,
                run: Optional[Callable] = None) -> dict:
    """Train one model per seed (the training seed and the data seed: word2vec, batch order) in
    `OUT/seed-<n>/`, then write and return the summary. With `resume`, a seed whose folder already
    holds metrics.json is taken as finished, one with last.pt continues from it, others start."""
    from .run import METRICS_FILE, train_and_report
    from .trainer import LAST_CHECKPOINT

    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {seeds}")
    log = log or (lambda line: print(line, flush=True))
    run = run or train_and_report
    out_dir = Path(out_dir)
    reports = {}
    for seed in seeds:
        folder = seed_dir(out_dir, seed)
        if resume and (folder / METRICS_FILE).is_file():
            log(f"== seed {seed}: finished earlier, reading {folder / METRICS_FILE}")
            reports[seed] = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
            continue
        log(f"== seed {seed} → {folder}")
        reports[seed] = run(replace(settings, seed=seed), model_options, replace(train_config, seed=seed), folder,
                            backend=backend, resume=resume and (folder / LAST_CHECKPOINT).is_file(), log=log)
    if not is_main_process():
        return {}
    summary = aggregate(reports, train_config.metric)
    summary["runs"] = {str(s): str(seed_dir(out_dir, s)) for s in seeds}
    summary["environment"] = environment()
    write_json(out_dir / SUMMARY_FILE, summary)
    log("\n" + format_table(summary, train_config.metric))
    return summary
