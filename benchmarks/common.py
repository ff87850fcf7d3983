"""Shared benchmark plumbing: the device's name, the run's environment, timing, and atomic
JSON/CSV output under benchmarks/results/<device-slug>/."""
from __future__ import annotations

import csv
import io
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from marn_fast.files import write_text_atomic  # noqa: F401  (re-exported for the benchmarks)
from marn_fast.ops.dispatch import device_name, device_slug  # noqa: F401  (re-exported for the benchmarks)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment(device: torch.device | str | None = None) -> dict:
    """What a result needs to be read later: device, versions, threads, commit, date (the flat
    form of the result files, from marn_fast.training.manifest.environment, the one source)."""
    from marn_fast.training.manifest import environment as run_environment

    env = run_environment(source_dir=Path(__file__).parent)
    versions = env["versions"]
    return {"device": device_name(device), "torch": versions["torch"], "triton": versions["triton"],
            "cuda": versions["cuda"], "threads": torch.get_num_threads(), "python": versions["python"],
            "commit": env["commit"][:7] if env["commit"] else None, "date": env["date"]}


def manifest_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.manifest.json"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def extra_peak_rss_bytes(call: Callable[[], object]) -> int:
    """Extra peak RSS of one call of `call` in this process (Linux): one warm-up call, then the RSS
    high-water mark VmHWM is reset through /proc/self/clear_refs and the call's VmHWM − VmRSS
    before it is returned. Run it in a fresh subprocess with a fixed glibc mmap threshold
    (MALLOC_MMAP_THRESHOLD_), so that memory freed by the warm-up is not silently reused."""
    call()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS:")
    call()
    return 1024 * (_rss_kib("VmHWM:") - before)


def time_cpu(fn: Callable[[], object], warmup: int = 1, repeat: int = 5) -> float:
    """Median wall seconds of fn() (synchronising CUDA around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(name: str, rows: Sequence[dict], meta: dict | None = None,
                  device: torch.device | str | None = None) -> Path:
    """Write results/<device-slug>/<name>.json (environment + meta + rows), <name>.csv and
    <name>.manifest.json (versions, commit, device, the benchmark's settings)."""
    folder = RESULTS_DIR / device_slug(device)
    payload = {"benchmark": name, "environment": environment(device), **(meta or {}), "rows": list(rows)}
    write_text_atomic(folder / f"{name}.json", json.dumps(payload, indent=2, default=str) + "\n")
    from marn_fast.training.manifest import environment as run_environment

    manifest = {"kind": "benchmark", "benchmark": name, "results": [f"{name}.json"] + ([f"{name}.csv"] if rows else []),
                "device_name": device_name(device), "threads": torch.get_num_threads(), "settings": meta or {},
                **run_environment(source_dir=Path(__file__).parent)}
    write_text_atomic(manifest_path(folder, name), json.dumps(manifest, indent=2, default=str) + "\n")
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(folder / f"{name}.csv", buf.getvalue())
    return folder
