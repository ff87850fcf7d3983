"""benchmarks/bench_laat_head.py --smoke: tiny shapes, every row checked against the eager head,
nothing written (the full shapes are the lead's to run on a quiet machine)."""
import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

bench = importlib.import_module("bench_laat_head")


def test_smoke_checks_every_row_and_writes_nothing(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--smoke must not write results")

    monkeypatch.setattr(bench, "write_results", refuse)
    bench.main(["--smoke"])
    out = capsys.readouterr().out
    assert "smoke run: nothing written" in out
    for shape in bench.SMOKE_SHAPES:
        for row in ("eager", "layer"):
            for mode in bench.MODES:
                assert any(f"{shape:>9} " in line and f"{row:>8} {mode:>7}:" in line for line in out.splitlines())


def test_smoke_fails_when_a_row_differs_from_eager(monkeypatch):
    real = bench.LabelWiseAttention.forward
    monkeypatch.setattr(bench.LabelWiseAttention, "forward", lambda self, h, lengths=None: real(self, h, None))
    with pytest.raises(SystemExit, match="smoke: layer differs from eager"):
        bench.main(["--smoke"])


def test_the_issues_shapes():
    assert bench.SHAPES == {"plm-icd": (8, 3072, 768, 768, 8921), "laat": (16, 4000, 1024, 512, 8921)}
