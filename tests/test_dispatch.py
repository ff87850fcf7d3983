"""The measured dispatcher (marn_fast.ops.dispatch) on a toy op with known candidates: measurement,
the reference check, the cache file and the validity of its entries, shipped tables, forcing, the
modes, the interpreter rule, the memory budget, the announcement, close calls, and torch.compile."""
from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
import torch

from marn_fast.ops import dispatch
from marn_fast.ops.precision import compute_dtype

SLEEP_S = 0.03


def _slow(x):
    time.sleep(SLEEP_S)
    return x * 2


def _crash(x):
    raise RuntimeError("kernel failed")


TOY_IMPLS = {"reference": lambda x: x * 2, "fast": lambda x: x + x, "slow": _slow, "wrong": lambda x: x * 3,
             "crash": _crash}


def toy(x: torch.Tensor, impl: str = "auto", candidates=tuple(TOY_IMPLS), default: str = "reference", memory=None):
    """y = 2x through one of TOY_IMPLS ("wrong" computes 3x, "crash" raises, "slow" sleeps)."""
    if impl == "auto":
        train = torch.is_grad_enabled() and x.requires_grad
        impl = dispatch.choose(
            "toy", device=x.device, dtype=compute_dtype(x), train=train, sizes={"n": x.shape[0], "c": x.shape[1]},
            candidates=lambda: candidates, default=default,
            trial=lambda: dispatch.autograd_trial(lambda i, t: toy(t, impl=i), [x], train), memory=memory)
    return TOY_IMPLS[impl](x)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test: an empty process state, its own cache file, no shipped table, tuning on."""
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "cache.json"))
    monkeypatch.setenv(dispatch.ENV_MODE, "tune")
    monkeypatch.setenv(dispatch.ENV_INTERPRETED, "1")  # the tests measure under TRITON_INTERPRET=1 too
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
    here = dispatch.measured_with()
    dispatch.write_table(table, "test", {key: {"impl": "slow", "ms": {"slow": 1.0}, "measured_with": here}})
    dispatch.reset()
    toy(x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("slow", "table")
    dispatch.write_table(tmp_path / "cache.json", "test", {key: {"impl": "fast", "measured_with": here}})
    dispatch.reset()
    toy(x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("fast", "cache")  # the user's cache wins
    monkeypatch.setenv(dispatch.ENV_MODE, "off")
    dispatch.reset()
    toy(x)
    assert (_only_choice()["impl"], _only_choice()["source"]) == ("reference", "default")


# ------------------------------------------------------------------ validity
def _stale_variants():
    """(name, how the recorded setup differs from this one)."""
    return [("marn_fast", lambda w: {**w, "marn_fast": "0.0.1"}), ("torch", lambda w: {**w, "torch": "2.0.0"}),
            ("triton", lambda w: {**w, "triton": "0.1" if w["triton"] != "0.1" else None}),
            ("extension", lambda w: {**w, "extension": "src-0000000000000000+torch-2.0.0"}),
            ("threads", lambda w: {**w, "threads": w["threads"] + 1}),
            ("triton_interpret", lambda w: {**w, "triton_interpret": not w["triton_interpret"]}),
            ("old format", lambda w: None)]


@pytest.mark.parametrize("source", ["cache", "table"])
@pytest.mark.parametrize("field,change", _stale_variants(), ids=[v[0] for v in _stale_variants()])
def test_an_entry_measured_with_another_setup_is_measured_anew_and_overwritten(tmp_path, source, field, change):
    """A file entry whose record differs from the running setup in any field (or that has none,
    as the files of older versions) is ignored; the key is measured and the cache entry replaced."""
    x = torch.randn(3, 3)
    key = dispatch.make_key("toy", x.device, x.dtype, False, {"n": 3, "c": 3}).text()
    recorded = change(dispatch.measured_with())
    entry = {"impl": "slow", "ms": {"slow": 0.001}} | ({"measured_with": recorded} if recorded else {})
    path = tmp_path / "cache.json" if source == "cache" else tmp_path / "tables" / f"{dispatch.device_slug()}.json"
    dispatch.write_table(path, "test", {key: entry})
    dispatch.reset()
    toy(x, candidates=("reference", "fast", "slow"))
    row = _only_choice()
    assert row["source"] == "measured" and row["impl"] != "slow"  # "slow" sleeps 30 ms: it never wins a measurement
    assert (field if recorded else "no record") in row["stale"][source]
    written = json.loads((tmp_path / "cache.json").read_text())
    assert written["format"] == dispatch.TABLE_FORMAT
    assert written["entries"][key]["impl"] == row["impl"]
    assert written["entries"][key]["measured_with"] == dispatch.measured_with()
    dispatch.reset()
    toy(x, candidates=("reference", "fast", "slow"))  # the new entry holds here
    assert (_only_choice()["source"], _only_choice()["impl"]) == ("cache", row["impl"])


def test_a_new_extension_build_or_marn_fast_version_invalidates_the_cache(tmp_path, monkeypatch):
    """The record is read afresh at each lookup: an upgrade seen by a later process re-measures."""
    x = torch.randn(3, 3)
    toy(x, candidates=("reference", "fast"))
    assert _only_choice()["source"] == "measured"
    dispatch.reset()
    monkeypatch.setattr(dispatch, "build_identity", lambda: "src-ffffffffffffffff+torch-9.9.9")
    toy(x, candidates=("reference", "fast"))
    row = _only_choice()
    assert row["source"] == "measured" and "extension" in row["stale"]["cache"]
    assert row["measured_with"]["extension"] == "src-ffffffffffffffff+torch-9.9.9"


def test_interpreted_triton_is_never_measured_nor_cached_without_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV_INTERPRETED)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1: interpreted Triton kernels"):
        impl = toy(torch.randn(4, 4), default="fast")
    assert impl is not None and (_only_choice()["impl"], _only_choice()["source"]) == ("fast", "default")
    assert not (tmp_path / "cache.json").exists()


def test_an_entry_measured_under_the_interpreter_is_ignored_in_a_real_run(tmp_path, monkeypatch):
    x = torch.randn(3, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tests' opt-in is set by the fixture
    toy(x, candidates=("reference", "fast"))
    assert dispatch.read_table(tmp_path / "cache.json") and _only_choice()["measured_with"]["triton_interpret"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.reset()
    toy(x, candidates=("reference", "fast"))
    row = _only_choice()
    assert row["source"] == "measured" and "triton_interpret True, here False" in row["stale"]["cache"]


def test_build_identity_is_the_fingerprint_of_the_sources():
    """The loaded extension was built from the csrc/ sources of this checkout against this torch:
    its identity is setup.py's fingerprint of them (tests run after `pip install -e .`)."""
    import runpy
    from pathlib import Path

    from marn_fast.ops import _extension

    identity = _extension.build_identity()
    if identity is None:
        pytest.skip("marn_fast._C is not built")
    setup = runpy.run_path(str(Path(__file__).resolve().parents[1] / "setup.py"), run_name="marn_fast_setup")
    assert identity == f"src-{setup['source_fingerprint']()}+torch-{torch.__version__.split('+')[0]}"
    assert dispatch.measured_with()["extension"] == identity


# ------------------------------------------------------------------ memory
def test_a_candidate_over_the_memory_budget_is_skipped_and_another_oracle_checks(monkeypatch):
    monkeypatch.setenv("MARN_FAST_MEMORY_BUDGET", "1GB")
    needs = {"reference": 18_200_000_000, "fast": 1000, "wrong": 1000, "slow": 2_000_000_000}
    seen = []
    with pytest.warns(RuntimeWarning, match="'wrong' rejected: differs from fast"):
        toy(torch.randn(5, 5), candidates=("reference", "fast", "wrong", "slow"), default="fast",
            memory=lambda impl, dtype: seen.append(dtype) or needs[impl])
    row = _only_choice()
    assert row["skipped"] == {"reference": "needs ~18.2 GB, budget 1.0 GB", "slow": "needs ~2.0 GB, budget 1.0 GB"}
    assert set(row["ms"]) == {"fast"} and row["impl"] == "fast" and "wrong" in row["rejected"]
    assert set(seen) == {torch.float32}  # estimated at the key's (compute) dtype


def test_every_candidate_over_budget_takes_the_least_needing_unmeasured(tmp_path, monkeypatch):
    monkeypatch.setenv("MARN_FAST_MEMORY_BUDGET", "0.000001")  # a fraction of free memory
    needs = {"reference": 10 ** 14, "fast": 10 ** 13, "slow": 10 ** 15}

    def never(impl):
        raise AssertionError("no candidate may run")

    impl = dispatch.choose("toy", device=torch.device("cpu"), dtype=torch.float32, train=False, sizes={"n": 2},
                           candidates=lambda: ("reference", "fast", "slow"), default="reference",
                           trial=lambda: never, memory=lambda i, dtype: needs[i])
    assert impl == "fast" and _only_choice()["source"] == "memory" and len(_only_choice()["skipped"]) == 3
    assert not (tmp_path / "cache.json").exists()  # an unmeasured choice is not cached


@pytest.mark.parametrize("text,expected", [("0.3", ("fraction", 0.3)), ("30%", ("fraction", 0.3)),
                                           ("1", ("fraction", 1.0)), ("6e9", ("bytes", 6e9)),
                                           ("6GB", ("bytes", 6e9)), ("512 MiB", ("bytes", 512 * 2 ** 20))])
def test_memory_budget_values(text, expected):
    from marn_fast.ops import memory

    assert memory.parse_budget(text) == pytest.approx(expected) if isinstance(expected[1], float) else expected


@pytest.mark.parametrize("text", ["-1", "0", "lots", "6 parsecs", "150%"])
def test_bad_memory_budget_names_the_variable(text, monkeypatch):
    monkeypatch.setenv("MARN_FAST_MEMORY_BUDGET", text)
    with pytest.raises(ValueError, match="MARN_FAST_MEMORY_BUDGET"):
        toy(torch.randn(2, 2), memory=lambda impl, dtype: 1)


# ------------------------------------------------------------------ time: the announcement
def test_a_measurement_announces_itself_once_on_stderr(capsys):
    toy(torch.randn(7, 5), candidates=("reference", "fast", "slow"))
    toy(torch.randn(8, 6), candidates=("reference", "fast", "slow"))  # same key: no second line
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"marn_fast dispatch: measuring toy \(infer, float32, n=8,c=8\) among reference, fast, slow "
                        r"… → (reference|fast), [0-9.]+(×| %) faster than \w+; .*slow [0-9.]+ ms; [0-9.]+ s\n",
                        err), err


def test_announcements_go_to_a_sink_as_whole_lines(capsys):
    lines = []
    with dispatch.announcements(lines.append):
        toy(torch.randn(3, 3), candidates=("reference", "fast"), memory=lambda impl, dtype: 10 ** 15 * (impl == "fast"))
    assert capsys.readouterr().err == ""
    (line,) = lines
    assert line.startswith("marn_fast dispatch: measuring toy (infer, float32, n=4,c=4) among reference, fast … ")
    assert "skipped fast: needs ~1000.0 TB" in line and line.endswith(" s")


# ------------------------------------------------------------------ noise: close calls
def test_close_candidates_get_three_interleaved_rounds_past_the_time_budget():
    """With one round and a 1 ms budget, candidates within 25 % of the fastest still get 3
    interleaved rounds each; a contender 3× slower gets only the one; the margin is recorded."""
    naps = {"reference": 0.1, "a": 0.1, "b": 0.104, "far": 0.3}
    calls: list = []
    x = torch.randn(2, 2)

    def trial(impl):
        calls.append(impl)
        time.sleep(naps[impl])
        return [x * 2]

    with dispatch.fresh_measurements(rounds=1, budget_s=1e-3):
        dispatch.choose("toy", device=x.device, dtype=x.dtype, train=False, sizes={"n": 2},
                        candidates=lambda: tuple(naps), default="reference", trial=lambda: trial)
    row = _only_choice()
    close = ("reference", "a", "b")
    assert all(row["rounds"][i] == dispatch.CLOSE_ROUNDS == 3 for i in close), row["rounds"]
    assert row["rounds"]["far"] <= 1
    assert Counter(calls) == {i: 1 + row["rounds"][i] for i in naps}
    timed = [c for c in calls[len(naps):] if c in close]
    assert timed == list(close) * 3  # interleaved: every close candidate once per round
    assert row["impl"] in close and row["runner_up"] in close and 0 <= row["margin"] < 1


def test_margin_is_written_and_shown_by_info(tmp_path):
    from marn_fast import info

    toy(torch.randn(3, 3), candidates=("reference", "slow"))
    row = _only_choice()
    assert row["impl"] == "reference" and row["runner_up"] == "slow" and row["margin"] > 1
    entry = json.loads((tmp_path / "cache.json").read_text())["entries"][row["key"]]
    assert entry["margin"] == pytest.approx(row["margin"], abs=1e-4) and entry["runner_up"] == "slow"
    text = info.format_report(info.collect())
    assert re.search(r"toy .*n=4,c=4 +reference \([0-9.]+× faster than slow\)", text), text


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
    op, a mode and sizes of the key format, an impl that op has, the timings it was chosen from and
    what it was measured with (entries without that record would never be used)."""
    from importlib import import_module

    data = json.loads(path.read_text())
    assert data["entries"] and data["format"] == dispatch.TABLE_FORMAT, path
    assert path.stem == re.sub(r"[^a-z0-9]+", "-", data["device"].split(",")[0].lower()).strip("-")[:60]
    for key, entry in data["entries"].items():
        op, device, dtype, mode, sizes = key.split("|")
        assert device.startswith(data["device"].split(",")[0]) and mode in ("train", "infer"), key
        assert getattr(torch, dtype).is_floating_point and all("=" in s for s in sizes.split(",")), key
        assert entry["impl"] in import_module(f"marn_fast.ops.{OP_IMPLS[op]}").IMPLS, key
        assert entry["ms"][entry["impl"]] == min(entry["ms"].values()), key  # the fastest was chosen
        assert set(entry["measured_with"]) == set(dispatch.measured_with()), key
        assert not entry["measured_with"]["triton_interpret"], key


def _noisy_half(x):
    """A deep op's eager bf16 result: 2x plus a deterministic error of 8 % of max|2x| on one entry."""
    y = torch.matmul(x, torch.eye(x.shape[1], dtype=x.dtype))  # autocast casts the matmul to bf16
    if y.dtype == torch.bfloat16:
        y = y.float()
        y.view(-1)[0] += 0.08 * y.abs().max()
    return 2 * y


def test_half_autocast_checks_candidates_against_the_fp32_reference(monkeypatch):
    """Under bf16 autocast the oracle is the reference run in fp32: a candidate close to it is
    accepted although the eager bf16 reference differs from both by more than the plain 6e-2 check;
    a wrong candidate is still rejected (within 3 × the reference's own error + 0.01 of fp32)."""
    impls = {"reference": _noisy_half, "fast": lambda x: x + x, "wrong": lambda x: x * 4}
    monkeypatch.setitem(TOY_IMPLS, "reference", _noisy_half)
    monkeypatch.setitem(TOY_IMPLS, "wrong", lambda x: x * 4)
    x = torch.randn(7, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(RuntimeWarning, match="rejected"):
            toy(x, candidates=tuple(impls))
    (row,) = [c for c in dispatch.choices() if c["op"] == "toy"]
    assert "fast" in row["ms"] and "fast" not in row["rejected"]
    assert "the reference in fp32" in row["rejected"]["wrong"]
