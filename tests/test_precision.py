"""Precision: the ops' compute dtype (ops.precision) and the runs' --precision option
(training.precision, the CLI, the trainer, the manifest)."""
import warnings

import pytest
import torch

from marn_fast.ops import precision as op_precision
from marn_fast.training import TrainConfig
from marn_fast.training import precision as run_precision


def test_compute_dtype_follows_autocast_rules():
    x = torch.randn(2, 3)
    assert op_precision.compute_dtype(x) == torch.float32
    assert op_precision.compute_dtype(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op_precision.compute_dtype(x) == torch.bfloat16
        assert op_precision.compute_dtype(x.double()) == torch.float64  # autocast never casts fp64
        assert op_precision.compute_dtype(torch.arange(3)) == torch.int64
        with op_precision.autocast_off("cpu"):
            assert op_precision.compute_dtype(x) == torch.float32
    assert op_precision.compute_dtype(torch.empty(2, device="meta")) == torch.float32


def test_accumulation_dtype():
    assert op_precision.accumulation_dtype(torch.bfloat16) == torch.float32
    assert op_precision.accumulation_dtype(torch.float64) == torch.float64


def test_cpu_bf16_flags_match_torch():
    flags = op_precision.cpu_bf16_flags()
    assert set(flags) <= {"amx_bf16", "avx512_bf16"}
    assert op_precision.native_bf16() == bool(flags)


def test_resolve_precision():
    assert run_precision.resolve_precision("auto", "cpu") == "fp32"
    assert run_precision.resolve_precision("auto", "cuda") == "bf16"
    assert run_precision.resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        run_precision.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half")


def test_autocast_context():
    x = torch.randn(4, 4)
    with run_precision.autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with run_precision.autocast("cpu", "fp32"), run_precision.autocast("cpu", "auto"):
        assert (x @ x).dtype == torch.float32


def test_emulated_bf16_is_said_once(monkeypatch):
    monkeypatch.setattr(run_precision, "native_bf16", lambda: False)
    monkeypatch.setattr(op_precision, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="emulates bf16"):
        run_precision.resolve_precision("bf16", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_precision.resolve_precision("bf16", "cpu")  # once per process
        run_precision.resolve_precision("fp32", "cpu")


def test_manifest_record():
    record = run_precision.precision_record("bf16", "cpu")
    assert record["resolved"] == "bf16" and record["dtype"] == "bfloat16 autocast"
    assert run_precision.precision_record("auto", "cpu")["dtype"] == "float32"


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "bench-step", "tune"])
def test_every_command_takes_precision(command, tmp_path):
    from marn_fast.cli import build_parser

    args = {"train": ["train", "--data", "synth", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
            "evaluate": ["evaluate", "ckpt.pt"], "predict": ["predict", "ckpt.pt"], "bench-step": ["bench-step"],
            "tune": ["tune", "--shapes", "2x8x5"]}[command]
    assert build_parser().parse_args(args + ["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(args + ["--precision", "fp8"])


def test_train_precision_reaches_the_train_config(tmp_path):
    from marn_fast.cli import _train_settings, build_parser

    base = ["train", "--data", "synth", "--data-dir", str(tmp_path / "data"), "--synth-preset", "test",
            "--out", str(tmp_path / "run")]
    assert _train_settings(build_parser().parse_args(base))[1].precision == "auto"
    assert _train_settings(build_parser().parse_args(base + ["--precision", "bf16"]))[1].precision == "bf16"
