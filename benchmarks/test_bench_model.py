"""pytest-benchmark suite for the whole model: a training step (forward + loss, backward,
clipping, AdamW) and inference (eval, no_grad), marn_fast.MARN(backend="auto") against the
reference MARN, at sizes that run in seconds on a 2-core CPU. See test_bench_ops.py for how to run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import LABELS_50, LABELS_FULL, Runner, Shape, make_batch, reference_state  # noqa: E402
from test_bench_ops import DEVICE, run  # noqa: E402

SHAPES = {"50-code": Shape("50-code", 2, 128, *LABELS_50), "full-code": Shape("full-code", 2, 128, *LABELS_FULL)}
VARIANT = {"reference": "eager", "fused": "fused"}


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("labels", list(SHAPES))
@pytest.mark.parametrize("impl", list(VARIANT))
def test_model(benchmark, impl, labels, mode):
    shape = SHAPES[labels]
    config = shape.config()
    runner = Runner(VARIANT[impl], config, reference_state(config), DEVICE, "fp32")
    batch = make_batch(shape, DEVICE)
    run(benchmark, f"model {mode} {labels}", impl, runner.call(mode, batch), **shape.describe())
