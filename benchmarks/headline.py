"""The README's headline table of speed and memory, generated from benchmarks/results/ (never
hand-typed): one row per workload and device, marn_fast's time against eager PyTorch and
torch.compile measured in the same process, its peak memory against eager's, and the file the
numbers come from.

    python benchmarks/headline.py            # rewrite the table between the markers in README.md
    python benchmarks/headline.py --check    # exit 1 if README.md's table differs from the results

ROWS says which result row is the headline for each workload; add a row (or a device) there when
a new result is committed. tests/test_docs_links.py checks that README.md holds what this renders.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- headline:begin (python benchmarks/headline.py) -->", "<!-- headline:end -->"
VARIANTS = ("eager", "compiled", "fused")


@dataclass(frozen=True)
class Row:
    """One headline row: `match` picks the result rows of one workload in `file`; each variant's
    time (and peak memory) comes from the row whose `variant_key` names it, or, in a file with one
    row per workload (`wide`), from the columns `wide` names per variant."""

    device: str  # folder under benchmarks/results/
    file: str
    workload: str
    match: dict
    variant_key: str = "impl"
    time_key: str = "time_median_s"
    time_scale: float = 1.0  # to seconds
    memory_key: Optional[str] = "peak_bytes"
    wide: dict = field(default_factory=dict)
    note: str = ""
    aliases: dict = field(default_factory=dict)  # a file's implementation name → "fused" (marn_fast's default)


CPU = "cpu-intel-r-xeon-r-processor-x2"
ROWS = (
    Row(CPU, "model.json", "MARN training step, B=4, n=500, 8,921+295 codes, fp32",
        {"shape": "mimic3-full (CPU size)", "mode": "train"}, variant_key="variant",
        note="torch.compile: 1.10× eager, measured only at B=2, n=200"),
    Row(CPU, "model.json", "MARN inference, same shape",
        {"shape": "mimic3-full (CPU size)", "mode": "inference"}, variant_key="variant"),
    Row(CPU, "label_attention.json", "label attention forward, B=4, n=2,000, L=9,000, fp32",
        {"L": 9000, "threads": 2, "mode": "fwd"}),
    Row(CPU, "bench_ram.json", "RAM inference, B=4, C=600, n=2,000, fp32",
        {"mode": "eval", "n": 2000}, time_key="median_ms", time_scale=1e-3, memory_key=None,
        aliases={"extension": "fused"}),
    Row(CPU, "focal_loss.json", "focal loss + gradient, B=64, 8,921+295 codes, fp32 logits",
        {"batch": 64, "codes": "8921+295", "logits_dtype": "float32", "target_dtype": "float32"}, memory_key=None,
        time_scale=1e-3, wide={"eager": "eager_ms", "compiled": "compiled_ms", "fused": "torch_ms"}),
    Row("nvidia-h200", "label_attention.json", "label attention fwd+bwd, B=16, n=4,000, L=8,921, bf16",
        {"group": "main", "mode": "fwd+bwd"}),
    Row("nvidia-h200", "bench_ram.json", "RAM training, B=16, C=600, n=4,000, bf16",
        {"mode": "train", "dtype": "bfloat16"}, time_key="median_ms", time_scale=1e-3, memory_key=None),
    Row("nvidia-h200", "focal_loss.json", "focal loss + gradient, B=64, 8,921+295 codes, bf16 logits",
        {"batch": 64, "logits_dtype": "bfloat16", "target_dtype": "float32"}, memory_key=None, time_scale=1e-3,
        wide={"eager": "eager_ms", "compiled": "compiled_ms", "fused": "fused_ms"}),
    Row("nvidia-h200", "bigru.json", "BiGRU fwd+bwd, B=16, n=4,000, d_r=300, bf16",
        {"n": 4000, "mode": "fwd+bwd", "dtype": "bfloat16"}, memory_key=None,
        note="both cuDNN; ~80 % of a GPU training step"),
)
# bigru.json names the eager path "reference"
VARIANT_ALIASES = {"reference": "eager"}


def _device_name(data: dict) -> str:
    env = data.get("environment") or data.get("meta") or data
    threads = env.get("threads")
    name = str(env.get("device", "?"))
    return f"{name}, {threads} threads" if name.startswith("CPU") and threads else name


def _rows(data: dict) -> list:
    rows = data.get("rows", data.get("results", []))
    return rows if isinstance(rows, list) else []


def measure(row: Row) -> dict:
    """{"device", "eager"/"compiled"/"fused": (seconds, peak bytes or None)} of one headline row."""
    path = RESULTS / row.device / row.file
    data = json.loads(path.read_text())
    matches = [r for r in _rows(data) if all(r.get(k) == v for k, v in row.match.items())]
    if not matches:
        raise SystemExit(f"{path}: no result row matches {row.match}")
    out: dict = {"device": _device_name(data)}
    if row.wide:
        [r] = matches
        for variant, key in row.wide.items():
            if r.get(key) is not None:
                out[variant] = (r[key] * row.time_scale, None)
        return out
    for r in matches:
        name = r.get(row.variant_key)
        variant = row.aliases.get(name, VARIANT_ALIASES.get(name, name))
        if variant in VARIANTS and r.get(row.time_key) is not None:
            memory = r.get(row.memory_key) if row.memory_key else None
            out[variant] = (r[row.time_key] * row.time_scale, memory)
    return out


def _ratio(value: float) -> str:
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{1000 * seconds:.3g} ms"


def render() -> str:
    """The Markdown table (with its markers) that README.md holds."""
    lines = [BEGIN, "", "| device | workload | marn_fast (median) | × eager | × torch.compile | peak memory vs eager | "
                        "results |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        m = measure(row)
        fused = m["fused"]
        eager, compiled = m.get("eager"), m.get("compiled")
        memory = (f"{_ratio(fused[1] / eager[1])} ({fused[1] / 2**20:,.0f} vs {eager[1] / 2**20:,.0f} MiB)"
                  if eager and eager[1] and fused[1] else "–")
        link = f"[{row.file}](benchmarks/results/{row.device}/{row.file})"
        workload = row.workload + (f" ({row.note})" if row.note else "")
        lines.append(f"| {m['device']} | {workload} | {_time(fused[0])} | "
                     + (f"{eager[0] / fused[0]:.2f}×" if eager else "–") + " | "
                     + (f"{compiled[0] / fused[0]:.2f}×" if compiled else "–") + f" | {memory} | {link} |")
    return "\n".join(lines + ["", END])


def _readme_block(text: str) -> tuple[int, int]:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: no headline markers ({BEGIN} ... {END})")
    return start, end + len(END)


def current_block(readme: Path = README) -> str:
    text = readme.read_text(encoding="utf-8")
    start, end = _readme_block(text)
    return text[start:end]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare README.md with the results")
    args = parser.parse_args(argv)
    table = render()
    if args.check:
        same = current_block() == table
        print("README.md's headline table matches the results" if same else
              "README.md's headline table differs from the results: run `python benchmarks/headline.py`")
        return 0 if same else 1
    text = README.read_text(encoding="utf-8")
    start, end = _readme_block(text)
    README.write_text(text[:start] + table + text[end:], encoding="utf-8")
    print(f"wrote the headline table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
