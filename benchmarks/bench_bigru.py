"""Benchmark of the BiGRU candidates (`marn_fast.ops.bigru`, every impl that `available_impls`
lists on the inputs) against the baseline: cuDNN's packed path ("packed") on CUDA, the packed
reference on the CPU. On CUDA that is reference, split, packed, cudnn_persistent and, where its
launch fits, persistent (csrc/cuda/gru_cuda.cu).

Modes: fwd (no_grad) and fwd+bwd (gradient of a random weighted sum w.r.t. x and the weights).
Timings are interleaved (one run of each implementation per round); the median over rounds is
reported with ratio = baseline median / implementation median, in one process on one device.
On CUDA the run also states the per-step time and an on-chip limit for a persistent kernel:
per step and direction 2·B·h·3h FLOPs (h_{t−1}·W_hhᵀ) and B·h state values exchanged between
the blocks that hold W_hh's slices; at B=16, h=300 that is 8.6 MFLOP (≈0.13 µs at the fp32
rate) but a grid-wide exchange per step, ≈1 µs on current GPUs (barrier plus a round trip to
L2 or distributed shared memory) — so the limit is ≈1 µs per step, n µs per direction. It also
records which CUDA kernels each cuDNN candidate ran (a persistent cuDNN kernel has "persist" in
its name), from one profiled forward call.

    python benchmarks/bench_bigru.py                 # CPU: B=4, n=500/2000, h=64 and 300
    python benchmarks/bench_bigru.py --device cuda   # B=16, n=1000/4000, h=300, bf16 and fp32
    python benchmarks/bench_bigru.py --device cuda --impls packed,persistent --name bigru_persistent
    python benchmarks/bench_bigru.py --device cuda --sizes 16x4000x300 --dtypes bf16 --rounds 5
    python benchmarks/bench_bigru.py --smoke         # tiny, CPU, one round, writes nothing

bf16 rows give the inputs and weights in bf16 (every impl computes from bf16 tensors); the model's
training runs fp32 weights under bf16 autocast instead (benchmarks/bench_model.py).

Writes benchmarks/results/<device-slug>/<name>.{json,csv} (atomically; name defaults to bigru).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results  # noqa: E402

from marn_fast.ops.bigru import available_impls, bigru  # noqa: E402

NAME = "bigru"
EMBED = 100
CPU_SIZES = [(4, 500, 64), (4, 2000, 64), (4, 500, 300)]  # (B, n, h)
GPU_SIZES = [(16, 1000, 300), (16, 4000, 300)]
SMOKE_SIZES = [(2, 16, 8)]
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
STEP_LIMIT_US = 1.0  # the per-step exchange estimate of the docstring


def make_inputs(size, dtype, device, seed=0):
    batch, n, hidden = size
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = torch.nn.GRU(EMBED, hidden, batch_first=True, bidirectional=True).to(device, dtype)
    x = torch.randn(batch, n, EMBED, generator=g).to(device, dtype).requires_grad_()
    lengths = torch.randint(n // 2, n + 1, (batch,), generator=g)
    lengths[0] = n
    grad = torch.randn(batch, n, 2 * hidden, generator=g).to(device, dtype)
    return x, lengths.to(device), gru, grad


def make_call(impl, x, lengths, weights, mode, leaves, grad):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                bigru(x, lengths, weights, impl=impl)
    else:
        def call():
            for leaf in leaves:
                leaf.grad = None
            (bigru(x, lengths, weights, impl=impl) * grad).sum().backward()
    return call


def measure(calls: dict, device: str, rounds: int, warmup: int) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in calls}
    for _ in range(warmup):
        for call in calls.values():
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cuda_kernels(call, top: int = 4) -> list:
    """Names of the CUDA kernels that take most of one call's device time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [e.key[:120] for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--impls", default=None, help="comma-separated subset of the candidates (default: all "
                        "available); the baseline always runs")
    parser.add_argument("--name", default=NAME, help="results file name (default bigru)")
    parser.add_argument("--sizes", default=None, help="comma-separated BxNxH (default: the device's sizes)")
    parser.add_argument("--dtypes", default=None, help="comma-separated of bf16, fp32 (default: both on CUDA, "
                        "fp32 on the CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, one round, write nothing")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cuda = device == "cuda"
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES if cuda else CPU_SIZES
    if args.sizes:
        try:
            sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
            if any(len(size) != 3 or min(size) < 1 for size in sizes):
                raise ValueError
        except ValueError:
            parser.error(f"--sizes: expected comma-separated BxNxH with positive sizes, got {args.sizes!r}")
    dtypes = (torch.bfloat16, torch.float32) if cuda or args.smoke else (torch.float32,)
    if args.dtypes:
        unknown = set(args.dtypes.split(",")) - set(DTYPES)
        if unknown:
            parser.error(f"--dtypes: expected values in {sorted(DTYPES)}, got {sorted(unknown)}")
        dtypes = tuple(DTYPES[name] for name in args.dtypes.split(","))
    rounds = 1 if args.smoke else args.rounds or (10 if cuda else 3)
    baseline = "packed" if cuda else "reference"
    wanted = None if args.impls is None else set(args.impls.split(",")) | {baseline}
    rows, kernels = [], {}
    for size in sizes:
        for dtype in dtypes:
            x, lengths, gru, grad = make_inputs(size, dtype, device)
            weights = gru._flat_weights
            impls = [i for i in available_impls(x, lengths, weights) if wanted is None or i in wanted]
            if wanted and wanted - set(impls):
                print(f"not available here: {sorted(wanted - set(impls))}", flush=True)
            for mode in MODES:
                calls = {impl: make_call(impl, x, lengths, weights, mode, [x, *gru.parameters()], grad)
                         for impl in impls}
                medians = measure(calls, device, rounds, warmup=0 if args.smoke else 1)
                batch, n, hidden = size
                for impl, seconds in medians.items():
                    row = {"B": batch, "n": n, "h": hidden, "dtype": str(dtype).replace("torch.", ""),
                           "mode": mode, "impl": impl, "time_median_s": seconds,
                           "ratio_vs_baseline": medians[baseline] / seconds, "us_per_step": seconds / n * 1e6}
                    if cuda:
                        limit = n * STEP_LIMIT_US * 1e-6 * (1 if mode == "fwd" else 2)
                        row["limit_s"] = limit
                        row["time_over_limit"] = seconds / limit
                    rows.append(row)
                    print(f"B{batch} n{n} h{hidden} {row['dtype']:>8} {mode:>7} {impl:>16}: "
                          f"{seconds * 1e3:9.2f} ms  {row['us_per_step']:7.2f} us/step  "
                          f"{row['ratio_vs_baseline']:.2f}x {baseline}", flush=True)
            if cuda and size == sizes[-1]:
                for impl in ("packed", "cudnn_persistent"):
                    if impl in impls:
                        names = cuda_kernels(make_call(impl, x, lengths, weights, "fwd", [], grad))
                        kernels[f"{impl} {str(dtype).replace('torch.', '')}"] = names
                        print(f"  kernels of {impl}: {names}", flush=True)
    if args.smoke:
        print(f"smoke: {len(rows)} rows, nothing written")
        return
    meta = {"embed_dim": EMBED, "timing": "median of interleaved rounds; ratio on the median",
            "baseline": baseline, "step_limit_us": STEP_LIMIT_US if cuda else None, "rounds": rounds,
            "cuda_kernels_of_one_forward": kernels}
    folder = write_results(args.name, rows, meta, device=device)
    print(f"\nwrote {folder}/{args.name}.{{json,csv}} ({device_name(device)})")


if __name__ == "__main__":
    main()
