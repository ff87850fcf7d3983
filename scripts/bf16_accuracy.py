"""bf16 autocast against fp32 training, same data, same seed: does bf16 cost accuracy?

Runs `marn-fast train ARGS --precision fp32` and `--precision bf16` into OUT/fp32 and OUT/bf16
(skipping a run whose metrics.json already exists), then compares the dev metrics of each run's
best epoch (micro-F1 and MAP at the run's fixed threshold) and the test metrics at the
dev-tuned threshold. The target (issue: trust) is |bf16 − fp32| ≤ 0.005 on dev micro-F1 and MAP.
Writes benchmarks/results/<device-slug>/bf16_accuracy_<name>.json (atomically) and prints a table.

    python scripts/bf16_accuracy.py --name synth --out runs/bf16 -- --data synth --synth-preset demo --epochs 30

--smoke: the same runs and table, nothing written under benchmarks/results (for dry runs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, write_results  # noqa: E402

PRECISIONS = ("fp32", "bf16")
DEV_METRICS = ("f1_micro", "map", "f1_macro", "p@8")
TEST_METRICS = ("f1_micro", "f1_macro", "map", "p@8", "auc_micro")
TOLERANCE = 0.005


def train(precision: str, out: Path, train_args: list) -> dict:
    metrics = out / "metrics.json"
    if not metrics.exists():
        cmd = [sys.executable, "-m", "marn_fast", "train", *train_args, "--precision", precision,
               "--out", str(out), "--no-progress"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(metrics.read_text())


def best_dev(report: dict) -> dict:
    record = report["history"][report["best_epoch"] - 1]
    return {k: record["dev"][k] for k in DEV_METRICS if k in record["dev"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="result name, e.g. synth or codiesp")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="write no result files (dry runs)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of marn-fast train")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not torch.cuda.is_available():
        print("note: no GPU, so both runs are fp32 (the CPU always trains in fp32)")
    reports = {p: train(p, args.out / p, train_args) for p in PRECISIONS}
    rows = []
    for split, metrics in (("dev", DEV_METRICS), ("test", TEST_METRICS)):
        values = {p: (best_dev(r) if split == "dev" else r["test_at_tuned_threshold"]) for p, r in reports.items()}
        for metric in metrics:
            if metric not in values["fp32"]:
                continue
            fp32, bf16 = values["fp32"][metric], values["bf16"][metric]
            rows.append({"split": split, "metric": metric, "fp32": fp32, "bf16": bf16, "bf16_minus_fp32": bf16 - fp32,
                         "within_tolerance": abs(bf16 - fp32) <= TOLERANCE})
    meta = {"train_args": train_args, "tolerance": TOLERANCE,
            "runs": {p: {"best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "seconds": r["seconds"],
                         "backend": r["backend"], "warnings": r["warnings"]} for p, r in reports.items()}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = None if args.smoke else write_results(f"bf16_accuracy_{args.name}", rows, meta, device=device)
    print(f"\nbf16 vs fp32 on {device_name(device)} ({args.name}); tolerance {TOLERANCE}")
    print(f"{'split':<6}{'metric':<10}{'fp32':>9}{'bf16':>9}{'diff':>9}")
    for r in rows:
        print(f"{r['split']:<6}{r['metric']:<10}{r['fp32']:9.4f}{r['bf16']:9.4f}{r['bf16_minus_fp32']:+9.4f}"
              f"{'' if r['within_tolerance'] else '  > tolerance'}")
    print("smoke: nothing written" if folder is None else f"wrote {folder}/bf16_accuracy_{args.name}.{{json,csv}}")


if __name__ == "__main__":
    main()
