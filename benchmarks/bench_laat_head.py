"""Benchmark of the LAAT/PLM-ICD label-wise attention head: the plain head, torch.compile of it,
and `marn_fast.nn.LabelWiseAttention(style="laat")`.

The head (aehrc/LAAT's AttentionLayer, PLM-ICD's on RoBERTa token states): keys K = tanh(H·W_aᵀ),
A = softmax over tokens of K·Uᵀ (masked by lengths), logits = Σ_c W ⊙ (A·H) + b. Shapes:
  PLM-ICD: B=8, n=3,072, C=768, d_a=768, L=8,921 (RoBERTa-base states of 6 chunks of 512 tokens)
  LAAT:    B=16, n=4,000, C=1,024, d_a=512, L=8,921 (BiLSTM u=512, MIMIC-III full)
Rows: "eager" (the plain head: `marn_fast.reference.label_attention` with keys, which materialises
S and A [B, L, n]), "compiled" (torch.compile of the same function), "layer" (the module's forward:
the fused op `marn_fast.ops.label_attention` with keys=K, impl="auto", memory linear in n + L).
Modes: fwd (no_grad) and fwd+bwd (gradient of a random weighted sum of the logits w.r.t. H and
every weight). Lengths lie between n/2 and n (document 0 full). Timings run in this process,
interleaved (one run of each row per round); each row holds the best and the median over rounds
and ratio = eager best / row best. Peak memory: CPU — extra peak RSS of one call in a fresh
subprocess per (row, mode, shape) (common.extra_peak_rss_bytes); CUDA —
torch.cuda.max_memory_allocated() − memory_allocated() before the call. CPU in fp32, CUDA in bf16.

    python benchmarks/bench_laat_head.py                      # CPU rows, both shapes, 2 threads
    python benchmarks/bench_laat_head.py --device cuda        # GPU rows (bf16)
    python benchmarks/bench_laat_head.py --smoke              # seconds: tiny shapes, every row checked
                                                              # against eager, no files

Writes benchmarks/results/<device-slug>/laat_head.{json,csv} (atomically); --smoke writes nothing.
The full shapes need tens of GiB on the CPU (eager's S and A are 2 × 4·B·L·n bytes: 1.8 GB at
PLM-ICD's, 4.6 GB at LAAT's, more in backward).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, extra_peak_rss_bytes, write_results  # noqa: E402

from marn_fast.nn import LabelWiseAttention  # noqa: E402
from marn_fast.reference.label_attention import label_attention as reference_label_attention  # noqa: E402

NAME = "laat_head"
SHAPES = {"plm-icd": (8, 3072, 768, 768, 8921), "laat": (16, 4000, 1024, 512, 8921)}  # (B, n, C, d_a, L)
SMOKE_SHAPES = {"tiny": (2, 37, 24, 16, 29), "tiny-wide": (3, 20, 12, 12, 70)}
ROWS = ("eager", "compiled", "layer")
MODES = ("fwd", "fwd+bwd")
SMOKE_TOLERANCE = 1e-4  # fp32, relative to the largest eager logit (the rows compute the same sums)


def plain_head(features, first, second, third_weight, third_bias, lengths):
    """The head as the LAAT code writes it, masked: the eager row (and what torch.compile compiles)."""
    keys = torch.tanh(torch.nn.functional.linear(features, first))
    return reference_label_attention(features, second, third_weight, third_bias, lengths, keys=keys)


def make_inputs(shape, dtype, device, seed=0):
    """(layer, features, lengths, grad): a LAAT head with LAAT's init, random H, lengths in [n/2, n]."""
    batch, n, c, d_a, num_labels = shape
    torch.manual_seed(seed)
    layer = LabelWiseAttention(c, num_labels, style="laat", d_a=d_a).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, c, generator=g).to(device=device, dtype=dtype)
    lengths = torch.randint(n // 2 + 1, n + 1, (batch,), generator=g)
    lengths[0] = n
    grad = torch.randn(batch, num_labels, generator=g).to(device)
    return layer, features, lengths.to(device), grad


def make_call(row, mode, layer, features, lengths, grad, compiled):
    params = [layer.first_linears.weight, layer.second_linears.weight, layer.third_linears.weight,
              layer.third_linears.bias]
    if row == "layer":
        fn = lambda h: layer(h, lengths)  # noqa: E731
    else:
        head = plain_head if row == "eager" else compiled
        fn = lambda h: head(h, *params, lengths)  # noqa: E731
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(features)
        return call
    leaf = features.detach().clone().requires_grad_()

    def call():
        leaf.grad = None
        layer.zero_grad(set_to_none=True)
        fn(leaf).float().backward(grad)
    return call


def _row(name, shape, dtype, threads, row, mode, times, eager_times, peak_bytes, extra=None):
    batch, n, c, d_a, num_labels = shape
    best = min(times)
    return {"shape": name, "B": batch, "n": n, "C": c, "d_a": d_a, "L": num_labels, "dtype": dtype,
            "threads": threads, "impl": row, "mode": mode, "time_best_s": best,
            "time_median_s": statistics.median(times),
            "ratio_vs_eager": min(eager_times) / best if eager_times else None, "peak_bytes": peak_bytes,
            **(extra or {})}


def _fmt(r):
    ratio = f"{r['ratio_vs_eager']:.2f}x" if r["ratio_vs_eager"] else "-"
    peak = f"{r['peak_bytes'] / 2 ** 20:9.1f} MiB" if r["peak_bytes"] is not None else "        -"
    return (f"{r['shape']:>9} B={r['B']} n={r['n']} C={r['C']} d_a={r['d_a']} L={r['L']} {r['dtype']} "
            f"t={r['threads']} {r['impl']:>8} {r['mode']:>7}: {r['time_best_s'] * 1e3:10.1f} ms {ratio:>6} eager  "
            f"peak {peak}")


# --- CPU ------------------------------------------------------------------------------------

def peak_child(spec: dict) -> None:
    """Subprocess body: the extra peak RSS of one call (after a warm-up), printed as JSON."""
    torch.set_num_threads(spec["threads"])
    layer, features, lengths, grad = make_inputs(tuple(spec["shape"]), torch.float32, "cpu")
    compiled = torch.compile(plain_head) if spec["row"] == "compiled" else None
    call = make_call(spec["row"], spec["mode"], layer, features, lengths, grad, compiled)
    print(json.dumps({"peak_bytes": extra_peak_rss_bytes(call)}))


def measure_peak_cpu(row, mode, shape, threads) -> int:
    spec = json.dumps({"row": row, "mode": mode, "shape": list(shape), "threads": threads})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--peak-child", spec], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def bench(args, shapes: dict, smoke: bool) -> list[dict]:
    """Interleaved timing of every row per shape and mode; with smoke, one round, each row checked
    against eager and no peak measurement."""
    device = "cpu" if smoke else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    threads = 1 if smoke else args.threads
    if device == "cpu":
        torch.set_num_threads(threads)
    rows_run = [r for r in ROWS if not ((smoke or args.no_compile) and r == "compiled")]
    compiled = torch.compile(plain_head) if "compiled" in rows_run else None
    results = []
    for name, shape in shapes.items():
        layer, features, lengths, grad = make_inputs(shape, dtype, device)
        if smoke:
            with torch.no_grad():
                outputs = {r: make_call(r, "fwd", layer, features, lengths, grad, compiled)() for r in rows_run}
            scale = max(1.0, outputs["eager"].abs().max().item())
            for r, out in outputs.items():
                error = (out.float() - outputs["eager"].float()).abs().max().item()
                if error > SMOKE_TOLERANCE * scale:
                    raise SystemExit(f"smoke: {r} differs from eager by {error:.3e} at {name} {shape}")
        for mode in MODES:
            calls = {r: make_call(r, mode, layer, features, lengths, grad, compiled) for r in rows_run}
            for call in calls.values():  # warm-up (and compilation)
                call()
            times: dict[str, list[float]] = {r: [] for r in calls}
            for _ in range(1 if smoke else args.repeat):
                for r, call in calls.items():
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    call()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[r].append(time.perf_counter() - start)
            for r in calls:
                peak = None if smoke else (measure_peak_cpu(r, mode, shape, threads) if device == "cpu"
                                           else _cuda_peak(calls[r]))
                results.append(_row(name, shape, str(dtype).replace("torch.", ""), threads if device == "cpu" else None,
                                    r, mode, times[r], times["eager"], peak))
                print(_fmt(results[-1]), flush=True)
    return results


def _cuda_peak(call) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {tuple(SHAPES)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per row")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: tiny CPU shapes, every row checked against eager, writes nothing")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        peak_child(json.loads(args.peak_child))
        return
    if args.smoke:
        bench(args, SMOKE_SHAPES, smoke=True)
        print("\nsmoke run: nothing written")
        return
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; known {tuple(SHAPES)}")
    rows = bench(args, {k: SHAPES[k] for k in args.shapes.split(",")}, smoke=False)
    meta = {"shapes": {k: dict(zip(("B", "n", "C", "d_a", "L"), SHAPES[k])) for k in args.shapes.split(",")},
            "rows": {"eager": "reference.label_attention with keys (plain head)", "compiled": "torch.compile of it",
                     "layer": "marn_fast.nn.LabelWiseAttention(style='laat').forward (the fused op with keys)"},
            "timing": "best and median of interleaved rounds; ratio on the best"}
    folder = write_results(NAME, rows, meta, device=args.device)
    print(f"\nwrote {folder}/{NAME}.{{json,csv}} on {device_name(args.device)}")


if __name__ == "__main__":
    main()
