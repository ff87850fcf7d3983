"""Benchmark of the label-wise attention: eager reference, torch.compile of the reference, fused ops.

Modes: fwd (no_grad) and fwd+bwd (gradient of a random weighted sum w.r.t. O, Q, W, b).
Rows: "eager" (marn_fast.reference), "compiled" (torch.compile of it), "fused" (what impl="auto"
runs: on the CPU the C++ forward and PyTorch-chunk backward, on CUDA the Triton kernels),
"fused-pytorch" (fwd only, CPU: the forward through the PyTorch chunks instead of the C++ kernel),
"gemm" and "gemm_saved" (the GEMM-first impls of marn_fast.ops.label_attention; "gemm_saved"
keeps the forward's scores for the backward, so it differs from "gemm" in fwd+bwd only).
CPU bf16 (--dtypes fp32,bf16): the eager reference and the fused impls under
torch.autocast("cpu", bfloat16), interleaved with the fp32 rows in the same rounds, each with its
ratio against eager fp32 (ratio_vs_eager_fp32) as well as eager bf16 (ratio_vs_eager), and its GEMM
rate: GFLOP/s = the nominal GEMM FLOPs (4·B·n·C·L forward; 12·B·n·C·L more for fwd+bwd, which
"gemm_saved" does in 8) / best time, against this CPU's bf16 torch.mm rate at the op's own GEMM
shape [L, C]·[C, B·n] measured in the same process (mm_ceiling_gflops: the limit).
CPU documents are all full length (every implementation does the same GEMM FLOPs); on the GPU
lengths lie between n/2 and n.
Timings run in this process, interleaved (one run of each implementation per round); each row
holds the best and the median over rounds and ratio = eager best / implementation best (on a
shared CPU the best is the least disturbed run). Peak memory:
  CPU  — extra peak RSS of one call, measured in a fresh subprocess per (implementation, mode,
         size, with a fixed glibc mmap threshold: VmHWM is reset through /proc/self/clear_refs
         after the warm-up, then VmHWM − VmRSS(before the call). The PyTorch chunks' analytic
         working set (4 bytes · 2·LABEL_CHUNK · min(TOKEN_CHUNK, n)) is reported beside it.
  CUDA — torch.cuda.max_memory_allocated() − memory_allocated() before the call.
CUDA part: B=16, n=4,000, C=600, L=8,921 in bf16 (every row, with ratios against eager and
against torch.compile, and peak memory against eager's: the issue's targets are >= 3x eager,
>= 1.3x compile, <= 15 % of eager's peak), sweeps over n (500…32,000) and L (50…70,000),
TFLOP/s (4·B·n·C·L forward, 12·B·n·C·L more for backward) against a bf16 matmul measured in
the same run (triton.testing.do_bench).

    python benchmarks/bench_label_attention.py                  # CPU sizes, threads 1 and 2
    python benchmarks/bench_label_attention.py --no-compile     # skip torch.compile (slow on CPU)
    python benchmarks/bench_label_attention.py --device cuda    # the GPU part
    python benchmarks/bench_label_attention.py --smoke          # seconds: tiny CPU shapes, every
                                                                # row checked against eager, no files

Writes benchmarks/results/<device-slug>/label_attention.{json,csv,png} (atomically); --smoke
writes nothing (its Triton rows run under TRITON_INTERPRET=1 when there is no GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, extra_peak_rss_bytes, write_results  # noqa: E402

from marn_fast.files import atomic_path  # noqa: E402
from marn_fast.ops import label_attention_chunked as chunked  # noqa: E402
from marn_fast.ops.label_attention import available_impls, label_attention  # noqa: E402
from marn_fast.reference.label_attention import label_attention as reference_label_attention  # noqa: E402

NAME = "label_attention"
CPU_SIZES = [(4, 500, 600, 9216), (4, 2000, 600, 2000), (4, 2000, 600, 9000)]  # (B, n, C, L)
SMOKE_SIZES = [(3, 20, 16, 17), (6, 18, 8, 9)]  # per-document groups; one group with padding
GPU_MAIN = (16, 4000, 600, 8921)
GPU_N_SWEEP = [500, 1000, 2000, 4000, 8000, 16000, 32000]
GPU_L_SWEEP = [50, 500, 2000, 8921, 20000, 70000]
IMPLS = ("eager", "compiled", "fused", "fused-pytorch", "triton", "gemm", "gemm_saved")
OP_IMPLS = ("triton", "gemm", "gemm_saved")  # rows that are label_attention(..., impl=<row>)
CPU_IMPLS = ("eager", "compiled", "fused", "fused-pytorch", "gemm", "gemm_saved")
MODES = ("fwd", "fwd+bwd")


def make_inputs(size, dtype, device, seed=0, full_length=False):
    """Random O, Q, W, b and lengths between n/2 and n (document 0 is full), or all n."""
    batch, n, c, num_labels = size
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, c, generator=g)
    queries = torch.randn(num_labels, c, generator=g) / c ** 0.5
    weights = torch.randn(num_labels, c, generator=g) / c ** 0.5
    bias = torch.randn(num_labels, generator=g)
    lengths = torch.randint(n // 2 + 1, n + 1, (batch,), generator=g)
    lengths[0] = n
    if full_length:
        lengths[:] = n
    grad = torch.randn(batch, num_labels, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return [to(t) for t in (features, queries, weights, bias)], lengths.to(device), grad.to(device)


def make_call(impl, mode, tensors, lengths, grad, compiled_reference, bf16=False):
    """One call of `impl` in `mode`; bf16: under torch.autocast("cpu"/"cuda", bfloat16)."""
    call = _make_call(impl, mode, tensors, lengths, grad, compiled_reference)
    if not bf16:
        return call
    device = tensors[0].device.type

    def autocast_call():
        with torch.autocast(device, dtype=torch.bfloat16):
            return call()
    return autocast_call


def _make_call(impl, mode, tensors, lengths, grad, compiled_reference):
    if impl in OP_IMPLS:
        fn = lambda *t: label_attention(*t, impl=impl)  # noqa: E731
    else:
        fn = {"eager": reference_label_attention, "compiled": compiled_reference,
              "fused": lambda *t: label_attention(*t),
              "fused-pytorch": lambda o, q, w, b, lengths: chunked.forward_torch(o, q, w, lengths)[0] + b,
              }[impl]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*tensors, lengths)
        return call
    leaves = [t.detach().clone().requires_grad_() for t in tensors]

    def call():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves, lengths).backward(grad)
    return call


# --- CPU ------------------------------------------------------------------------------------

def peak_child(spec: dict) -> None:
    """Subprocess body: one warm-up call, reset the RSS high-water mark, one measured call."""
    torch.set_num_threads(spec["threads"])
    tensors, lengths, grad = make_inputs(tuple(spec["size"]), torch.float32, "cpu", full_length=True)
    compiled = torch.compile(reference_label_attention) if spec["impl"] == "compiled" else None
    call = make_call(spec["impl"], spec["mode"], tensors, lengths, grad, compiled, spec.get("bf16", False))
    print(json.dumps({"peak_bytes": extra_peak_rss_bytes(call)}))


def measure_peak_cpu(impl, mode, size, threads, bf16=False) -> int:
    spec = json.dumps({"impl": impl, "mode": mode, "size": list(size), "threads": threads, "bf16": bf16})
    # A fixed mmap threshold: every buffer over 128 KiB is mmapped and unmapped when freed, so
    # memory freed by the warm-up is not silently reused from glibc's heap by the measured call.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--peak-child", spec], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


CPU_BF16_IMPLS = ("eager", "fused", "gemm", "gemm_saved")


def mm_ceiling_gflops(size, repeat: int = 3) -> float:
    """bf16 torch.mm GFLOP/s on this CPU at the op's GEMM shape [L, C]·[C, B·n] (best of `repeat`)."""
    batch, n, c, num_labels = size
    a = torch.randn(num_labels, c).bfloat16()
    b = torch.randn(c, batch * n).bfloat16()
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeat))
    return 2 * num_labels * c * batch * n / best / 1e9


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def bench_cpu(args) -> list[dict]:
    rows = []
    impls = [i for i in CPU_IMPLS if not (args.no_compile and i == "compiled")]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            tensors, lengths, grad = make_inputs(size, torch.float32, "cpu", full_length=True)
            compiled = torch.compile(reference_label_attention) if "compiled" in impls else None
            ceiling = mm_ceiling_gflops(size) if "bf16" in args.dtypes else None
            for mode in MODES:
                calls = {}
                if "fp32" in args.dtypes:
                    calls.update({(impl, "float32"): make_call(impl, mode, tensors, lengths, grad, compiled)
                                  for impl in impls if not (impl == "fused-pytorch" and mode != "fwd")})
                if "bf16" in args.dtypes:
                    calls.update({(impl, "bfloat16"): make_call(impl, mode, tensors, lengths, grad, None, bf16=True)
                                  for impl in CPU_BF16_IMPLS})
                for call in calls.values():  # warm-up (and compilation)
                    call()
                times = {key: [] for key in calls}
                for _ in range(args.repeat):
                    for key, call in calls.items():
                        times[key].append(_timed(call))
                for (impl, dtype) in calls:
                    eager = times.get(("eager", dtype), [])
                    extra = {}
                    if dtype == "bfloat16":
                        nominal = (4 if mode == "fwd" else 16) * size[0] * size[1] * size[2] * size[3]
                        extra = {"dtype_how": "torch.autocast('cpu', bfloat16)", "gemm_gflops":
                                 nominal / min(times[(impl, dtype)]) / 1e9, "mm_ceiling_gflops": ceiling}
                        extra["gemm_share_of_ceiling"] = extra["gemm_gflops"] / ceiling
                        fp32_eager = times.get(("eager", "float32"))
                        if fp32_eager:
                            extra["ratio_vs_eager_fp32"] = min(fp32_eager) / min(times[(impl, dtype)])
                    rows.append(_row(size, dtype, threads, impl, mode, times[(impl, dtype)], eager,
                                     measure_peak_cpu(impl, mode, size, threads, dtype == "bfloat16"), extra))
                    if impl == "fused-pytorch" or (impl == "fused" and mode != "fwd" and dtype == "float32"):
                        rows[-1]["fused_working_set_bytes"] = (
                            4 * 2 * chunked.LABEL_CHUNK * min(chunked.TOKEN_CHUNK, size[1]))
                    print(_fmt(rows[-1]), flush=True)
    return rows


def _row(size, dtype, threads, impl, mode, times, eager_times, peak_bytes, extra=None):
    batch, n, c, num_labels = size
    best = min(times)
    return {"B": batch, "n": n, "C": c, "L": num_labels, "dtype": dtype, "threads": threads, "impl": impl,
            "mode": mode, "time_best_s": best, "time_median_s": statistics.median(times),
            "ratio_vs_eager": min(eager_times) / best if eager_times else None, "peak_bytes": peak_bytes,
            **(extra or {})}


def _fmt(row):
    ratio = f"{row['ratio_vs_eager']:.2f}x" if row["ratio_vs_eager"] else "-"
    peak = f"{row['peak_bytes'] / 2 ** 20:8.1f} MiB" if row["peak_bytes"] is not None else "     -"
    tflops = f" {row['tflops']:.1f} TFLOP/s" if row.get("tflops") else ""
    if row.get("gemm_gflops"):
        tflops = (f" {row['gemm_gflops']:.0f} GFLOP/s ({row['gemm_share_of_ceiling']:.0%} of bf16 mm)"
                  + (f"  {row['ratio_vs_eager_fp32']:.2f}x eager fp32" if row.get("ratio_vs_eager_fp32") else ""))
    versus = f"  {row['ratio_vs_compiled']:.2f}x compiled" if row.get("ratio_vs_compiled") else ""
    versus += f"  peak {row['peak_vs_eager']:.1%} of eager's" if row.get("peak_vs_eager") else ""
    return (f"B={row['B']} n={row['n']} C={row['C']} L={row['L']} {row['dtype']} t={row['threads']} "
            f"{row['impl']:>13} {row['mode']:>7}: {row['time_best_s'] * 1e3:9.1f} ms  {ratio:>6} eager  "
            f"peak {peak}{tflops}{versus}")


def bench_smoke(args) -> list[dict]:
    """Tiny CPU shapes, one thread, every row that can run here (Triton ones under the
    interpreter): checks each against eager (fp32, 1e-4 relative) and times one round."""
    torch.set_num_threads(1)
    rows = []
    for size in SMOKE_SIZES:
        tensors, lengths, grad = make_inputs(size, torch.float32, "cpu")
        names = set(available_impls(*tensors, lengths))
        impls = [i for i in IMPLS if i != "compiled" and (i not in OP_IMPLS or i in names)]
        for mode in MODES:
            outputs = {}
            calls = {}
            for impl in impls:
                if impl == "fused-pytorch" and mode != "fwd":
                    continue
                calls[impl] = make_call(impl, mode, tensors, lengths, grad, None)
                with torch.no_grad():
                    outputs[impl] = make_call(impl, "fwd", tensors, lengths, grad, None)()
            times = {}
            for impl, call in calls.items():
                start = time.perf_counter()
                call()
                times[impl] = [time.perf_counter() - start]
            scale = max(1.0, outputs["eager"].abs().max().item())
            for impl in calls:
                error = (outputs[impl] - outputs["eager"]).abs().max().item()
                if error > 1e-4 * scale:
                    raise SystemExit(f"smoke: {impl} differs from eager by {error:.3e} at {size}")
                rows.append(_row(size, "float32", 1, impl, mode, times[impl], times["eager"], None,
                                 {"max_error_vs_eager": error}))
                print(_fmt(rows[-1]), flush=True)
    return rows


# --- CUDA -----------------------------------------------------------------------------------

def _cuda_run(call):
    """(ms, extra peak bytes) of call on the GPU, or (None, None) when it runs out of memory."""
    from triton.testing import do_bench
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return do_bench(call, warmup=5, rep=50), peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def matmul_ceiling_tflops(size: int = 8192) -> float:
    """bf16 TFLOP/s of one square GEMM on this GPU: the ceiling the GEMM-first path works against."""
    from triton.testing import do_bench

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size ** 3 / (do_bench(lambda: a @ a) * 1e-3) / 1e12


def bench_cuda(args) -> tuple[list[dict], dict]:
    matmul_tflops = matmul_ceiling_tflops()
    print(f"bf16 matmul ceiling: {matmul_tflops:.1f} TFLOP/s")
    compiled = None if args.no_compile else torch.compile(reference_label_attention)
    plan = [("main", GPU_MAIN, ("eager", "compiled", "fused", "gemm", "gemm_saved"))]
    plan += [("n-sweep", GPU_MAIN[:1] + (n,) + GPU_MAIN[2:], ("eager", "fused", "gemm")) for n in GPU_N_SWEEP]
    plan += [("L-sweep", GPU_MAIN[:3] + (num_labels,), ("eager", "fused", "gemm")) for num_labels in GPU_L_SWEEP]
    rows = []
    for group, size, impls in plan:
        impls = [i for i in impls if not (compiled is None and i == "compiled")]
        tensors, lengths, grad = make_inputs(size, torch.bfloat16, "cuda")
        batch, n, c, num_labels = size
        for mode in MODES:
            results = {impl: _cuda_run(make_call(impl, mode, tensors, lengths, grad, compiled)) for impl in impls}
            eager_ms, eager_peak = results.get("eager", (None, None))
            compiled_ms = results.get("compiled", (None, None))[0]
            flops = (4 if mode == "fwd" else 16) * batch * n * c * num_labels
            for impl, (ms, peak) in results.items():
                if ms is None:
                    continue
                tflops = flops / (ms * 1e-3) / 1e12
                extra = {"group": group, "tflops": tflops, "fraction_of_matmul": tflops / matmul_tflops,
                         "ratio_vs_compiled": compiled_ms / ms if compiled_ms else None,
                         "peak_vs_eager": peak / eager_peak if eager_peak else None}
                row = _row(size, "bfloat16", None, impl, mode, [ms * 1e-3], [eager_ms * 1e-3] if eager_ms else [],
                           peak, extra)
                rows.append(row)
                print(_fmt(row), flush=True)
    return rows, {"bf16_matmul_tflops": matmul_tflops}


# --- output ---------------------------------------------------------------------------------

def plot(rows, path: Path, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [r for r in rows if r.get("group") in ("n-sweep", "L-sweep") and r["mode"] == "fwd+bwd"]
    table = [r for r in rows if r.get("group") in (None, "main")]
    ncols = 2 + (2 if sweeps else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    labels = sorted({(r["L"], r["threads"] or 0) for r in table})
    for ax, key, title in ((axes[0], "time_best_s", "time (s)"), (axes[1], "peak_bytes", "peak extra memory (MiB)")):
        width = 0.8 / (len(IMPLS) * len(MODES))
        for k, (impl, mode) in enumerate((i, m) for i in IMPLS for m in MODES):
            vals = [next((r[key] for r in table if (r["L"], r["threads"] or 0) == lab and r["impl"] == impl
                          and r["mode"] == mode), 0) or 0 for lab in labels]
            if key == "peak_bytes":
                vals = [v / 2 ** 20 for v in vals]
            ax.bar([x + k * width for x in range(len(labels))], vals, width, label=f"{impl} {mode}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
        ax.set_xticklabels([f"L={lab[0]}" + (f"\n{lab[1]} thr" if lab[1] else "") for lab in labels])
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    for ax, (group, var) in zip(axes[2:], (("n-sweep", "n"), ("L-sweep", "L"))):
        for impl in ("eager", "fused", "gemm"):
            pts = sorted((r[var], r["tflops"]) for r in sweeps if r["group"] == group and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_xlabel(var)
        ax.set_title(f"fwd+bwd TFLOP/s vs {var}")
        ax.legend()
    fig.suptitle(f"label attention — {device}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def summary(rows) -> None:
    print("\nsummary (ratio = eager best time / implementation best time; peak = extra memory)")
    print(f"{'size':<28}{'thr':>4} {'mode':>8} " + "".join(f"{i:>22}" for i in IMPLS))
    keys = dict.fromkeys((r["B"], r["n"], r["C"], r["L"], r["dtype"], r["threads"], r["mode"]) for r in rows
                         if r.get("group") in (None, "main"))
    for key in keys:
        cells = []
        for impl in IMPLS:
            r = next((r for r in rows if (r["B"], r["n"], r["C"], r["L"], r["dtype"], r["threads"], r["mode"]) == key
                      and r["impl"] == impl and r.get("group") in (None, "main")), None)
            cells.append("-" if r is None else
                         f"{r['ratio_vs_eager']:.2f}x {r['peak_bytes'] / 2 ** 20:.0f}MiB" if r["peak_bytes"] is not None
                         else f"{r['ratio_vs_eager']:.2f}x")
        size = f"B{key[0]} n{key[1]} C{key[2]} L{key[3]} {key[4]}"
        print(f"{size:<28}{key[5] or '-':>4} {key[6]:>8} " + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per implementation (CPU)")
    parser.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2],
                        help="CPU thread counts, comma-separated")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"],
                        help="CPU: fp32 and/or bf16 (autocast), comma-separated")
    parser.add_argument("--sizes", type=lambda s: [tuple(int(v) for v in item.split("x")) for item in s.split(",")],
                        default=CPU_SIZES, help="CPU sizes BxNxCxL, comma-separated")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: tiny CPU shapes, every row checked against eager, writes nothing")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_child(json.loads(args.peak_child))
        return
    if args.smoke:
        summary(bench_smoke(args))
        print("\nsmoke run: nothing written")
        return
    if args.device == "cuda":
        rows, meta = bench_cuda(args)
    else:
        rows, meta = bench_cpu(args), {}
    meta.update({"label_chunk": chunked.LABEL_CHUNK, "token_chunk": chunked.TOKEN_CHUNK,
                 "flops_fwd": "4*B*n*C*L", "flops_bwd": "12*B*n*C*L",
                 "timing": "best and median of interleaved rounds; ratio on the best"})
    folder = write_results(NAME, rows, meta, device=args.device)
    plot(rows, folder / f"{NAME}.png", device_name(args.device))
    summary(rows)
    print(f"\nwrote {folder}/{NAME}.{{json,csv,png}}")


if __name__ == "__main__":
    main()
