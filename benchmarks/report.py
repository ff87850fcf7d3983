"""Generate benchmarks/README.md from the JSON results under benchmarks/results/<device>/ (never
hand-typed numbers): per device, the environment of every result file, the end-to-end MARN tables
(throughput, ratios vs eager and compiled, peak memory, targets, per-component breakdown, sweeps,
memory limits), the op benchmarks' tables, the pytest-benchmark suite, and links to the plots.

    python benchmarks/report.py                                   # rewrite benchmarks/README.md
    python benchmarks/report.py --pytest-json pytest_benchmark.json
        # first file a pytest-benchmark JSON under results/<its device>/pytest_benchmark.json
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from marn_fast.files import write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
PYTEST_JSON = "pytest_benchmark.json"
MIB = 2 ** 20
ENV_KEYS = ("device", "date", "commit", "torch", "triton", "cuda", "threads")
MODEL_FILES = ("model.json", "model_breakdown.json", "model_sweep.json", "model_limits.json")


# ------------------------------------------------------------------------------------- io
def file_pytest_json(source: Path) -> Path:
    """Copy a pytest-benchmark JSON to results/<device_slug>/pytest_benchmark.json; the slug comes
    from the benchmarks' extra_info (set by benchmarks/test_bench_*.py)."""
    data = json.loads(source.read_text())
    slugs = {b.get("extra_info", {}).get("device_slug") for b in data.get("benchmarks", [])} - {None}
    if len(slugs) != 1:
        raise SystemExit(f"--pytest-json: expected the benchmarks of one device (extra_info.device_slug), "
                         f"found {sorted(slugs) or 'none'} in {source}")
    target = RESULTS / slugs.pop() / PYTEST_JSON
    write_text_atomic(target, json.dumps(data, indent=2) + "\n")
    return target


def environment_of(data: dict) -> dict:
    """Environment of a result file, whichever layout its benchmark used."""
    if "environment" in data:
        return data["environment"]
    if "meta" in data:
        return data["meta"]
    if "machine_info" in data:  # pytest-benchmark
        bench = next(iter(data.get("benchmarks", [])), {})
        commit = data.get("commit_info", {})
        return {"device": bench.get("extra_info", {}).get("device"), "date": data.get("datetime"),
                "commit": (commit.get("id") or "")[:7] or None, "torch": None, "triton": None,
                "python": data["machine_info"].get("python_version")}
    return {k: data[k] for k in ENV_KEYS if k in data}


def rows_of(data: dict) -> list:
    rows = data.get("rows", data.get("results", []))
    return rows if isinstance(rows, list) else []


# ------------------------------------------------------------------------------------- formatting
def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def mib(value) -> str:
    return "" if value is None else f"{value / MIB:,.1f}"


def ms(value) -> str:
    return "" if value is None else fmt(1000 * value)


def ratio(value) -> str:
    return "" if value is None else f"{value:.2f}×"


def table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c.replace("|", "\\|") for c in row) + " |"
            for row in rows]
    return out + [""]


def generic_table(rows: list) -> list:
    """Any list of flat dicts: *_bytes columns in MiB, the rest as they are."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    header = [f"{k[:-6]} (MiB)" if k.endswith("_bytes") else k for k in keys]
    body = [[mib(r.get(k)) if k.endswith("_bytes") and isinstance(r.get(k), (int, float)) else fmt(r.get(k))
             for k in keys] for r in rows]
    return table(header, body)


def meta_lines(data: dict) -> list:
    skip = {"benchmark", "environment", "meta", "rows", "results", "targets"} | set(ENV_KEYS)
    items = [(k, v) for k, v in data.items() if k not in skip and not isinstance(v, list)]
    return [f"- {k}: {fmt(v)}" for k, v in items] + ([""] if items else [])


# ------------------------------------------------------------------------------------- model sections
def labels(r: dict) -> str:
    return f"{r.get('L_icd')}+{r.get('L_ccs')}"


def load(r: dict) -> str:
    """The 1-minute load average before → after the measurement (a shared machine's noise)."""
    if "load_1min_start" not in r:
        return ""
    return f"{r['load_1min_start']:.1f}→{r['load_1min_end']:.1f}"


def shares(breakdown: list, c: dict, variant: str) -> str:
    """Each piece's share of the whole call from model_breakdown.json, largest first."""
    parts = [r for r in breakdown if (r.get("shape"), r.get("dtype"), r.get("mode"), r.get("variant"))
             == (c["shape"], c["dtype"], c["mode"], variant) and "share_of_step" in r]
    return ", ".join(f"{r['component']} {100 * r['share_of_step']:.0f}%"
                     for r in sorted(parts, key=lambda r: -r["share_of_step"]))


def model_main(data: dict, breakdown: list) -> list:
    out = ["### MARN end to end: training step and inference", ""]
    out += meta_lines(data)
    header = ["shape", "B", "n", "L (ICD+CCS)", "h", "dtype", "mode", "variant", "docs/s", "median ms", "best ms",
              "× eager", "× eager (best)", "× compiled", "peak MiB", "memory / eager", "load", "note"]
    body = []
    for r in rows_of(data):
        variant = r.get("variant", "")
        if r.get("backend") and variant == "fused" and r["backend"] != "fused":
            variant += f" ({r['backend']})"
        note = r.get("error") or r.get("memory_error") or (
            f"first call {fmt(r['warmup_s'])} s (compile)" if variant == "compiled" and "warmup_s" in r else "")
        body.append([r.get("shape", ""), r.get("B"), r.get("n"), labels(r), r.get("hidden"), r.get("dtype", ""),
                     r.get("mode", ""), variant, fmt(r.get("docs_per_s")), ms(r.get("time_median_s")),
                     ms(r.get("time_best_s")), ratio(r.get("ratio_vs_eager")), ratio(r.get("ratio_vs_eager_best")),
                     ratio(r.get("ratio_vs_compiled")), mib(r.get("peak_bytes")), ratio(r.get("memory_vs_eager")),
                     load(r), note])
    out += table(header, body)
    checks = data.get("targets") or []
    if checks:
        out += ["#### Targets", ""]
        header = ["shape", "dtype", "mode", "metric", "required", "measured", "met", "measured / required",
                  "fused step: share of time", "eager step: share of time"]
        for c in checks:  # the shares come from the breakdown file when there is one (it may be newer)
            c["fused_shares"] = shares(breakdown, c, "fused") or c.get("fused_shares", "")
            c["eager_shares"] = shares(breakdown, c, "eager") or c.get("eager_shares", "")
        body = [[c["shape"], c["dtype"], c["mode"], c["metric"], c["required"], fmt(c.get("measured")),
                 {True: "yes", False: "**no**", None: "not measured"}[c.get("met")],
                 fmt(c.get("measured_over_required")), c["fused_shares"], c["eager_shares"]] for c in checks]
        out += table(header, body)
        for c in checks:
            if c.get("met") is False:
                value = c["measured"]
                out.append(f"- Missed: {c['metric']} at {c['shape']} {c['dtype']} {c['mode']} is {value:.2f}, "
                           f"required {c['required']} (reaches {100 * c['measured_over_required']:.0f}% of the "
                           f"target). The fused step's time goes to: {c.get('fused_shares') or 'no breakdown'}.")
        out.append("")
    return out


def model_breakdown(data: dict) -> list:
    rows = rows_of(data)
    out = ["### Where the time goes (per-component breakdown)", "",
           "Each piece timed on its own on the same inputs (training pieces include their backward), "
           "interleaved with the whole call; ms (share of the whole call). *other* = whole − Σ pieces "
           "(input checks, glue; negative when the pieces' medians overshoot).", ""]
    comps = list(dict.fromkeys(r["component"] for r in rows if "component" in r))
    keys = list(dict.fromkeys((r["shape"], r["dtype"], r.get("mode"), r["variant"]) for r in rows))
    header = ["shape", "B", "n", "L", "dtype", "mode", "variant", "whole ms"] + comps + ["note"]
    body = []
    for key in keys:
        group = [r for r in rows if (r["shape"], r["dtype"], r.get("mode"), r["variant"]) == key]
        first = group[0]
        cells = []
        for comp in comps:
            r = next((r for r in group if r.get("component") == comp), {})
            cells.append(f"{ms(r['time_median_s'])} ({100 * r['share_of_step']:.0f}%)" if "share_of_step" in r else "")
        errors = "; ".join(sorted({r["error"] for r in group if "error" in r}))
        body.append([first["shape"], first.get("B"), first.get("n"), labels(first), first["dtype"],
                     first.get("mode", ""), first["variant"], ms(first.get("step_time_s"))] + cells + [errors])
    return out + table(header, body)


def model_sweep(data: dict, plots: list) -> list:
    out = ["### Scaling sweeps", ""]
    out += meta_lines({k: v for k, v in data.items() if k == "L_sweep"})
    header = ["axis", "value", "B", "n", "L (ICD+CCS)", "dtype", "mode", "variant", "median ms", "× eager",
              "peak MiB", "note"]
    body = [[r.get("axis"), r.get("value"), r.get("B"), r.get("n"), labels(r), r.get("dtype"), r.get("mode"),
             r.get("variant"), ms(r.get("time_median_s")), ratio(r.get("ratio_vs_eager")), mib(r.get("peak_bytes")),
             r.get("error", "")] for r in rows_of(data)]
    out += table(header, body)
    return out + [f"![{p.stem}]({p.relative_to(HERE).as_posix()})" for p in plots if "sweep" in p.stem] + [""]


def model_limits(data: dict) -> list:
    out = ["### Largest batch and longest document that fit (one training step)", ""]
    header = ["variant", "axis", "at", "largest that fits", "smallest that failed", "cap", "complete",
              "peak MiB at largest", "note"]
    body = []
    for r in rows_of(data):
        at = f"n={r.get('n')}" if r.get("axis") == "batch" else f"B={r.get('B')}"
        body.append([r.get("variant"), r.get("axis"), f"{at}, L={labels(r)}, {r.get('dtype')}", r.get("largest"),
                     r.get("smallest_failing"), r.get("cap"), r.get("complete"), mib(r.get("peak_bytes_at_largest")),
                     r.get("error", "")])
    return out + table(header, body)


# ------------------------------------------------------------------------------------- other files
def pytest_section(data: dict) -> list:
    benches = data.get("benchmarks", [])
    out = ["### pytest-benchmark suite (`pytest benchmarks/ --benchmark-only`)", "",
           "Median of the rounds; ratio = reference median / fused median in the same group and run.", ""]
    groups: dict = {}
    for b in benches:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    header = ["group", "sizes", "reference median ms", "fused median ms", "fused × reference", "rounds"]
    body = []
    for group, items in groups.items():
        by_impl = {b.get("extra_info", {}).get("impl"): b for b in items}
        ref, fused = by_impl.get("reference"), by_impl.get("fused")
        sizes = {k: v for k, v in items[0].get("extra_info", {}).items() if k not in ("impl", "device", "device_slug")}
        med = lambda b: b["stats"]["median"] if b else None  # noqa: E731
        body.append([group, ", ".join(f"{k}={v}" for k, v in sizes.items()), ms(med(ref)), ms(med(fused)),
                     ratio(med(ref) / med(fused)) if ref and fused else "",
                     "/".join(str(b["stats"]["rounds"]) for b in items)])
    return out + table(header, body)


def generic_section(name: str, data: dict) -> list:
    title = data.get("benchmark") or data.get("meta", {}).get("benchmark") or name
    out = [f"### {title} (`{name}`)", ""]
    out += meta_lines(data)
    rows = rows_of(data)
    return out + (generic_table(rows) if rows else ["(no rows)", ""])


# ------------------------------------------------------------------------------------- page
def rerun_instructions() -> list:
    """The usage lines of every benchmarks/bench_*.py docstring, read without importing them."""
    out = ["## How to rerun", "",
           "From the repository root, after `pip install --no-build-isolation -e .` (the compiled extension; "
           "without it `marn_fast.MARN(backend=\"auto\")` measures among the plain-PyTorch and Triton "
           "candidates only). "
           "Each command writes JSON/CSV (and plots) under `benchmarks/results/<device>/`; on a machine with "
           "CUDA the scripts run their GPU part by default or with `--device cuda`.", "", "```"]
    for path in sorted(HERE.glob("bench_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines = [line.strip() for line in doc.splitlines() if line.strip().startswith("python benchmarks/")]
        out += lines or [f"python benchmarks/{path.name}"]
    out += ["",
            "# the pytest-benchmark suite (small sizes, seconds per case), then file its JSON by device",
            "pytest benchmarks/ --benchmark-only --benchmark-json=pytest_benchmark.json",
            "python benchmarks/report.py --pytest-json pytest_benchmark.json",
            "",
            "# regenerate this page from the JSON results",
            "python benchmarks/report.py", "```", "",
            "`pytest` from the repository root runs only `tests/` (`testpaths = [\"tests\"]` in pyproject.toml): "
            "the benchmark suite runs only when `benchmarks/` is named.", ""]
    return out


def is_gpu(env: dict) -> bool:
    return bool(env.get("cuda")) and not str(env.get("device", "")).startswith("CPU")


def device_section(folder: Path) -> tuple[list, bool]:
    files = sorted(f for f in folder.glob("*.json") if not f.name.endswith(".manifest.json"))
    loaded = {}
    for path in files:
        try:
            loaded[path.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            loaded[path.name] = {"benchmark": path.stem, "error": f"unreadable: {exc}"}
    envs = {name: environment_of(data) for name, data in loaded.items()}
    # the name common.device_name() gives (files written through write_results) first
    named = [data["environment"].get("device") for data in loaded.values() if "environment" in data]
    device = next((d for d in named + [e.get("device") for e in envs.values()] if d), folder.name)
    gpu = any(is_gpu(e) for e in envs.values())
    out = [f"## {device}", "", f"Results in `results/{folder.name}/`.", ""]
    out += table(["file", "date", "commit", "torch", "triton", "CUDA", "threads"],
                 [[name, fmt(e.get("date")), fmt(e.get("commit")), fmt(e.get("torch")), fmt(e.get("triton")),
                   fmt(e.get("cuda")), fmt(e.get("threads"))] for name, e in envs.items()])
    plots = sorted(folder.glob("*.png"))
    if "model.json" in loaded:
        out += model_main(loaded["model.json"], rows_of(loaded.get("model_breakdown.json", {})))
    if "model_breakdown.json" in loaded:
        out += model_breakdown(loaded["model_breakdown.json"])
        out += [f"![{p.stem}]({p.relative_to(HERE).as_posix()})" for p in plots if "breakdown" in p.stem] + [""]
    if "model_sweep.json" in loaded:
        out += model_sweep(loaded["model_sweep.json"], plots)
    if "model_limits.json" in loaded:
        out += model_limits(loaded["model_limits.json"])
    if PYTEST_JSON in loaded:
        out += pytest_section(loaded[PYTEST_JSON])
    for name, data in loaded.items():
        if name not in MODEL_FILES and name != PYTEST_JSON:
            out += generic_section(name, data)
    shown = {p.name for p in plots if p.stem.startswith("model_")}
    others = [p for p in plots if p.name not in shown]
    if others:
        out += ["### Other plots", ""] + [f"![{p.stem}]({p.relative_to(HERE).as_posix()})" for p in others] + [""]
    return out, gpu


def render() -> str:
    out = ["# marn_fast benchmarks", "",
           "Generated by `python benchmarks/report.py` from the JSON files under `benchmarks/results/`; "
           "do not edit by hand. Every ratio compares implementations measured in the same process and run, "
           "on the device named in its section.", ""]
    out += rerun_instructions()
    sections, any_gpu = [], False
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.exists() else []:
        if not any(folder.glob("*.json")):
            continue
        lines, gpu = device_section(folder)
        sections += lines
        any_gpu |= gpu
    if not any_gpu:
        out += ["## GPU results: missing", "",
                "No result from a CUDA device yet. Missing: the end-to-end MARN numbers at the issue's shapes "
                "(B=16, n=4,000; 50+38 and 8,921+295 codes; fp32 and bf16) for eager, torch.compile and fused, "
                "the GPU breakdown, the n and L sweeps and the largest batch / longest n, and the op benchmarks' "
                "GPU parts. Run `bash scripts/gpu_check.sh` (or each `python benchmarks/bench_*.py --device cuda`) "
                "on an H100/H200, then this script.", ""]
    return "\n".join(out + sections).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pytest-json", type=Path, help="a pytest-benchmark JSON to file under results/<device>/")
    args = p.parse_args(argv)
    if args.pytest_json:
        print(f"filed {args.pytest_json} as {file_pytest_json(args.pytest_json)}")
    write_text_atomic(README, render())
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
