"""The measured dispatcher (marn_fast.ops.dispatch) on a toy op with known candidates: measurement,
the reference check, the cache file, shipped tables, forcing, the modes, and torch.compile."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from marn_fast.ops import dispatch

SLEEP_S = 0.03


def _slow(x):
    time.sleep(SLEEP_S)
    return x * 2


def _crash(x):
    raise RuntimeError("kernel failed")


TOY_IMPLS = {"reference": lambda x: x * 2, "fast": lambda x: x + x, "slow": _slow, "wrong": lambda x: x * 3,
             "crash": _crash}


def toy(x: torch.Tensor, impl: str = "auto", candidates=tuple(TOY_IMPLS), default: str = "reference"):
    """y = 2x through one of TOY_IMPLS ("wrong" computes 3x, "crash" raises, "slow" sleeps)."""
    if impl == "auto":
        train = torch.is_grad_enabled() and x.requires_grad
        impl = dispatch.choose(
            "toy", device=x.device, dtype=x.dtype, train=train, sizes={"n": x.shape[0], "c": x.shape[1]},
            candidates=lambda: candidates, default=default,
            trial=lambda: dispatch.autograd_trial(lambda i, t: toy(t, impl=i), [x], train))
    return TOY_IMPLS[impl](x)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test: an empty process state, its own cache file, no shipped table, tuning on."""
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "cache.json"))
    monkeypatch.setenv(dispatch.ENV_MODE, "tune")
    monkeypatch.delenv(dispatch.ENV_FORCE, raising=False)
    monkeypatch.setattr(dispatch, "TABLES_DIR", tmp_path / "tables")
    dispatch.reset()
    yield
    dispatch.reset()


def _only_choice():
    (row,) = [c for c in dispatch.choices() if c["op"] == "toy"]
    return row


def test_bucket():
    assert [dispatch.bucket(v) for v in (0, 1, 2, 3, 4, 5, 500, 512, 513, 8921)] == [0, 1, 2, 4, 4, 8, 512, 512, 1024,
                                                                                   16384]


def test_measures_picks_fastest_and_rejects_wrong_or_failing(tmp_path):
    x = torch.randn(7, 5)
    with pytest.warns(RuntimeWarning, match="rejected") as record:
        y = toy(x)
    torch.testing.assert_close(y, 2 * x)
    row = _only_choice()
    assert row["source"] == "measured"
    assert row["impl"] in ("reference", "fast")  # both ~µs; "slow" sleeps 30 ms
    assert set(row["rejected"]) == {"wrong", "crash"}
    assert "differs from reference" in row["rejected"]["wrong"]
    assert "kernel failed" in row["rejected"]["crash"]
    assert row["ms"]["slow"] >= 1e3 * SLEEP_S * 0.9
    assert any("'wrong'" in str(w.message) for w in record)
    # written to the cache file, keyed by the bucketed sizes
    entries = json.loads((tmp_path / "cache.json").read_text())["entries"]
    (key,) = entries
    assert key.startswith("toy|") and key.endswith("|float32|infer|n=8,c=8")
    assert entries[key]["impl"] == row["impl"]


def test_choice_fixed_per_key_and_separate_per_mode_and_bucket():
    x = torch.randn(7, 5)
    with pytest.warns(RuntimeWarning):
        toy(x)
    first = _only_choice()["impl"]
    toy(torch.randn(8, 6))  # same bucket: no new measurement, no warning
    assert len(dispatch.choices()) == 1 and _only_choice()["impl"] == first
    with pytest.warns(RuntimeWarning):
        toy(torch.randn(9, 5))  # n bucket 16: a new key
    with pytest.warns(RuntimeWarning):
        toy(torch.randn(7, 5, requires_grad=True)).sum().backward()  # train mode: a new key
    modes = sorted((c["mode"], c["sizes"]["n"]) for c in dispatch.choices())
    assert modes == [("infer", 8), ("infer", 16), ("train", 8)]


def test_train_trial_compares_gradients():
    """A candidate with a right forward but a wrong gradient is rejected in train mode."""
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 5

    TOY_IMPLS["badgrad"] = WrongGrad.apply
    try:
        x = torch.randn(6, 4, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="badgrad"):
            toy(x, candidates=("reference", "fast", "badgrad"))
        assert "badgrad" in _only_choice()["rejected"]
        trial = dispatch.autograd_trial(lambda i, t: toy(t, impl=i), [x], train=True)
        out, grad = trial("fast")
        torch.testing.assert_close(out, 2 * x.detach())
        assert grad.shape == x.shape and not torch.equal(grad, torch.zeros_like(grad))
    finally:
        del TOY_IMPLS["badgrad"]


def test_cache_then_table_then_default(tmp_path, monkeypatch):
    x = torch.randn(3, 3)
    key = dispatch.make_key("toy", x.device, x.dtype, False, {"n": 3, "c": 3}).text()
    table = tmp_path / "tables" / f"{dispatch.device_slug(x.device)}.json"
    dispatch.write_table(table, "test", {key: {"impl": "slow", "ms": {"slow": 1.0}}})
    dispatch.reset()
    toy(x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("slow", "table")
    dispatch.write_table(tmp_path / "cache.json", "test", {key: {"impl": "fast"}})
    dispatch.reset()
    toy(x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("fast", "cache")  # the user's cache wins
    monkeypatch.setenv(dispatch.ENV_MODE, "off")
    dispatch.reset()
    toy(x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("reference", "default")


def test_table_mode_never_measures(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_MODE, "table")
    toy(torch.randn(4, 4), default="slow")
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("slow", "default")
    assert not (tmp_path / "cache.json").exists()


def test_table_entry_for_unavailable_impl_is_ignored(tmp_path):
    x = torch.randn(3, 3)
    key = dispatch.make_key("toy", x.device, x.dtype, False, {"n": 3, "c": 3}).text()
    dispatch.write_table(tmp_path / "cache.json", "test", {key: {"impl": "triton"}})
    dispatch.reset()
    with pytest.warns(RuntimeWarning):
        toy(x)
    assert _only_choice()["source"] == "measured"


def test_forcing(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_FORCE, "other_op=fast, toy=slow")
    toy(torch.randn(2, 2))
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("slow", "forced")
    dispatch.reset()
    monkeypatch.setenv(dispatch.ENV_FORCE, "fast")  # a bare name: every op that has it
    toy(torch.randn(2, 2))
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("fast", "forced")
    dispatch.reset()
    monkeypatch.setenv(dispatch.ENV_FORCE, "toy=triton")
    with pytest.raises(ValueError, match=r"MARN_FAST_IMPL: toy=triton is not available.*reference, fast"):
        toy(torch.randn(2, 2))


def test_bad_mode(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_MODE, "fastest")
    with pytest.raises(ValueError, match="MARN_FAST_DISPATCH: expected one of"):
        toy(torch.randn(2, 2))


def test_unreadable_cache_warns_and_measures(tmp_path):
    (tmp_path / "cache.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable table"):
        toy(torch.randn(2, 2), candidates=("reference", "fast"))
    assert _only_choice()["source"] == "measured"
    json.loads((tmp_path / "cache.json").read_text())  # rewritten whole


def test_unwritable_cache_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(dispatch.ENV_CACHE, str(blocker / "cache.json"))  # a folder that is a file
    with pytest.warns(RuntimeWarning, match="could not write the cache"):
        toy(torch.randn(2, 2), candidates=("reference", "fast"))
    assert _only_choice()["source"] == "measured"


def test_all_candidates_failing_falls_back_to_default():
    def failing(impl):
        raise RuntimeError(f"{impl} failed")

    with pytest.warns(RuntimeWarning, match="no candidate of toy ran"):
        impl = dispatch.choose("toy", device=torch.device("cpu"), dtype=torch.float32, train=False,
                               sizes={"n": 2}, candidates=lambda: ("crash", "fast"), default="fast",
                               trial=lambda: failing)
    assert impl == "fast"
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("fast", "default")


def test_default_must_be_a_candidate():
    with pytest.raises(ValueError, match="default impl 'triton' is not among"):
        toy(torch.randn(2, 2), default="triton")


def test_torch_compile_fullgraph_uses_the_eager_choice(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_FORCE, "toy=fast")
    x = torch.randn(4, 3)
    toy(x)  # resolved eagerly first
    monkeypatch.delenv(dispatch.ENV_FORCE)
    compiled = torch.compile(lambda t: toy(t) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), 2 * x + 1)
    assert [c["impl"] for c in dispatch.choices()] == ["fast"]


def test_torch_compile_without_eager_resolution_uses_default():
    compiled = torch.compile(lambda t: toy(t, candidates=("reference", "fast"), default="fast"), fullgraph=True,
                             backend="eager")
    x = torch.randn(4, 3)
    torch.testing.assert_close(compiled(x), 2 * x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("fast", "default")


SHIPPED_TABLES = sorted(dispatch.TABLES_DIR.glob("*.json"))
OP_IMPLS = {"label_attention": "label_attention", "bigru": "bigru", "ram": "ram", "focal_loss": "focal_loss",
            "multitask_focal_loss": "focal_loss"}


@pytest.mark.parametrize("path", SHIPPED_TABLES, ids=[p.stem for p in SHIPPED_TABLES])
def test_shipped_tables_name_known_ops_impls_and_keys(path):
    """Every shipped table (package data: installed with the package) parses, and each entry names an
    op, a mode and sizes of the key format, an impl that op has, and the timings it was chosen from."""
    from importlib import import_module

    data = json.loads(path.read_text())
    assert data["entries"], path
    assert path.stem == re.sub(r"[^a-z0-9]+", "-", data["device"].split(",")[0].lower()).strip("-")[:60]
    for key, entry in data["entries"].items():
        op, device, dtype, mode, sizes = key.split("|")
        assert device.startswith(data["device"].split(",")[0]) and mode in ("train", "infer"), key
        assert getattr(torch, dtype).is_floating_point and all("=" in s for s in sizes.split(",")), key
        assert entry["impl"] in import_module(f"marn_fast.ops.{OP_IMPLS[op]}").IMPLS, key
        assert entry["ms"][entry["impl"]] == min(entry["ms"].values()), key  # the fastest was chosen
