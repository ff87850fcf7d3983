"""Benchmark of the whole RAM: eager reference, torch.compile of the reference, fused (csrc/ ops).

Modes: train (forward + backward, BatchNorm on batch statistics) and eval (forward, no_grad).
h is H^T, a transposed view of [B, n, C] as marn_fast.MARN passes it. Timings are interleaved
(one run of each implementation per round) and the median over rounds is reported, with each
ratio = reference median / implementation median, in one process on one device.

    python benchmarks/bench_ram.py                 # CPU sizes (B=4, C=600, n=1000, 2000)
    python benchmarks/bench_ram.py --no-compile    # skip torch.compile (slow to build on CPU)
    python benchmarks/bench_ram.py --device cuda   # B=16, C=600, n=4000 in bf16 and fp32

Writes benchmarks/results/<device-slug>/bench_ram.{json,csv} (atomically).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import io
import json
import statistics
import time
from pathlib import Path

import torch

from common import device_name, device_slug, write_text_atomic
from marn_fast.ops.ram import ram_forward
from marn_fast.reference.ram import RAM

RESULTS = Path(__file__).resolve().parent / "results"
CPU_SIZES = [(4, 600, 1000), (4, 600, 2000)]
GPU_SIZES = [(16, 600, 4000)]



def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__



def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_ram(channels: int, dtype, device: str) -> RAM:
    torch.manual_seed(0)
    ram = RAM(channels)
    with torch.no_grad():
        for m in ram.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return ram.to(device=device, dtype=dtype)


def bench_case(b, c, n, dtype, device, rounds, use_compile):
    ref_ram = make_ram(c, dtype, device)
    fused_ram = copy.deepcopy(ref_ram)
    h = torch.randn(b, n, c, device=device, dtype=dtype).transpose(1, 2)
    impls = {"eager": lambda t: ref_ram(t), "fused": lambda t: ram_forward(fused_ram, t)}
    if use_compile:
        impls["compiled"] = torch.compile(ref_ram)
    rows = []
    for mode in ("eval", "train"):
        for ram in (ref_ram, fused_ram):
            ram.train(mode == "train")

        def run(f):
            if mode == "eval":
                with torch.no_grad():
                    f(h)
            else:
                x = h.detach().requires_grad_()
                f(x).sum().backward()

        for f in impls.values():  # warm-up (compilation, fold cache)
            run(f)
            run(f)
        times = {k: [] for k in impls}
        for _ in range(rounds):
            for k, f in impls.items():
                times[k].append(timed(lambda: run(f), device))
        eager = statistics.median(times["eager"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(mode=mode, impl=k, B=b, C=c, n=n, dtype=str(dtype).replace("torch.", ""),
                             median_ms=round(med * 1e3, 3), min_ms=round(min(ts) * 1e3, 3),
                             speedup_vs_eager=round(eager / med, 3), rounds=rounds))
            print(f"{mode:5s} {k:8s} B={b} C={c} n={n} {rows[-1]['dtype']:8s} median {med * 1e3:9.2f} ms "
                  f"min {min(ts) * 1e3:9.2f} ms  ×{eager / med:.2f} vs eager", flush=True)
    return rows



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile of the reference")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        cases = [(b, c, n, dt) for b, c, n in GPU_SIZES for dt in (torch.bfloat16, torch.float32)]
        rounds = args.rounds or 20
    else:
        cases = [(b, c, n, torch.float32) for b, c, n in CPU_SIZES]
        rounds = args.rounds or 7
    name = device_name(args.device)
    rows = []
    for b, c, n, dt in cases:
        rows += bench_case(b, c, n, dt, args.device, rounds, args.compile)
    meta = dict(benchmark="bench_ram", device=name, torch=torch.__version__, triton=triton_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                threads=torch.get_num_threads(), compile=args.compile)
    out_dir = RESULTS / device_slug(args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "bench_ram.json", json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["device", "torch", "date"] + list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow(dict(device=name, torch=meta["torch"], date=meta["date"], **r))
    write_text_atomic(out_dir / "bench_ram.csv", buf.getvalue())
    print(f"wrote {out_dir}/bench_ram.json and .csv")


if __name__ == "__main__":
    main()
