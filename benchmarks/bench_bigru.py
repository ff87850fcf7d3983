"""Benchmark of the BiGRU encoder: the reference (nn.GRU on a packed sequence), the fused
model's path (`marn_fast.ops.bigru`), nn.GRU on the padded batch without packing (what a
recurrence that ignores lengths would cost; not a valid substitute, a yardstick) and, on CUDA,
the persistent recurrence (`impl="persistent"`, csrc/cuda/gru_cuda.cu).

Modes: fwd (no_grad) and fwd+bwd (gradient of a random weighted sum w.r.t. x and the weights).
Timings are interleaved (one run of each implementation per round); the median over rounds is
reported with ratio = reference median / implementation median, in one process on one device.
On CUDA the run also states the per-step time and an on-chip limit for a persistent kernel:
per step and direction 2·B·h·3h FLOPs (h_{t−1}·W_hhᵀ) and B·h state values exchanged between
the blocks that hold W_hh's slices; at B=16, h=300 that is 8.6 MFLOP (≈0.13 µs at the fp32
rate) but a grid-wide exchange per step, ≈1 µs on current GPUs (barrier plus a round trip to
L2 or distributed shared memory) — so the limit is ≈1 µs per step, n µs per direction.

    python benchmarks/bench_bigru.py                 # CPU: B=4, n=500/2000, h=64 and 300
    python benchmarks/bench_bigru.py --device cuda   # B=16, n=4000, h=300, bf16 and fp32

Writes benchmarks/results/<device-slug>/bigru.{json,csv} (atomically).
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

from marn_fast.ops import cuda_extension_available  # noqa: E402
from marn_fast.ops.bigru import bigru  # noqa: E402
from marn_fast.reference.bigru import packed_bigru  # noqa: E402

NAME = "bigru"
EMBED = 100
CPU_SIZES = [(4, 500, 64), (4, 2000, 64), (4, 500, 300)]  # (B, n, h)
GPU_SIZES = [(16, 4000, 300), (16, 1000, 300)]
MODES = ("fwd", "fwd+bwd")
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


def implementations(x, lengths, gru):
    weights = gru._flat_weights
    impls = {
        "reference": lambda: packed_bigru(gru, x, lengths),
        "fused": lambda: bigru(x, lengths, weights),
        "unpacked": lambda: bigru(x, None, weights),
    }
    if x.is_cuda and cuda_extension_available():  # on the CPU it is a Python loop (a test twin)
        impls["persistent"] = lambda: bigru(x, lengths, weights, impl="persistent")
    return impls


def make_call(fn, mode, leaves, grad):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn()
    else:
        def call():
            for leaf in leaves:
                leaf.grad = None
            (fn() * grad).sum().backward()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    sizes = GPU_SIZES if cuda else CPU_SIZES
    dtypes = (torch.bfloat16, torch.float32) if cuda else (torch.float32,)
    rounds = args.rounds or (10 if cuda else 3)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            x, lengths, gru, grad = make_inputs(size, dtype, args.device)
            impls = implementations(x, lengths, gru)
            for mode in MODES:
                calls = {name: make_call(fn, mode, [x, *gru.parameters()], grad) for name, fn in impls.items()}
                medians = measure(calls, args.device, rounds, warmup=1 if cuda else 0)
                batch, n, hidden = size
                for name, seconds in medians.items():
                    row = {"B": batch, "n": n, "h": hidden, "dtype": str(dtype).replace("torch.", ""),
                           "mode": mode, "impl": name, "time_median_s": seconds,
                           "ratio_vs_reference": medians["reference"] / seconds,
                           "us_per_step": seconds / n * 1e6}
                    if cuda:
                        limit = n * STEP_LIMIT_US * 1e-6 * (1 if mode == "fwd" else 2)
                        row["limit_s"] = limit
                        row["time_over_limit"] = seconds / limit
                    rows.append(row)
                    print(f"B{batch} n{n} h{hidden} {row['dtype']:>8} {mode:>7} {name:>9}: "
                          f"{seconds * 1e3:9.2f} ms  {row['us_per_step']:7.2f} us/step  "
                          f"{row['ratio_vs_reference']:.2f}x reference", flush=True)
    meta = {"embed_dim": EMBED, "timing": "median of interleaved rounds; ratio on the median",
            "step_limit_us": STEP_LIMIT_US if cuda else None, "rounds": rounds}
    folder = write_results(NAME, rows, meta, device=args.device)
    print(f"\nwrote {folder}/{NAME}.{{json,csv}} ({device_name(args.device)})")


if __name__ == "__main__":
    main()
