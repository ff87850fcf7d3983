"""bf16 autocast against fp32 training, same data, same seeds: does bf16 cost accuracy?

For every seed, runs `marn-fast COMMAND ARGS --seed S --precision fp32` and `--precision bf16`
into OUT/fp32-seedS and OUT/bf16-seedS (skipping a run whose metrics.json already exists), then
compares the test metrics of each run's best checkpoint: micro-F1 at the dev-tuned threshold and
MAP (for CodiEsp runs the track's MAP over every gold code, `codiesp.marn.map`). Done when, for
each metric, the difference of the means is within 0.01 absolute and within the seed spread (the
larger of the two precisions' sample standard deviations over the seeds; with one seed, 0.01
alone). Writes results/bf16-accuracy-NAME-DEVICE/summary.json and README.md (atomically) and prints the
table; --smoke writes nothing.

    python scripts/bf16_accuracy.py --name demo --out runs/bf16-demo --seeds 0 1 2 -- demo
    python scripts/bf16_accuracy.py --name codiesp --out runs/bf16-codiesp --seeds 0 1 2 -- \\
        train --data codiesp --data-dir CODIESP
Arguments after `--` that start with an option are `train` arguments (`-- --data synth ...`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import device_name, device_slug  # noqa: E402

from marn_fast.files import write_json_atomic, write_text_atomic  # noqa: E402
from marn_fast.training.manifest import environment  # noqa: E402

PRECISIONS = ("fp32", "bf16")
METRICS = ("f1_micro", "map")
TOLERANCE = 0.01


def run(command: list, precision: str, seed: int, out: Path) -> dict:
    metrics = out / "metrics.json"
    if not metrics.exists():
        cmd = [sys.executable, "-m", "marn_fast", *command, "--seed", str(seed), "--precision", precision,
               "--out", str(out), "--no-progress"]
        print("$", " ".join(cmd), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "run.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(metrics.read_text())


def test_metrics(report: dict) -> dict:
    """micro-F1 at the dev-tuned threshold and MAP (CodiEsp: the track MAP) of a run's best checkpoint."""
    tuned = report["test_at_tuned_threshold"]
    track = ((report.get("codiesp") or {}).get("marn") or {}).get("map")
    if isinstance(track, dict):  # {"CodiEsp-D": value}: the run's one track
        [track] = track.values()
    return {"f1_micro": tuned["f1_micro"], "map": tuned.get("map") if track is None else track}


def compare(values: dict, seeds: list) -> list:
    """One row per metric: per-seed values, means, sample stds, the difference and the verdict."""
    rows = []
    for metric in METRICS:
        per = {p: [values[p][s][metric] for s in seeds] for p in PRECISIONS}
        mean = {p: statistics.fmean(v) for p, v in per.items()}
        std = {p: statistics.stdev(v) if len(v) > 1 else 0.0 for p, v in per.items()}
        spread = max(std.values())
        diff = mean["bf16"] - mean["fp32"]
        bound = min(TOLERANCE, spread) if len(seeds) > 1 else TOLERANCE
        rows.append({"metric": metric, "fp32": per["fp32"], "bf16": per["bf16"], "fp32_mean": mean["fp32"],
                     "bf16_mean": mean["bf16"], "fp32_std": std["fp32"], "bf16_std": std["bf16"],
                     "bf16_minus_fp32": diff, "bound": bound, "met": abs(diff) <= bound})
    return rows


def readme(name: str, command: list, seeds: list, rows: list, runs: dict, device: str) -> str:
    lines = [f"# bf16 against fp32: {name}", "",
             f"`marn-fast {' '.join(command)} --seed S --precision fp32|bf16`, seeds {', '.join(map(str, seeds))}, "
             f"on {device}. Test metrics of each run's best checkpoint (micro-F1 at the dev-tuned threshold; "
             "MAP, for CodiEsp the track MAP over every gold code).", "",
             "| metric | " + " | ".join(f"fp32 s{s}" for s in seeds) + " | " + " | ".join(f"bf16 s{s}" for s in seeds)
             + " | fp32 mean ± std | bf16 mean ± std | bf16 − fp32 | bound | met |",
             "|---|" + "---|" * (2 * len(seeds) + 5)]
    for r in rows:
        lines.append(f"| {r['metric']} | " + " | ".join(f"{v:.4f}" for v in r["fp32"] + r["bf16"])
                     + f" | {r['fp32_mean']:.4f} ± {r['fp32_std']:.4f} | {r['bf16_mean']:.4f} ± {r['bf16_std']:.4f}"
                     f" | {r['bf16_minus_fp32']:+.4f} | {r['bound']:.4f} | {'yes' if r['met'] else 'no'} |")
    lines += ["", f"Bound: the difference of the means must be within {TOLERANCE} absolute and within the seed "
              "spread (the larger sample standard deviation of the two precisions).", "",
              "| run | best epoch | epochs | seconds |", "|---|---|---|---|"]
    lines += [f"| {key} | {r['best_epoch']} | {r['epochs_run']} | {r['seconds']:.0f} |" for key, r in runs.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="result name, e.g. demo or codiesp")
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--smoke", action="store_true", help="write no result files (dry runs)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the marn-fast command and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command[0].startswith("-"):
        command = ["train", *command]
    reports = {p: {s: run(command, p, s, args.out / f"{p}-seed{s}") for s in args.seeds} for p in PRECISIONS}
    values = {p: {s: test_metrics(r) for s, r in by_seed.items()} for p, by_seed in reports.items()}
    rows = compare(values, args.seeds)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = device_name(kind)
    runs = {f"{p} seed {s}": r for p, by_seed in reports.items() for s, r in by_seed.items()}
    print(f"\nbf16 vs fp32 on {device} ({args.name}), seeds {args.seeds}")
    for r in rows:
        print(f"{r['metric']:<9} fp32 {r['fp32_mean']:.4f} ± {r['fp32_std']:.4f}  bf16 {r['bf16_mean']:.4f} ± "
              f"{r['bf16_std']:.4f}  diff {r['bf16_minus_fp32']:+.4f}  bound {r['bound']:.4f}  "
              f"{'met' if r['met'] else 'NOT met'}")
    if args.smoke:
        print("smoke: nothing written")
        return
    folder = ROOT / "results" / f"bf16-accuracy-{args.name}-{device_slug(kind)}"
    write_json_atomic(folder / "summary.json", {
        "name": args.name, "command": command, "seeds": args.seeds, "device": device, "tolerance": TOLERANCE,
        "rows": rows, "runs": {k: {"best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                                   "seconds": r["seconds"], "backend": r["backend"]} for k, r in runs.items()},
        "environment": environment()})
    write_text_atomic(folder / "README.md", readme(args.name, command, args.seeds, rows, runs, device))
    print(f"wrote {folder}/summary.json and README.md")


if __name__ == "__main__":
    main()
