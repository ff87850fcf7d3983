"""Benchmark of the whole RAM: the eager reference module, torch.compile of it, and every
implementation of `marn_fast.ops.ram.ram_forward` that can run here ("extension": the csrc/
block ops; "vendor_conv": cuDNN/oneDNN convolutions with fused BatchNorm/tanh/epilogue passes).

Modes: train (forward + backward, BatchNorm on batch statistics) and eval (forward, no_grad).
h is H^T, a transposed view of [B, n, C] as marn_fast.MARN passes it. Timings are interleaved
(one run of each implementation per round, so load on the machine hits all alike) and the median
over rounds is reported, each ratio = eager median / implementation median, in one process on one
device. fp32 runs with TF32 off (torch.backends.cudnn/cuda.matmul.allow_tf32 = False, for eager
too: the numbers compare exact fp32 with exact fp32); --tf32 leaves PyTorch's defaults.

    python benchmarks/bench_ram.py                      # CPU sizes (B=4, C=600, n=1000, 2000)
    python benchmarks/bench_ram.py --sizes 2,600,512 4,600,500 --no-compile
    python benchmarks/bench_ram.py --device cuda        # B=16, C=600, n=4000 in bf16 and fp32
    python benchmarks/bench_ram.py --smoke              # seconds: tiny CPU shapes, the Triton
                                                        # passes under TRITON_INTERPRET=1; writes nothing

CPU bf16 (default on the CPU; --no-bf16 skips it): the same modules under torch.autocast("cpu",
bfloat16) — eager and every implementation that can compute in bf16 — interleaved with the fp32
rows of the case, each with its ratio against eager fp32 (speedup_vs_eager_fp32) and its
convolutions' rate: conv_gflops = the ten k=3 convolutions' FLOPs (2·3·Σ C_in·C_out per token;
×3 for train) / median, against this CPU's bf16 torch.mm rate at a conv-sized GEMM
[B·n, 3·C]·[3·C, C/2] measured in the same process (mm_ceiling_gflops).

Writes benchmarks/results/<device-slug>/bench_ram.{json,csv} and its manifest (atomically).
The issue-19 GPU target (RAM training ≥ 1.2× eager at B=16, C=600, n=4000, bf16 and fp32) is
checked and printed on CUDA runs.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton: the Triton passes run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from common import write_results  # noqa: E402

from marn_fast.ops import ram as ram_ops  # noqa: E402
from marn_fast.reference.ram import RAM  # noqa: E402

CPU_SIZES = [(4, 600, 1000), (4, 600, 2000)]
GPU_SIZES = [(16, 600, 4000)]
SMOKE_SIZES = [(2, 16, 9)]
GPU_TARGET = 1.2  # issue 19: RAM in training ≥ 1.2× eager


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


def triton_passes_on_cpu(fn):
    """The vendor_conv candidate with its Triton passes forced onto CPU tensors (interpreter)."""
    def run(t):
        with mock.patch.object(ram_ops, "_vendor_uses_triton", lambda x: True):
            return fn(t)
    return run


def under_autocast(fn):
    def run(t):
        with torch.autocast(t.device.type, dtype=torch.bfloat16):
            return fn(t)
    return run


def bf16_implementations(ref_ram: RAM, h: torch.Tensor) -> dict:
    """name@bf16 → (module, callable under bf16 autocast): eager and the impls that take bf16."""
    impls = {"eager@bf16": (copy.deepcopy(ref_ram), None)}
    impls["eager@bf16"] = (impls["eager@bf16"][0], under_autocast(impls["eager@bf16"][0]))
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        names = [n for n in ram_ops.available_impls(ref_ram, h) if n != "reference"]
    for name in names:
        module = copy.deepcopy(ref_ram)
        impls[f"{name}@bf16"] = (module, under_autocast(
            lambda t, m=module, name=name: ram_ops.ram_forward(m, t, impl=name)))
    return impls


def conv_flops(c: int, tokens: int) -> int:
    """FLOPs of the RAM's ten k=3 convolutions over `tokens` tokens (forward)."""
    c2, c3 = c // 2, c // 4
    pairs = [(c, c2), (c2, c2), (c2, c3), (c3, c3), (c3, c3), (c3, c3), (c3, c2), (c2, c2), (c2, c), (c, c)]
    return 2 * 3 * sum(a * b for a, b in pairs) * tokens


def mm_ceiling_gflops(b: int, c: int, n: int, repeat: int = 3) -> float:
    """bf16 torch.mm GFLOP/s at a conv-sized GEMM [B·n, 3·C]·[3·C, C/2] (best of `repeat`)."""
    x, w = torch.randn(b * n, 3 * c).bfloat16(), torch.randn(3 * c, c // 2).bfloat16()
    torch.mm(x, w)
    best = min(timed(lambda: torch.mm(x, w), "cpu") for _ in range(repeat))
    return 2 * b * n * 3 * c * (c // 2) / best / 1e9


def implementations(ref_ram: RAM, h: torch.Tensor, use_compile: bool, smoke: bool) -> dict:
    """name → (module whose train/eval mode is set, callable); eager first."""
    impls = {"eager": (ref_ram, lambda t: ref_ram(t))}
    for name in ram_ops.available_impls(ref_ram, h):
        if name == "reference":
            continue
        module = copy.deepcopy(ref_ram)
        impls[name] = (module, lambda t, m=module, name=name: ram_ops.ram_forward(m, t, impl=name))
    if smoke and h.device.type == "cpu" and "vendor_conv" in impls:
        module = copy.deepcopy(ref_ram)
        impls["vendor_conv[triton]"] = (module, triton_passes_on_cpu(
            lambda t, m=module: ram_ops.ram_forward(m, t, impl="vendor_conv")))
    if use_compile:
        module = copy.deepcopy(ref_ram)
        impls["compiled"] = (module, torch.compile(module))
    return impls


def bench_case(b, c, n, dtype, device, rounds, use_compile, smoke, tf32, bf16=False):
    ref_ram = make_ram(c, dtype, device)
    h = torch.randn(b, n, c, device=device, dtype=dtype).transpose(1, 2)
    impls = implementations(ref_ram, h, use_compile, smoke)
    ceiling = None
    if bf16:
        impls.update(bf16_implementations(ref_ram, h))
        ceiling = mm_ceiling_gflops(b, c, n)
    rows = []
    for mode in ("eval", "train"):
        for module, _ in impls.values():
            module.train(mode == "train")

        def run(f):
            if mode == "eval":
                with torch.no_grad():
                    f(h)
            else:
                x = h.detach().requires_grad_()
                f(x).sum().backward()

        for _, f in impls.values():  # warm-up (compilation, cuDNN plans, Triton kernels, fold cache)
            run(f)
            run(f)
        times = {k: [] for k in impls}
        for _ in range(rounds):
            for k, (_, f) in impls.items():
                times[k].append(timed(lambda: run(f), device))
        eager = statistics.median(times["eager"])
        for k, ts in times.items():
            med = statistics.median(ts)
            impl, _, low = k.partition("@")
            same = statistics.median(times["eager@bf16" if low else "eager"])
            rows.append(dict(mode=mode, impl=impl, B=b, C=c, n=n,
                             dtype="bfloat16 autocast" if low else str(dtype).replace("torch.", ""),
                             median_ms=round(med * 1e3, 3), min_ms=round(min(ts) * 1e3, 3),
                             speedup_vs_eager=round(same / med, 3), rounds=rounds,
                             tf32=bool(tf32) if dtype == torch.float32 and device == "cuda" else None))
            if low:
                flops = conv_flops(c, b * n) * (3 if mode == "train" else 1)
                rows[-1].update(speedup_vs_eager_fp32=round(eager / med, 3),
                                conv_gflops=round(flops / med / 1e9, 1), mm_ceiling_gflops=round(ceiling, 1),
                                share_of_ceiling=round(flops / med / 1e9 / ceiling, 3))
            print(f"{mode:5s} {k:20s} B={b} C={c} n={n} {rows[-1]['dtype']:8s} median {med * 1e3:9.2f} ms "
                  f"min {min(ts) * 1e3:9.2f} ms  ×{same / med:.2f} vs eager"
                  + (f" (×{eager / med:.2f} vs eager fp32, {rows[-1]['conv_gflops']} GFLOP/s)" if low else ""),
                  flush=True)
    return rows


def check_gpu_target(rows: list) -> None:
    for r in rows:
        if r["mode"] == "train" and r["impl"] not in ("eager", "compiled") and (r["B"], r["C"], r["n"]) in GPU_SIZES:
            verdict = "met" if r["speedup_vs_eager"] >= GPU_TARGET else "MISSED"
            print(f"target RAM train ≥ {GPU_TARGET}× eager, {r['impl']} {r['dtype']}: "
                  f"×{r['speedup_vs_eager']:.2f} — {verdict}")


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        b, c, n = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,C,n (e.g. 4,600,500), got {text!r}") from None
    return b, c, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile of the reference")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=None, metavar="B,C,n")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tf32", action="store_true", help="leave TF32 at PyTorch's defaults for fp32 on CUDA")
    parser.add_argument("--no-save", action="store_true", help="print only (A/B runs on a busy machine)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: also time the modules under bf16 autocast (default on)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU shapes, 2 rounds, no compile, Triton passes interpreted; writes nothing")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.compile, args.threads = "cpu", False, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not args.tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.device == "cuda":
        sizes, dtypes, rounds = GPU_SIZES, (torch.bfloat16, torch.float32), args.rounds or 20
    else:
        sizes, dtypes, rounds = CPU_SIZES, (torch.float32,), args.rounds or 7
    if args.smoke:
        sizes, rounds = SMOKE_SIZES, args.rounds or 2
    sizes = args.sizes or sizes
    rows = []
    for b, c, n in sizes:
        for dt in dtypes:
            rows += bench_case(b, c, n, dt, args.device, rounds, args.compile, args.smoke, args.tf32,
                               bf16=args.bf16 and args.device == "cpu" and dt == torch.float32)
    if args.device == "cuda":
        check_gpu_target(rows)
    if args.smoke or args.no_save:
        print(f"{len(rows)} rows, nothing written")
        return
    meta = dict(compile=args.compile, rounds=rounds, tf32=args.tf32 if args.device == "cuda" else None,
                load_average_1_5_15min=os.getloadavg(),
                method="median of interleaved rounds; ratio = eager median / implementation median; "
                       "train = forward + backward of out.sum(), eval = forward under no_grad")
    folder = write_results("bench_ram", rows, meta, device=args.device)
    print(f"wrote {folder}/bench_ram.json and .csv")


if __name__ == "__main__":
    main()
