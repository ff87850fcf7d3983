"""pytest-benchmark suite for the fused ops against their plain-PyTorch references, at sizes that
run in seconds on a 2-core CPU (CUDA when available). Not part of the test suite (testpaths =
["tests"]); run with

    pytest benchmarks/ --benchmark-only --benchmark-json=pytest_benchmark.json
    python benchmarks/report.py --pytest-json pytest_benchmark.json

Each group pairs `reference` with `fused` on the same inputs; report.py turns the medians into
ratios. Backward cases time forward + backward from a fixed random upstream gradient.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import synchronized  # noqa: E402
from common import device_name, device_slug  # noqa: E402

from marn_fast import ops, reference  # noqa: E402
from marn_fast.ops.ram import ram_forward  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("reference", "fused")
ROUNDS = 5


def run(benchmark, group: str, impl: str, fn, **sizes) -> None:
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=device_name(DEVICE), device_slug=device_slug(DEVICE), **sizes)
    benchmark.pedantic(synchronized(fn, DEVICE), rounds=ROUNDS, warmup_rounds=1, iterations=1)


def randn(*shape, generator, scale=1.0, requires_grad=False):
    """A leaf tensor of N(0, scale²) values on DEVICE."""
    return (scale * torch.randn(*shape, generator=generator)).to(DEVICE).requires_grad_(requires_grad)


def lengths_for(batch: int, n: int) -> torch.Tensor:
    """Document 0 full, the others shorter (down to about n/2)."""
    return torch.tensor([n - (b * n) // (2 * batch) for b in range(batch)], device=DEVICE)


def backward_of(forward, grad_out):
    def call():
        forward().backward(grad_out)
    return call


# ------------------------------------------------------------------ label attention (eqs. 12-15)
LA = dict(B=2, n=512, C=600, L=1024)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_label_attention(benchmark, impl, mode):
    g = torch.Generator().manual_seed(0)
    train = mode == "fwd+bwd"
    features = randn(LA["B"], LA["n"], LA["C"], generator=g, requires_grad=train)
    queries, weights = (randn(LA["L"], LA["C"], generator=g, scale=LA["C"] ** -0.5, requires_grad=train)
                        for _ in range(2))
    bias = randn(LA["L"], generator=g, requires_grad=train)
    lengths = lengths_for(LA["B"], LA["n"])
    op = reference.label_attention if impl == "reference" else ops.label_attention
    forward = lambda: op(features, queries, weights, bias, lengths)  # noqa: E731
    if train:
        call = backward_of(forward, randn(LA["B"], LA["L"], generator=g))
    else:
        def call():
            with torch.no_grad():
                forward()
    run(benchmark, f"label_attention {mode}", impl, call, **LA)


# ------------------------------------------------------------------ focal loss (official form)
FL = dict(B=16, L=8921)


@pytest.mark.parametrize("impl", IMPLS)
def test_focal_loss(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    logits = randn(FL["B"], FL["L"], generator=g, requires_grad=True)
    targets = (torch.rand(FL["B"], FL["L"], generator=g) < 0.01).float().to(DEVICE)
    op = reference.focal_loss if impl == "reference" else ops.focal_loss
    run(benchmark, "focal_loss fwd+bwd", impl, lambda: op(logits, targets).backward(), **FL)


# ------------------------------------------------------------------ RAM (paper §3.2)
RAM_SIZE = dict(B=2, C=600, n=512)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("impl", IMPLS)
def test_ram(benchmark, impl, mode):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ram = reference.RAM(RAM_SIZE["C"]).to(DEVICE).train(mode == "train")
    h = randn(RAM_SIZE["B"], RAM_SIZE["C"], RAM_SIZE["n"], generator=g, requires_grad=mode == "train")
    op = ram if impl == "reference" else (lambda x: ram_forward(ram, x))
    if mode == "train":
        call = backward_of(lambda: op(h), randn(*h.shape, generator=g))
    else:
        def call():
            with torch.no_grad():
                op(h)
    run(benchmark, f"ram {mode}", impl, call, **RAM_SIZE)


# ------------------------------------------------------------------ BiGRU (packed semantics)
GRU = dict(B=2, n=256, d_e=100, h=300)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bigru(benchmark, impl, mode):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    gru = nn.GRU(GRU["d_e"], GRU["h"], batch_first=True, bidirectional=True).to(DEVICE)
    x = randn(GRU["B"], GRU["n"], GRU["d_e"], generator=g)  # the embedding is frozen: no input gradient
    lengths = lengths_for(GRU["B"], GRU["n"])
    forward = ((lambda: reference.packed_bigru(gru, x, lengths)) if impl == "reference"
               else (lambda: ops.bigru(x, lengths, gru._flat_weights)))
    if mode == "fwd+bwd":
        call = backward_of(forward, randn(GRU["B"], GRU["n"], 2 * GRU["h"], generator=g))
    else:
        def call():
            with torch.no_grad():
                forward()
    run(benchmark, f"bigru {mode}", impl, call, **GRU)
