"""A small case of the persistent BiGRU, forward and backward, against cuDNN's packed path: the
program scripts/gpu_check.sh runs under compute-sanitizer (racecheck, synccheck, memcheck) and
its dry run on the CPU (the kernels' twins). Two hidden sizes: 7 (scalar refills) and 64
(float4 refills); uneven lengths, one document of length 1. Exit 1 when an error exceeds 1e-4 of
the largest value (fp32, TF32 off).

    python scripts/persistent_check.py [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import sys

import torch

from marn_fast.ops.bigru import packed_bigru
from marn_fast.ops.bigru_persistent import persistent_bigru

TOL = 1e-4


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def check(device: str, hidden: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = torch.nn.GRU(5, hidden, batch_first=True, bidirectional=True).to(device)
    x = torch.randn(3, 37, 5, generator=g).to(device).requires_grad_()
    lengths = torch.tensor([37, 1, 20], device=device)
    weights = gru._flat_weights
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
    device = parser.parse_args().device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    worst = 0.0
    for hidden in (7, 64):
        err = check(device, hidden, seed=hidden)
        worst = max(worst, err)
        print(f"persistent BiGRU on {device}, B=3 n=37 h={hidden}: max relative error {err:.3g} "
              f"(forward and every gradient, bound {TOL:g})", flush=True)
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
