"""The measured dispatch through the real ops and the model: every candidate forced in turn through
impl="auto" matches the reference (forward and backward), a measurement rejects no candidate,
the RAM's running statistics move once per call, and MARN(backend="auto") measures, records and
compiles."""
from __future__ import annotations

import copy
import os
import re
from importlib import import_module

import pytest
import torch

from marn_fast import MARN, MARNConfig, reference
from marn_fast.ops import dispatch

# the op modules (marn_fast.ops exports functions of the same names)
bigru_mod, focal_mod, attention_mod, ram_mod = (import_module(f"marn_fast.ops.{name}")
                                                for name in ("bigru", "focal_loss", "label_attention", "ram"))

# fp32 on the CPU; different summation orders (and the interpreter's Triton) stay within these.
ATOL, RTOL = 2e-5, 2e-4


@pytest.fixture(autouse=True)
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_MODE, "tune")
    monkeypatch.setenv(dispatch.ENV_INTERPRETED, "1")  # the tests measure under TRITON_INTERPRET=1 too
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "cache.json"))
    monkeypatch.delenv(dispatch.ENV_FORCE, raising=False)
    monkeypatch.setattr(dispatch, "TABLES_DIR", tmp_path / "no-tables")
    dispatch.reset()
    yield
    dispatch.reset()


def leaf(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).requires_grad_()


def grads_of(out, tensors, seed=5):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


# ------------------------------------------------------------------ one case per op
def attention_case():
    b, n, c, labels = 3, 11, 10, 7
    features = leaf(b, n, c, seed=1)
    q, w = leaf(labels, c, seed=2, scale=c ** -0.5), leaf(labels, c, seed=3, scale=c ** -0.5)
    bias = leaf(labels, seed=4)
    lengths = torch.tensor([11, 5, 1])
    args = (features, q, w, bias, lengths)
    return ("label_attention", attention_mod.available_impls(*args),
            lambda: attention_mod.label_attention(*args), lambda: reference.label_attention(*args),
            [features, q, w, bias])


def focal_case():
    logits = leaf(3, 9, seed=6, scale=2.0)
    targets = (torch.rand(3, 9, generator=torch.Generator().manual_seed(7)) < 0.3).float()
    return ("focal_loss", focal_mod.available_impls(logits, targets),
            lambda: focal_mod.focal_loss(logits, targets), lambda: reference.focal_loss(logits, targets), [logits])


def multitask_case():
    xa, xb = leaf(2, 9, seed=8), leaf(2, 4, seed=9)
    g = torch.Generator().manual_seed(10)
    ya, yb = (torch.rand(2, 9, generator=g) < 0.3).float(), (torch.rand(2, 4, generator=g) < 0.3).float()
    return ("multitask_focal_loss", focal_mod.available_impls(xa, ya),
            lambda: focal_mod.multitask_focal_loss(xa, ya, xb, yb),
            lambda: reference.multitask_focal_loss(xa, ya, xb, yb, 0.7, 0.3), [xa, xb])


def bigru_case():
    torch.manual_seed(11)
    gru = torch.nn.GRU(5, 6, batch_first=True, bidirectional=True)
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(12))
    lengths = torch.tensor([8, 3, 1])
    weights = gru._flat_weights
    candidates = bigru_mod.dispatch_candidates(x, lengths, weights, train=True)
    return ("bigru", candidates, lambda: bigru_mod.bigru(x, lengths, weights),
            lambda: reference.packed_bigru(gru, x, lengths), list(weights))


def ram_case():
    torch.manual_seed(13)
    ram = reference.RAM(8).train()
    h = leaf(2, 8, 9, seed=14)
    return ("ram", ram_mod.available_impls(ram, h), lambda: ram_mod.ram_forward(ram, h), lambda: ram(h),
            [h, *ram.parameters()])


CASES = {"label_attention": attention_case, "focal_loss": focal_case, "multitask_focal_loss": multitask_case,
         "bigru": bigru_case, "ram": ram_case}


def _forced_pairs():
    return [(op, impl) for op, case in CASES.items() for impl in case()[1]]


@pytest.mark.parametrize("op,impl", _forced_pairs())
def test_each_candidate_forced_through_auto_matches_the_reference(op, impl, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_FORCE, f"{op}={impl}")
    name, _, fast, slow, tensors = CASES[op]()
    out = fast()
    (row,) = [c for c in dispatch.choices() if c["op"] == name]
    assert (row["impl"], row["source"]) == (impl, "forced")
    expected = slow()
    torch.testing.assert_close(out.float(), expected.float(), atol=ATOL, rtol=RTOL)
    for got, want in zip(grads_of(out, tensors), grads_of(expected, tensors)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("op", list(CASES))
def test_measurement_rejects_no_candidate(op):
    name, candidates, fast, slow, _ = CASES[op]()
    out = fast()
    (row,) = [c for c in dispatch.choices() if c["op"] == name]
    assert row["source"] == "measured" and row["mode"] == "train"
    assert row["rejected"] == {}
    assert set(row["ms"]) == set(candidates) and row["impl"] in candidates
    torch.testing.assert_close(out.float(), slow().float(), atol=ATOL, rtol=RTOL)


def test_keyed_label_attention_is_measured_under_its_own_key():
    """A keyed call (LAAT's form: keys [B, n, d_k] ≠ the features, unmasked) measures every
    candidate on its own key (d_k among the sizes, beside the unkeyed call's key), rejects none,
    and matches the reference with all five gradients; its memory estimates include the keys."""
    name, _, fast, _, _ = attention_case()
    fast()
    features, q, w, bias = leaf(3, 11, 10, seed=1), leaf(7, 4, seed=2, scale=0.5), leaf(7, 10, seed=3), leaf(7, seed=4)
    keys, lengths = leaf(3, 11, 4, seed=5), torch.tensor([11, 5, 1])
    out = attention_mod.label_attention(features, q, w, bias, lengths, keys=keys, mask=False)
    rows = {tuple(r["sizes"]): r for r in dispatch.choices() if r["op"] == name}
    assert set(rows) == {("B", "n", "C", "L"), ("B", "n", "C", "L", "d_k")}
    row = rows[("B", "n", "C", "L", "d_k")]
    assert row["source"] == "measured" and row["mode"] == "train" and row["rejected"] == {}
    assert set(row["ms"]) == set(attention_mod.available_impls(features, q, w, bias, lengths))
    expected = reference.label_attention(features, q, w, bias, lengths, keys=keys, mask=False)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    tensors = [features, q, w, bias, keys]
    for got, want in zip(grads_of(out, tensors), grads_of(expected, tensors)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for impl in attention_mod.IMPLS[1:]:
        plain = attention_mod.peak_bytes(impl, features, q, True, torch.float32)
        assert attention_mod.peak_bytes(impl, features, q, True, torch.float32, keys) > plain or impl == "reference"


def test_ram_measurement_leaves_running_statistics_to_the_real_call():
    torch.manual_seed(15)
    ram = reference.RAM(8).train()
    twin = copy.deepcopy(ram)
    h = torch.randn(2, 8, 9)
    ram_mod.ram_forward(ram, h)  # measures on a copy, then runs once
    twin(h)
    assert dispatch.choices()[0]["source"] == "measured"
    for (name, a), b in zip(ram.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_bigru_does_not_time_the_quadratic_reference_when_training_long_documents():
    gru = torch.nn.GRU(4, 3, batch_first=True, bidirectional=True)
    n = bigru_mod.QUADRATIC_MAX_N + 1
    x = torch.randn(1, n, 4)
    lengths = torch.tensor([n])
    assert "reference" not in bigru_mod.dispatch_candidates(x, lengths, gru._flat_weights, train=True)
    assert "reference" in bigru_mod.dispatch_candidates(x, lengths, gru._flat_weights, train=False)


# ------------------------------------------------------------------ the model
def tiny_config(**overrides):
    return MARNConfig(vocab_size=40, num_icd=9, num_ccs=4, hidden_size=6, embed_dim=5, dropout=0.0, **overrides)


def tiny_batch():
    g = torch.Generator().manual_seed(16)
    lengths = torch.tensor([10, 6, 3])
    tokens = torch.randint(2, 40, (3, 10), generator=g)
    tokens[torch.arange(10)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths, (torch.rand(3, 9, generator=g) < 0.3).float(), (torch.rand(3, 4, generator=g) < 0.3).float()


def test_model_auto_measures_records_and_matches_the_reference():
    torch.manual_seed(17)
    ref = reference.MARN(tiny_config()).train()
    model = MARN(tiny_config(), backend="auto").train()
    model.load_state_dict(ref.state_dict())
    tokens, lengths, y_icd, y_ccs = tiny_batch()
    loss = model.compute_loss(model(tokens, lengths), y_icd, y_ccs)
    expected = ref.compute_loss(ref(tokens, lengths), y_icd, y_ccs)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    loss.backward(), expected.backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=RTOL, msg=name)
    for (name, a), b in zip(ref.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=name)
    rows = dispatch.choices()
    assert {r["op"] for r in rows} == {"bigru", "ram", "label_attention", "multitask_focal_loss"}
    assert all(r["source"] == "measured" and r["mode"] == "train" and not r["rejected"] for r in rows)
    assert len([r for r in rows if r["op"] == "label_attention"]) == 2  # ICD and CCS heads: two keys


def test_model_compiles_fullgraph_with_the_eager_choices(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_FORCE, "label_attention=gemm,ram=vendor_conv,bigru=split")
    torch.manual_seed(18)
    model = MARN(tiny_config(), backend="auto").eval()
    tokens, lengths, _, _ = tiny_batch()
    with torch.no_grad():
        eager = model(tokens, lengths).icd_logits
        resolved = {(r["op"], r["impl"]) for r in dispatch.choices()}
        monkeypatch.delenv(dispatch.ENV_FORCE)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(allow_rnn=True):  # dynamo refuses nn.GRU modules otherwise
            torch.testing.assert_close(compiled(tokens, lengths).icd_logits, eager, atol=ATOL, rtol=RTOL)
    assert {("label_attention", "gemm"), ("ram", "vendor_conv"), ("bigru", "split")} <= resolved
    assert {(r["op"], r["impl"]) for r in dispatch.choices()} == resolved  # tracing added no new choice


# ------------------------------------------------------------------ memory estimates and the budget
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_every_candidate_has_a_memory_estimate_and_the_reference_needs_most(train):
    """Each op's peak_bytes covers every candidate it offers, at both modes, and ranks the
    materialising reference above the fused paths at a large label attention shape."""
    features, queries = torch.randn(2, 1500, 600), torch.randn(4000, 600)
    needs = {impl: attention_mod.peak_bytes(impl, features, queries, train, torch.float32)
             for impl in attention_mod.IMPLS[1:]}
    assert all(isinstance(v, int) and v > 0 for v in needs.values())
    assert needs["reference"] == 4 * (3 if train else 2) * 2 * 4000 * (1500 + 600)  # S, A (+dS) and V, W ⊙ V (+dV)
    assert max(needs.values()) == needs["reference" if not train else "gemm_saved"]
    assert needs["torch"] < needs["reference"] / 3
    for op, case in CASES.items():
        name, candidates, *_ = case()
        mod = {"label_attention": attention_mod, "bigru": bigru_mod, "ram": ram_mod}.get(op, focal_mod)
        for impl in candidates:
            args = {"label_attention": lambda: (impl, features, queries, train, torch.float32),
                    "bigru": lambda: (impl, torch.randn(2, 9, 5), bigru_case()[4], train, torch.float32),
                    "ram": lambda: (impl, torch.randn(2, 8, 9), train, torch.float32)}.get(
                op, lambda: (impl, [torch.randn(2, 9)], train))()
            assert mod.peak_bytes(*args) > 0, (op, impl)


MEMORY_CHILD = """
import json, sys
from pathlib import Path
import torch
from importlib import import_module
attention = import_module("marn_fast.ops.label_attention")
from marn_fast.ops import dispatch

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

g = torch.Generator().manual_seed(0)
B, n, C, L = 2, 1500, 600, 4000
features = torch.randn(B, n, C, generator=g)
queries, weights = (torch.randn(L, C, generator=g) / C ** 0.5 for _ in range(2))
bias, lengths = torch.randn(L, generator=g), torch.tensor([n, 2 * n // 3])
with torch.no_grad():  # thread pools, GEMM scratch: a first call at a small shape (another key)
    attention.label_attention(features[:, :64], queries[:64], weights[:64], bias[:64], torch.tensor([64, 40]))
    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS:")
    attention.label_attention(features, queries, weights, bias, lengths)
    peak = 1024 * (kib("VmHWM:") - before)
row = [r for r in dispatch.choices() if r["sizes"].get("n") == 2048][0]
print(json.dumps({"peak": peak, "row": row}))
"""


def _first_call(tmp_path, budget: str) -> dict:
    """The first label attention call at [B=2, n=1,500, C=600, L=4,000] (inference) in a fresh
    process as a user runs it (no TRITON_INTERPRET, measuring on): its extra peak RSS and its choice."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_INTERPRETED)}
    env.update({dispatch.ENV_MODE: "tune", dispatch.ENV_CACHE: str(tmp_path / f"cache-{budget}.json"),
                "MARN_FAST_MEMORY_BUDGET": budget, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_first_call_peak_memory_stays_under_a_fifth_of_the_naive_formula_under_a_budget(tmp_path):
    """With a budget of half the naive formula's need, the reference (and every candidate estimated
    over the budget) is not run: the first call peaks at <= 0.2x the naive formula's memory. Without
    a budget (control: the measurement of peak memory sees the reference) it reaches most of it."""
    naive = 4 * 2 * 2 * 4000 * (1500 + 600)  # S and its masked copy [B, L, n], V and W ⊙ V [B, L, C], fp32
    bounded = _first_call(tmp_path, str(naive // 2))
    skipped = bounded["row"]["skipped"]
    assert set(skipped) >= {"reference", "gemm", "gemm_saved"}, bounded["row"]
    assert skipped["reference"] == f"needs ~{naive / 1e6:.1f} MB, budget {naive / 2e6:.1f} MB"
    assert bounded["row"]["impl"] == "torch" and bounded["peak"] <= 0.2 * naive, (bounded["peak"], naive)
    control = _first_call(tmp_path, "1")  # all of the free memory
    assert "reference" in control["row"]["ms"] and control["peak"] >= 0.5 * naive, (control["peak"], naive)


# ------------------------------------------------------------------ measuring before epoch 1
class _Loader:
    """What pretune reads of a DataLoader: its batch_sampler, dataset and collate_fn."""

    def __init__(self, lengths, batch_size, shuffle=True):
        from types import SimpleNamespace

        from marn_fast.data import BucketBatchSampler

        self.batch_sampler = BucketBatchSampler(lengths, batch_size, shuffle=shuffle, seed=3, pool_batches=4)
        self.dataset = list(lengths)
        self.collate_fn = lambda items: SimpleNamespace(lengths=torch.tensor(items))


def _batch_key(lengths, batch):
    return dispatch.bucket(len(batch)), dispatch.bucket(max(lengths[i] for i in batch))


def test_key_batches_cover_every_key_of_every_epoch_and_take_the_longest():
    from marn_fast.training.pretune import key_batches

    g = torch.Generator().manual_seed(19)
    lengths = [int(v) for v in torch.randint(1, 900, (203,), generator=g)] + [3000]
    loader = _Loader(lengths, 16)
    plan = key_batches(loader)
    planned = [_batch_key(lengths, b) for b in plan]
    assert len(planned) == len(set(planned)) and planned == sorted(planned, key=lambda k: (k[1], k[0]))
    # a full batch per length bucket whose top document has 15 shorter ones to fill it
    assert set(planned) >= {(16, dispatch.bucket(n)) for n in sorted(lengths)[15:]}
    for epoch in range(12):  # every full batch of any epoch, and every batch of the first, has a planned key
        for batch in loader.batch_sampler.all_batches(epoch):
            if len(batch) == 16 or epoch == 0:
                assert _batch_key(lengths, batch) in planned, (epoch, len(batch))
    for batch, key in zip(plan, planned):  # each key's batch is its longest: the top of its length bucket
        assert max(lengths[i] for i in batch) == max(n for n in lengths if dispatch.bucket(n) == key[1]) or key[0] < 16
    dev = _Loader(lengths[:40], 32, shuffle=False)  # unshuffled: exactly its own batches
    assert sorted(_batch_key(lengths, b) for b in key_batches(dev)) == sorted(
        {_batch_key(lengths, b) for b in dev.batch_sampler.all_batches()})


@pytest.mark.parametrize("progress", [False, True], ids=["log", "terminal"])
def test_tune_buckets_says_what_it_measures(progress, capsys):
    """Off a terminal: one log line per batch shape, then each measured key's announcement line;
    on one: a bar on stderr, the announcements written above it, nothing in the log."""
    from marn_fast.training.pretune import plan_for, tune_buckets

    lengths = [5, 9, 30, 31, 70, 200, 201, 64]
    loader = _Loader(lengths, 2)
    seen = []

    def step(batch, train):
        x = torch.randn(len(batch.lengths), int(batch.lengths.max()))
        seen.append((tuple(x.shape), train))
        dispatch.choose("toy", device=x.device, dtype=x.dtype, train=train, sizes={"B": x.shape[0], "n": x.shape[1]},
                        candidates=lambda: ("reference", "fast"), default="reference",
                        trial=lambda: lambda impl: [x * 2 if impl == "reference" else x + x])

    log: list = []
    summary = tune_buckets(plan_for([(loader, True)]), step, log.append, progress)
    keys = {(dispatch.bucket(b), dispatch.bucket(n)) for (b, n), _ in seen}
    assert summary["batches"] == len(seen) == len(keys) == summary["measured"]
    err = capsys.readouterr().err
    announcements = [line for line in (err if progress else "\n".join(log)).splitlines()
                     if line.startswith("marn_fast dispatch: measuring toy (train")]
    assert len(announcements) == len(keys)
    if progress:
        assert log == [] and "measuring the dispatch" in err
    else:
        assert [line for line in log if line.startswith("dispatch ")][0].startswith("dispatch 1/")
        batch_lines = [line for line in log if re.match(r"dispatch \d+/\d+: training step at B=\d+, n=\d+", line)]
        assert len(batch_lines) == len(keys)
        assert err == ""
