"""Focal loss: time of loss + backward for the eager official formula, torch.compile of it, and
the fused op (marn_fast.ops.focal_loss, impl="auto": Triton on CUDA; on CPU the C++ kernel when
marn_fast._C is built, else the vectorised-PyTorch path). On CPU the PyTorch path is also timed
("fused_torch") with the C++ kernel switched off, so both CPU paths are compared in one run.

Full-code sizes: L = 8,921 ICD + 295 CCS codes, B ∈ {16, 64}; official form (α = 0.999, γ = 2,
mean). CPU: fp32 logits, float32 and bool targets. CUDA: fp32 and bf16 logits, float32 and bool
targets, plus the achieved bandwidth of the fused op (logits and targets read once, the
gradient written once) against a device-to-device copy of the same traffic measured in the
same run. Methods are timed interleaved (rounds of each in turn), the median round reported.

    python benchmarks/bench_focal_loss.py [--device cpu|cuda] [--rounds 15] [--threads N]

Writes benchmarks/results/<device-slug>/focal_loss.{json,csv} (temp file, then os.replace).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import statistics
import time
from pathlib import Path

import torch

import importlib
from unittest import mock

from common import device_name, device_slug, write_text_atomic
from marn_fast.ops import cpu_extension_available, focal_loss
from marn_fast.reference import focal_loss as reference_focal_loss

_OPS_FOCAL = importlib.import_module("marn_fast.ops.focal_loss")

NUM_CODES = 8921 + 295  # ICD-9 codes + CCS categories of the full-code setting
BATCHES = (16, 64)
RESULTS = Path(__file__).resolve().parent / "results"




def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict, device: torch.device, rounds: int, min_round_s: float) -> dict:
    """Median seconds per call of each fn; rounds interleave the fns so load noise hits all."""
    reps = {}
    for name, fn in fns.items():  # warm-up, and calls per round so a round lasts ≥ min_round_s
        fn()
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - t, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t) / reps[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def loss_and_backward(loss_fn, logits, targets):
    def step():
        logits.grad = None
        loss_fn(logits, targets).backward()
    return step


def run_case(device, batch, logits_dtype, target_dtype, rounds, min_round_s, compiled_ref):
    g = torch.Generator(device="cpu").manual_seed(batch)
    logits = ((torch.rand(batch, NUM_CODES, generator=g) * 2 - 1) * 10).to(device, logits_dtype)
    logits.requires_grad_()
    targets = (torch.rand(batch, NUM_CODES, generator=g) < 0.01).to(device, target_dtype)
    fns = {
        "eager": loss_and_backward(reference_focal_loss, logits, targets),
        "compiled": loss_and_backward(compiled_ref, logits, targets),
        "fused": loss_and_backward(focal_loss, logits, targets),
    }
    if device.type == "cpu" and cpu_extension_available():
        def torch_path(x, y):  # the vectorised-PyTorch CPU path (the C++ kernel reported unavailable)
            with mock.patch.object(_OPS_FOCAL, "extension_available_for", lambda t: False):
                return focal_loss(x, y)
        fns["fused_torch"] = loss_and_backward(torch_path, logits, targets)
    moved = logits.numel() * logits.element_size() * 2 + targets.numel() * targets.element_size()
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)  # reads and writes `moved` bytes in all
    times = time_rounds(fns, device, rounds, min_round_s)
    fused_bw, copy_bw = moved / times["fused"], 2 * src.numel() / times["copy"]
    extra = {}
    if "fused_torch" in times:
        extra = {"fused_torch_ms": times["fused_torch"] * 1e3,
                 "fused_torch_vs_eager": times["eager"] / times["fused_torch"]}
    return extra | {
        "batch": batch, "num_codes": NUM_CODES, "logits_dtype": str(logits_dtype).replace("torch.", ""),
        "target_dtype": str(target_dtype).replace("torch.", ""),
        "eager_ms": times["eager"] * 1e3, "compiled_ms": times["compiled"] * 1e3,
        "fused_ms": times["fused"] * 1e3, "copy_ms": times["copy"] * 1e3,
        "fused_vs_eager": times["eager"] / times["fused"],
        "fused_vs_compiled": times["compiled"] / times["fused"],
        "bytes_moved": moved, "fused_GBps": fused_bw / 1e9, "copy_GBps": copy_bw / 1e9,
        "fused_bw_fraction_of_copy": fused_bw / copy_bw,
    }



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-round-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a loaded machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logits_dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    compiled_ref = torch.compile(reference_focal_loss)
    rows = []
    for batch in BATCHES:
        for logits_dtype in logits_dtypes:
            for target_dtype in (torch.float32, torch.bool):
                row = run_case(device, batch, logits_dtype, target_dtype, args.rounds,
                               args.min_round_ms / 1e3, compiled_ref)
                rows.append(row)
                print(f"B={batch:3d} {row['logits_dtype']:>8s} logits, {row['target_dtype']:>7s} targets: "
                      f"eager {row['eager_ms']:.3f} ms, compiled {row['compiled_ms']:.3f} ms, "
                      f"fused {row['fused_ms']:.3f} ms ({row['fused_vs_eager']:.2f}x eager, "
                      f"{row['fused_vs_compiled']:.2f}x compiled); fused {row['fused_GBps']:.1f} GB/s = "
                      f"{100 * row['fused_bw_fraction_of_copy']:.0f}% of copy"
                      + (f"; PyTorch path {row['fused_torch_ms']:.3f} ms ({row['fused_torch_vs_eager']:.2f}x eager)"
                         if "fused_torch_ms" in row else ""), flush=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    meta = {"benchmark": "focal_loss", "device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_average_1_5_15min": os.getloadavg(),  # other work on the machine skews CPU times
            "method": f"loss + backward, official form (alpha=0.999, gamma=2, mean); median of "
                      f"{args.rounds} interleaved rounds; eager = marn_fast.reference.focal_loss, "
                      f"compiled = torch.compile of it, fused = marn_fast.ops.focal_loss(impl='auto') "
                      f"(CPU: the C++ kernel when built), fused_torch = its vectorised-PyTorch CPU path"}
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "focal_loss.json", json.dumps(meta | {"results": rows}, indent=2) + "\n")
    buf = io.StringIO()
    fields = ["device", "torch", "triton", "date"] + list(rows[0])
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: meta[k] for k in fields[:4]} | row)
    write_text_atomic(out_dir / "focal_loss.csv", buf.getvalue())
    print(f"wrote {out_dir}/focal_loss.json and .csv")


if __name__ == "__main__":
    main()
