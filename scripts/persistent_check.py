"""A small case of the persistent BiGRU, forward and backward, against cuDNN's packed path: the
program scripts/gpu_check.sh runs first under `timeout` (a hang shows here, in seconds, before any
test), then under compute-sanitizer (memcheck, racecheck, synccheck); its dry run on the CPU runs
the kernels' twins. Hidden sizes: 7 (scalar state copies), 64 (float4 copies), 67 and 301 (on
132 SMs a last block with 1 unit where the others have 2 and 5: the partial last block), 700 (the
forward kernel's shared-memory path for W_hh; the others hold it in registers); uneven lengths, one
document of length 1. Each line gives the launch plan on this GPU. Exit 1 when an error exceeds
1e-4 of the largest value (fp32, TF32 off).

    python scripts/persistent_check.py [--device cuda|cpu] [--hidden 7,64,67,301,700]
"""
from __future__ import annotations

import argparse
import sys

import torch

from marn_fast.ops.bigru import packed_bigru
from marn_fast.ops.bigru_persistent import device_limits, fallback_reason, launch_plan, persistent_bigru

TOL = 1e-4
# hidden size → tokens: fewer steps for the larger ones (compute-sanitizer is slow).
CASES = {7: 37, 64: 37, 67: 23, 301: 9, 700: 5}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def check(device: str, hidden: int, n: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = torch.nn.GRU(5, hidden, batch_first=True, bidirectional=True).to(device)
    x = torch.randn(3, n, 5, generator=g).to(device).requires_grad_()
    lengths = torch.tensor([n, 1, n // 2 + 1], device=device)
    weights = gru._flat_weights
    reason = fallback_reason(x, weights, backward=True)
    if reason is not None:
        raise SystemExit(f"h={hidden}: the CUDA kernels cannot launch here ({reason})")
    got, want = persistent_bigru(x, lengths, weights), packed_bigru(x, lengths, weights)
    grad = torch.randn(want.shape, generator=g).to(device)
    leaves = [x, *gru.parameters()]
    errors = [relative_error(got, want)]
    errors += [relative_error(a, b) for a, b in zip(torch.autograd.grad(got, leaves, grad),
                                                   torch.autograd.grad(want, leaves, grad))]
    return max(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", default=",".join(map(str, CASES)), help="comma-separated hidden sizes of CASES")
    args = parser.parse_args()
    hidden_sizes = [int(h) for h in args.hidden.split(",")]
    if set(hidden_sizes) - set(CASES):
        parser.error(f"--hidden: expected sizes among {sorted(CASES)}, got {args.hidden!r}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    limits = device_limits(torch.device(args.device))
    worst = 0.0
    for hidden in hidden_sizes:
        n = CASES[hidden]
        plan = ""
        if limits is not None:
            p = launch_plan(3, hidden, limits.sms)
            where = "registers" if p.register_weights else "shared memory"
            plan = (f" [{limits.sms} SMs: {p.units} units per block, {p.blocks_per_dir} blocks per direction, last "
                    f"{hidden - (p.blocks_per_dir - 1) * p.units}; W_hh in {where}]")
        err = check(args.device, hidden, n, seed=hidden)
        worst = max(worst, err)
        print(f"persistent BiGRU on {args.device}, B=3 n={n} h={hidden}: max relative error {err:.3g} "
              f"(forward and every gradient, bound {TOL:g}){plan}", flush=True)
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
