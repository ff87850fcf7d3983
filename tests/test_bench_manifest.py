"""Benchmark results get a manifest beside them, from marn_fast.training.manifest.environment."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402


def test_write_results_writes_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    folder = common.write_results("demo_bench", [{"n": 1, "seconds": 0.5}], {"shapes": "B=1"}, device="cpu")
    assert sorted(p.name for p in folder.iterdir()) == ["demo_bench.csv", "demo_bench.json", "demo_bench.manifest.json"]
    manifest = json.loads((folder / "demo_bench.manifest.json").read_text())
    result = json.loads((folder / "demo_bench.json").read_text())
    assert manifest["kind"] == "benchmark" and manifest["results"] == ["demo_bench.json", "demo_bench.csv"]
    assert manifest["settings"] == {"shapes": "B=1"} and manifest["device_name"] == result["environment"]["device"]
    assert manifest["versions"]["torch"] == result["environment"]["torch"]
    for key in ("marn_fast", "triton", "cuda", "cudnn", "python"):
        assert key in manifest["versions"]
    if manifest["commit"]:
        assert manifest["commit"].startswith(result["environment"]["commit"])
