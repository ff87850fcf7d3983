"""Focal loss: time of loss + backward for the eager official formula, torch.compile of it, and
every implementation of `marn_fast.ops.focal_loss` that can run here ("torch": the C++ kernel on
CPU when marn_fast._C is built; "triton": CUDA). On CPU the vectorised-PyTorch path is also timed
("torch_no_ext", the C++ kernel switched off), so both CPU paths are compared in one run.

Cases: one head [B, L] (`focal_loss`) and the multitask loss over two heads [B, L_icd] + [B, L_ccs]
(`multitask_focal_loss`, λ = 0.7 / 0.3): full codes L = 8,921 ICD + 295 CCS (9,216 as one head),
B ∈ {16, 64}, and the top-50 setting, B = 2 with 50 + 38 codes (88 as one head); official form
(α = 0.999, γ = 2, mean). CPU: fp32 logits; CUDA: fp32 and bf16; float32 and bool targets. On
CUDA also the achieved bandwidth of the Triton path (logits and targets read once, the gradient
written once) against a device-to-device copy of the same traffic measured in the same run.
Methods are timed interleaved (rounds of each in turn), the median round reported; ratios are
eager / implementation in the same process.

    python benchmarks/bench_focal_loss.py [--device cpu|cuda] [--rounds 15] [--threads N]
    python benchmarks/bench_focal_loss.py --smoke     # seconds: [2, 88] on the CPU, the Triton
                                                      # path under TRITON_INTERPRET=1; writes nothing

Writes benchmarks/results/<device-slug>/focal_loss.{json,csv} (temp file, then os.replace). On
CUDA the issue-19 target (forward + backward ≥ 2× eager at [16, 9,216]) is checked and printed.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton: the Triton path runs in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime as dt  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from common import device_name, device_slug, write_text_atomic  # noqa: E402

from marn_fast.ops import cpu_extension_available, focal_loss, multitask_focal_loss  # noqa: E402
from marn_fast.reference import focal_loss as reference_focal_loss  # noqa: E402
from marn_fast.reference import multitask_focal_loss as reference_multitask  # noqa: E402

_OPS_FOCAL = importlib.import_module("marn_fast.ops.focal_loss")

# (batch, head widths): one head, or the two heads of the multitask loss
CASES = ((16, (9216,)), (64, (9216,)), (16, (8921, 295)), (64, (8921, 295)), (2, (88,)), (2, (50, 38)))
GPU_CASES = ((16, (9216,)), (64, (9216,)), (16, (8921, 295)), (2, (50, 38)))  # fits gpu_check.sh's cap
SMOKE_CASES = ((2, (88,)), (2, (50, 38)))
GPU_TARGET = (16, (9216,), 2.0)  # issue 19: forward + backward ≥ 2× eager at [16, 9,216]
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


def step(loss_fn, inputs):
    """loss + backward over the heads' (logits, targets) pairs."""
    logits = [x for x, _ in inputs]

    def run():
        for x in logits:
            x.grad = None
        flat = [t for pair in inputs for t in pair]
        loss_fn(*flat).backward()
    return run


def make_inputs(device, batch, widths, logits_dtype, target_dtype):
    g = torch.Generator(device="cpu").manual_seed(batch * 1000 + sum(widths))
    inputs = []
    for width in widths:
        logits = ((torch.rand(batch, width, generator=g) * 2 - 1) * 10).to(device, logits_dtype).requires_grad_()
        targets = (torch.rand(batch, width, generator=g) < 0.01).to(device, target_dtype)
        inputs.append((logits, targets))
    return inputs


def run_case(device, batch, widths, logits_dtype, target_dtype, rounds, min_round_s, compiled_ref, smoke):
    inputs = make_inputs(device, batch, widths, logits_dtype, target_dtype)
    multitask = len(widths) == 2
    ref = reference_multitask if multitask else reference_focal_loss
    ours = multitask_focal_loss if multitask else focal_loss
    fns = {"eager": step(ref, inputs)}
    if compiled_ref is not None:
        fns["compiled"] = step(compiled_ref[multitask], inputs)
    for impl in _OPS_FOCAL.available_impls(*inputs[0]):
        if impl == "reference" or (impl == "triton" and device.type == "cpu" and not smoke):
            continue
        fns[impl] = step(lambda *a, impl=impl: ours(*a, impl=impl), inputs)
    if device.type == "cpu" and cpu_extension_available():
        def no_ext(*a):  # the vectorised-PyTorch CPU path (the C++ kernel reported unavailable)
            with mock.patch.object(_OPS_FOCAL, "extension_available_for", lambda t: False):
                return ours(*a, impl="torch")
        fns["torch_no_ext"] = step(no_ext, inputs)
    moved = sum(x.numel() * x.element_size() * 2 + y.numel() * y.element_size() for x, y in inputs)
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)  # reads and writes `moved` bytes in all
    times = time_rounds(fns, device, rounds, min_round_s)
    row = {"batch": batch, "codes": "+".join(str(w) for w in widths), "heads": len(widths),
           "logits_dtype": str(logits_dtype).replace("torch.", ""),
           "target_dtype": str(target_dtype).replace("torch.", "")}
    for name, t in times.items():
        row[f"{name}_ms"] = t * 1e3
        if name not in ("eager", "copy"):
            row[f"{name}_vs_eager"] = times["eager"] / t
    row["bytes_moved"] = moved
    row["copy_GBps"] = 2 * src.numel() / times["copy"] / 1e9
    if "triton" in times:
        row["triton_GBps"] = moved / times["triton"] / 1e9
        row["triton_bw_fraction_of_copy"] = row["triton_GBps"] / row["copy_GBps"]
    return row


def describe(row: dict) -> str:
    parts = [f"{name[:-3]} {row[name]:.3f} ms" + (f" ({row[name[:-3] + '_vs_eager']:.2f}x)"
                                                  if name[:-3] + "_vs_eager" in row else "")
             for name in row if name.endswith("_ms") and name != "copy_ms"]
    return (f"B={row['batch']:3d} L={row['codes']:>9s} {row['logits_dtype']:>8s}/{row['target_dtype']:<7s}: "
            + ", ".join(parts))


def check_gpu_target(rows: list) -> None:
    batch, widths, target = GPU_TARGET
    for r in rows:
        if r["batch"] == batch and r["codes"] == "+".join(map(str, widths)) and "triton_vs_eager" in r:
            verdict = "met" if r["triton_vs_eager"] >= target else "MISSED"
            print(f"target focal loss fwd+bwd ≥ {target}× eager at [{batch}, {widths[0]}], "
                  f"{r['logits_dtype']}/{r['target_dtype']}: ×{r['triton_vs_eager']:.2f} — {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-round-ms", type=float, default=None, help="default 20 (CPU), 10 (CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a loaded machine")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile of the reference")
    parser.add_argument("--smoke", action="store_true",
                        help="[2, 88] on the CPU, 2 short rounds, no compile, Triton interpreted; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.compile, args.rounds, args.min_round_ms = "cpu", False, 2, 1.0
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.min_round_ms is None:
        args.min_round_ms = 10.0 if device.type == "cuda" else 20.0
    logits_dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    compiled_ref = ({False: torch.compile(reference_focal_loss), True: torch.compile(reference_multitask)}
                    if args.compile else None)
    rows = []
    for batch, widths in SMOKE_CASES if args.smoke else (GPU_CASES if device.type == "cuda" else CASES):
        for logits_dtype in logits_dtypes:
            for target_dtype in (torch.float32, torch.bool):
                row = run_case(device, batch, widths, logits_dtype, target_dtype, args.rounds,
                               args.min_round_ms / 1e3, compiled_ref, args.smoke)
                rows.append(row)
                print(describe(row), flush=True)
    if device.type == "cuda":
        check_gpu_target(rows)
    if args.smoke:
        print(f"smoke run: {len(rows)} rows, nothing written")
        return
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
                      f"{args.rounds} interleaved rounds; eager = marn_fast.reference.focal_loss (two heads: "
                      f"reference.multitask_focal_loss), compiled = torch.compile of it, <impl> = "
                      f"marn_fast.ops.focal_loss / multitask_focal_loss(impl=<impl>); torch_no_ext = the "
                      f"vectorised-PyTorch CPU path"}
    out_dir = args.out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "focal_loss.json", json.dumps(meta | {"results": rows}, indent=2) + "\n")
    buf = io.StringIO()
    fields = ["device", "torch", "triton", "date"] + list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: meta[k] for k in fields[:4]} | row)
    write_text_atomic(out_dir / "focal_loss.csv", buf.getvalue())
    print(f"wrote {out_dir}/focal_loss.json and .csv")


if __name__ == "__main__":
    main()
