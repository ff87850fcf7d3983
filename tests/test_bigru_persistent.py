"""The persistent BiGRU (marn_fast.ops.bigru_persistent: CUDA kernels, and their step-exact CPU
twins here) against nn.GRU on a PackedSequence: forward and its own reverse-time backward; the
launch plan and the fall-back to cuDNN; the bounded grid barrier (its protocol is tested on the CPU
by csrc/tests/test_gru.cpp, its timeout setting and the dispatcher's rejection here, its error path
on a GPU below).

Tolerances: float64 1e-10 (only the summation order differs: W_hh in blocks, G_h in one GEMM in
backward); float32 2e-5 relative to the largest value (fp32 state through up to 40 steps);
bf16 inputs (bf16 GEMMs, fp32 recurrence, output rounded to bf16) against the same values in fp32
1e-2. On a GPU (TF32 off): fp32 1e-4 forward and 1e-3 on gradients (up to 32,000 steps); under
bf16 autocast against cuDNN's packed path under the same autocast 3e-2 (both compute their GEMMs
in bf16, 8 significand bits; cuDNN its recurrence too).
"""
import warnings

import pytest
import torch
from torch import nn

from marn_fast.ops import bigru_persistent
from marn_fast.ops.bigru import available_impls, dispatch_candidates, packed_bigru
from marn_fast.ops.bigru_persistent import (
    _gate_rows,
    _slices,
    barrier_timeout_s,
    device_limits,
    fallback_reason,
    launch_plan,
    persistent_bigru,
)
from marn_fast.reference import packed_bigru as reference_bigru


def _case(batch, n, d_in, hidden, seed, dtype=torch.float64, lengths=None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = nn.GRU(d_in, hidden, batch_first=True, bidirectional=True).to(dtype)
    x = torch.randn(batch, n, d_in, generator=g, dtype=dtype, requires_grad=True)
    if lengths is None:
        lengths = torch.randint(1, n + 1, (batch,), generator=g)
        lengths[0] = n
    return gru, x, torch.as_tensor(lengths)


def _close(got, want, rel):
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item() / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch,n,d_in,hidden,slices,lengths", [
    (1, 1, 3, 2, 1, [1]),                 # one document of one token
    (1, 9, 4, 5, 2, [9]),                 # one document
    (4, 11, 5, 7, 3, [11, 1, 6, 10]),     # 7 units over 3 blocks (3, 2, 2 rows per gate)
    (5, 40, 6, 8, 4, None),               # random lengths
    (3, 13, 4, 6, 8, [13, 2, 7]),         # more blocks than some slices can fill
])
def test_matches_packed_nn_gru_forward_and_backward(dtype, rel, batch, n, d_in, hidden, slices, lengths):
    gru, x, lengths = _case(batch, n, d_in, hidden, seed=batch * 31 + n, dtype=dtype, lengths=lengths)
    want = reference_bigru(gru, x, lengths)
    got = persistent_bigru(x, lengths, gru._flat_weights, num_slices=slices)
    assert got.shape == want.shape == (batch, n, 2 * hidden) and got.dtype == dtype
    _close(got, want, rel)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(n), dtype=dtype)
    leaves = [x, *gru.parameters()]
    for w, g in zip(torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
        _close(g, w, rel)


def test_padding_is_zero_and_never_read_and_reverse_starts_at_each_last_token():
    gru, x, lengths = _case(3, 8, 4, 5, seed=7, lengths=[8, 3, 1])
    out = persistent_bigru(x, lengths, gru._flat_weights)
    poisoned = x.detach().clone()
    for b, length in enumerate(lengths.tolist()):
        poisoned[b, length:] = 1e6
    torch.testing.assert_close(persistent_bigru(poisoned, lengths, gru._flat_weights), out, atol=0, rtol=0)
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(out[b, length:] == 0)
    # The reverse direction of document 1 (length 3) at its last token saw only that token: it
    # equals a one-token reverse GRU run on x[1, 2].
    single = persistent_bigru(x[1:2, 2:3], torch.tensor([1]), gru._flat_weights)
    torch.testing.assert_close(out[1, 2, 5:], single[0, 0, 5:], atol=1e-12, rtol=0)


def test_gradient_is_zero_past_lengths():
    gru, x, lengths = _case(2, 6, 3, 4, seed=5, lengths=[6, 2])
    persistent_bigru(x, lengths, gru._flat_weights).pow(2).sum().backward()
    assert torch.all(x.grad[1, 2:] == 0) and torch.any(x.grad[1, :2] != 0)


def test_no_lengths_means_full_documents():
    gru, x, _ = _case(2, 6, 3, 4, seed=3)
    full = torch.full((2,), 6, dtype=torch.int64)
    torch.testing.assert_close(persistent_bigru(x, None, gru._flat_weights),
                               persistent_bigru(x, full, gru._flat_weights), atol=0, rtol=0)


def test_bf16_inputs_use_fp32_state():
    gru, x, lengths = _case(3, 20, 5, 8, seed=9, dtype=torch.float32, lengths=[20, 13, 4])
    xb = x.detach().bfloat16()
    weights = [w.detach().bfloat16() for w in gru._flat_weights]
    got = persistent_bigru(xb, lengths, weights)
    assert got.dtype == torch.bfloat16
    want = persistent_bigru(xb.float(), lengths, [w.float() for w in weights])
    _close(got.float(), want, 1e-2)


def test_slices_cover_every_gate_row_once():
    for hidden, k in ((300, 10), (7, 3), (5, 8)):
        units = [u for block in _slices(hidden, k) for u in block]
        assert units == list(range(hidden))
        rows = torch.cat([_gate_rows(block, hidden) for block in _slices(hidden, k)])
        assert sorted(rows.tolist()) == list(range(3 * hidden))


def test_bad_input():
    gru, x, lengths = _case(2, 5, 3, 4, seed=1)
    with pytest.raises(ValueError, match="weights"):
        persistent_bigru(x, lengths, gru._flat_weights[:4])
    with pytest.raises(ValueError, match="lengths"):
        persistent_bigru(x, torch.tensor([0, 5]), gru._flat_weights)
    with pytest.raises(ValueError, match="num_slices"):
        persistent_bigru(x, lengths, gru._flat_weights, num_slices=0)


# ----------------------------------------------------------------- the CUDA kernels (GPU only)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# (batch, n, hidden): one token; odd h; the model's h = 300; 32,000 steps; a partial last block at
# h = 67 and 301 (on 132 SMs: 2 and 5 units per block, the last block 1); h = 700 takes the forward's
# shared-memory path for W_hh (more rows per block than warps), the others its register path.
CUDA_CASES = [(1, 1, 4), (3, 37, 7), (5, 41, 67), (13, 300, 300), (4, 33, 301), (2, 50, 700), (2, 32000, 64)]


@requires_cuda
def test_cuda_cases_cover_both_weight_paths_and_partial_last_blocks():
    sms = device_limits(torch.device("cuda")).sms
    plans = [launch_plan(batch, hidden, sms) for batch, _, hidden in CUDA_CASES]
    assert {p.register_weights for p in plans} == {True, False}
    assert any(p.units * p.blocks_per_dir > hidden for p, (_, _, hidden) in zip(plans, CUDA_CASES))


@requires_cuda
@pytest.mark.parametrize("batch,n,hidden", CUDA_CASES)
def test_cuda_kernels_match_packed_nn_gru_fp32(no_tf32, batch, n, hidden):
    # fp32 with TF32 off on both sides: 1e-4 of the largest value over up to 32,000 steps.
    gru, x, lengths = _case(batch, n, 5, hidden, seed=n, dtype=torch.float32)
    gru, x = gru.cuda(), x.detach().cuda().requires_grad_()
    lengths = lengths.cuda()
    assert fallback_reason(x, gru._flat_weights, backward=True) is None  # the kernels run, not cuDNN
    want = reference_bigru(gru, x, lengths)
    got = persistent_bigru(x, lengths, gru._flat_weights)
    _close(got, want, 1e-4)
    grad = torch.randn_like(want)
    leaves = [x, *gru.parameters()]
    for w, g in zip(torch.autograd.grad(want, leaves, grad), torch.autograd.grad(got, leaves, grad)):
        _close(g, w, 1e-3)


@requires_cuda
@pytest.mark.parametrize("hidden", [67, 300])
def test_cuda_kernels_under_bf16_autocast_match_cudnn(hidden):
    # Both under autocast: cuDNN's packed path computes in bf16, the persistent kernel its GEMMs in
    # bf16 and its recurrence in fp32 (its output in x's dtype, fp32).
    gru, x, lengths = _case(6, 120, 10, hidden, seed=hidden, dtype=torch.float32, lengths=[120, 1, 77, 119, 3, 60])
    gru, x, lengths = gru.cuda(), x.detach().cuda().requires_grad_(), lengths.cuda()
    assert fallback_reason(x, gru._flat_weights, backward=True) is None
    leaves = [x, *gru.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = packed_bigru(x, lengths, gru._flat_weights)
        got = persistent_bigru(x, lengths, gru._flat_weights)
    assert want.dtype == torch.bfloat16 and got.dtype == torch.float32
    _close(got, want.float(), 3e-2)
    grad = torch.randn(got.shape, device="cuda")
    for w, g in zip(torch.autograd.grad(want.float(), leaves, grad), torch.autograd.grad(got, leaves, grad)):
        assert g.dtype == torch.float32
        _close(g, w.float(), 3e-2)


@requires_cuda
def test_cuda_barrier_timeout_raises_naming_the_cause_and_leaves_the_context_usable(no_tf32):
    # One block of the forward direction never arrives (the ops' fault injection): the others give
    # up after the timeout, every block leaves, the op raises; the next launches run normally.
    g = torch.Generator().manual_seed(12)
    batch, steps, hidden = 3, 20, 64
    gx = torch.randn(2, batch, steps, 3 * hidden, generator=g).cuda()
    w_hh = (torch.randn(2, 3 * hidden, hidden, generator=g) / hidden ** 0.5).cuda()
    b_hh = torch.randn(2, 3 * hidden, generator=g).cuda()
    lengths = torch.tensor([20, 7, 1], device="cuda")
    dout = torch.randn(2, batch, steps, hidden, generator=g).cuda()
    forward = torch.ops.marn_fast.bigru_persistent_forward
    backward = torch.ops.marn_fast.bigru_persistent_backward
    with pytest.raises(RuntimeError, match=r"grid barrier timed out after 0.05 s \(direction 0, step 0: block \d+ "
                                           r"counted \d+ of the \d+ arrivals.*not co-resident"):
        forward(gx, lengths, w_hh, b_hh, steps, 0.05, 0)
    hproc = forward(gx, lengths, w_hh, b_hh, steps)
    want = bigru_persistent._recurrence_forward(gx.cpu(), lengths.cpu(), w_hh.cpu(), b_hh.cpu(), steps, 4)
    _close(hproc.cpu(), want, 1e-4)
    hprev = torch.nn.functional.pad(hproc[:, :, :-1], (0, 0, 1, 0))
    gh = torch.baddbmm(b_hh[:, None], hprev.reshape(2, -1, hidden), w_hh.transpose(1, 2)).view_as(gx)
    last = 2 * launch_plan(batch, hidden, device_limits(gx.device).sms).blocks_per_dir - 1  # a reverse-direction block
    with pytest.raises(RuntimeError, match=r"bigru_persistent_backward: the grid barrier timed out .*direction 1"):
        backward(dout, hprev, gx, gh, lengths, w_hh, steps, 0.05, last)
    twin = bigru_persistent._recurrence_backward(dout.cpu(), hprev.cpu(), gx.cpu(), gh.cpu(), lengths.cpu(),
                                                 w_hh.cpu(), steps, 4)
    for got, ref in zip(backward(dout, hprev, gx, gh, lengths, w_hh, steps), twin):
        _close(got.cpu(), ref, 1e-4)
    torch.cuda.synchronize()


@requires_cuda
def test_cuda_device_limits_are_the_devices():
    props = torch.cuda.get_device_properties(0)
    limits = device_limits(torch.device("cuda", 0))
    assert (limits.sms, limits.smem) == (props.multi_processor_count, props.shared_memory_per_block_optin)
    assert limits.cooperative  # every GPU the project runs on (sm_75 and later) supports cooperative launches


@requires_cuda
def test_cuda_float64_runs_cudnn_in_float64_with_a_warning(monkeypatch):
    monkeypatch.setattr(bigru_persistent, "_WARNED", set())
    gru, x, lengths = _case(3, 9, 4, 6, seed=13, lengths=[9, 4, 1])
    gru, x, lengths = gru.cuda(), x.detach().cuda().requires_grad_(), lengths.cuda()
    assert "persistent" not in available_impls(x, lengths, gru._flat_weights)
    with pytest.warns(RuntimeWarning, match="compute in float32; float64 inputs run cuDNN's packed path in float64"):
        got = persistent_bigru(x, lengths, gru._flat_weights)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, packed_bigru(x, lengths, gru._flat_weights), atol=0, rtol=0)


@requires_cuda
def test_cuda_auto_offers_persistent():
    gru, x, lengths = _case(4, 30, 5, 20, seed=14, dtype=torch.float32)
    gru, x, lengths = gru.cuda(), x.detach().cuda().requires_grad_(), lengths.cuda()
    for train in (True, False):
        assert "persistent" in dispatch_candidates(x, lengths, gru._flat_weights, train)


@requires_cuda
def test_cuda_kernels_match_their_cpu_twins_bf16():
    # bf16 inputs: bf16 GEMMs (the CPU's rounds G_x to bf16, cuBLAS's keeps fp32 output) and an fp32
    # recurrence on both: they agree to bf16's rounding of G_x carried through the steps.
    gru, x, lengths = _case(5, 60, 6, 20, seed=3, dtype=torch.float32, lengths=[60, 1, 33, 59, 12])
    xb, weights = x.detach().bfloat16(), [w.detach().bfloat16() for w in gru._flat_weights]
    cpu = persistent_bigru(xb.requires_grad_(), lengths, weights)
    xc = xb.detach().cuda().requires_grad_()
    gpu = persistent_bigru(xc, lengths.cuda(), [w.cuda() for w in weights])
    _close(gpu.float().cpu(), cpu.float(), 1e-2)
    g = torch.randn(cpu.shape, dtype=torch.float32).bfloat16()
    (dx_cpu,) = torch.autograd.grad(cpu, [xb], g)
    (dx_gpu,) = torch.autograd.grad(gpu, [xc], g.cuda())
    _close(dx_gpu.float().cpu(), dx_cpu.float(), 2e-2)


def test_ops_bigru_routes_persistent_and_rejects_unknown_impl():
    gru, x, lengths = _case(3, 9, 4, 5, seed=11, lengths=[9, 4, 2])
    from marn_fast import ops
    torch.testing.assert_close(ops.bigru(x, lengths, gru._flat_weights, impl="persistent"),
                               persistent_bigru(x, lengths, gru._flat_weights), atol=0, rtol=0)
    with pytest.raises(ValueError, match="impl"):
        ops.bigru(x, lengths, gru._flat_weights, impl="cudnn")


# ----------------------------------------------------------------- fall-back to cuDNN's packed path
@pytest.fixture
def limits(monkeypatch):
    """Forces the launch limits (on the CPU too) and forgets earlier warnings."""
    monkeypatch.setattr(bigru_persistent, "_WARNED", set())

    def force(sms, smem, cooperative=1):
        monkeypatch.setenv(bigru_persistent.LIMITS_ENV, f"sms={sms},smem={smem},cooperative={cooperative}")
    return force


def test_launch_plan_on_an_h100_or_h200():
    # 132 SMs, 227 KiB per block: 5 units per block, 60 blocks per direction, W_hh's 15 rows per
    # block in registers (one per warp); the backward kernel's dG_h (B·3h floats) stops fitting at
    # B = 55 for h = 300.
    plan = launch_plan(16, 300, 132)
    assert (plan.units, plan.blocks_per_dir, plan.register_weights) == (5, 60, True)
    assert plan.forward_smem == 4 * (3 * 5 * 300 + 16 * 300 + 9 * 16 * 5)
    assert plan.backward_smem == 4 * (3 * 300 * 5 + 3 * 16 * 300 + 18 * 16 * 5)
    assert launch_plan(54, 300, 132).backward_smem <= 232448 < launch_plan(55, 300, 132).backward_smem
    # Partial last blocks: h = 301 and 67 leave the last block 1 unit.
    partial = [launch_plan(4, 301, 132), launch_plan(4, 67, 132)]
    assert [(p.units, p.blocks_per_dir) for p in partial] == [(5, 61), (2, 34)]
    # An even number of units gets an odd row stride for the backward's W_hh columns (no bank
    # conflicts): 6 units at h = 300 on 108 SMs take 7 columns.
    assert launch_plan(16, 300, 108).backward_smem == 4 * (3 * 300 * 7 + 3 * 16 * 300 + 18 * 16 * 6)
    # More than one row per warp (6 units: 18 rows) or h > 384: W_hh in shared memory.
    assert not launch_plan(16, 300, 108).register_weights and not launch_plan(2, 1000, 132).register_weights
    assert all(launch_plan(b, h, sms).blocks_per_dir * 2 <= sms for b in (1, 16) for h in (1, 7, 300, 1024)
               for sms in (2, 3, 80, 132))


@pytest.mark.parametrize("train", [True, False])
def test_falls_back_to_packed_with_one_warning_naming_the_reason(limits, train):
    gru, x, lengths = _case(4, 12, 5, 8, seed=21, lengths=[12, 3, 7, 1])
    plan = launch_plan(4, 8, 8)
    limits(sms=8, smem=plan.forward_smem - 1)
    with torch.set_grad_enabled(train):
        with pytest.warns(RuntimeWarning, match=rf"forward kernel needs {plan.forward_smem:,} bytes .*B=4, h=8"):
            got = persistent_bigru(x, lengths, gru._flat_weights)
        want = packed_bigru(x, lengths, gru._flat_weights)
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # it is the packed result
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason
            persistent_bigru(x, lengths, gru._flat_weights)
    if train:
        grad = torch.randn_like(want)
        for g, w in zip(torch.autograd.grad(got, [x, *gru.parameters()], grad),
                        torch.autograd.grad(want, [x, *gru.parameters()], grad)):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_backward_limit_applies_only_when_a_gradient_can_flow(limits):
    gru, x, lengths = _case(3, 9, 4, 6, seed=22, lengths=[9, 5, 2])
    plan = launch_plan(3, 6, 16)
    limits(sms=16, smem=plan.backward_smem - 1)
    assert plan.forward_smem < plan.backward_smem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():  # forward only: the kernel fits, the twin runs
            twin = persistent_bigru(x, lengths, gru._flat_weights)
    with pytest.warns(RuntimeWarning, match="backward kernel needs"):
        fallback = persistent_bigru(x, lengths, gru._flat_weights)
    torch.testing.assert_close(fallback, packed_bigru(x, lengths, gru._flat_weights), atol=0, rtol=0)
    _close(twin, fallback.detach(), 1e-10)


@pytest.mark.parametrize("sms,cooperative,match", [(1, 1, "at least 2 SMs .*this GPU has 1"),
                                                    (132, 0, "cooperative launches")])
def test_falls_back_without_enough_sms_or_cooperative_launch(limits, sms, cooperative, match):
    gru, x, lengths = _case(2, 5, 3, 4, seed=23)
    limits(sms=sms, smem=10 ** 9, cooperative=cooperative)
    with pytest.warns(RuntimeWarning, match=match):
        persistent_bigru(x, lengths, gru._flat_weights)
    assert fallback_reason(x, gru._flat_weights, backward=False) is not None


def test_fallback_reason_names_the_first_kernel_that_does_not_fit(limits):
    gru, x, lengths = _case(2, 5, 3, 4, seed=24)
    assert fallback_reason(x, gru._flat_weights, backward=True) is None  # CPU: no limits unless forced
    assert "persistent" in available_impls(x, lengths, gru._flat_weights)  # the twin always runs on the CPU
    limits(sms=2, smem=10)
    assert fallback_reason(x, gru._flat_weights, backward=True).startswith("its forward kernel needs")


def test_barrier_timeout_setting(monkeypatch):
    monkeypatch.delenv(bigru_persistent.TIMEOUT_ENV, raising=False)
    assert barrier_timeout_s() == 2.0  # the ops' schema default (csrc/ops.cpp)
    monkeypatch.setenv(bigru_persistent.TIMEOUT_ENV, "30")
    assert barrier_timeout_s() == 30.0
    gru, x, lengths = _case(2, 5, 3, 4, seed=26)
    persistent_bigru(x, lengths, gru._flat_weights)  # the CPU kernels take (and range-check) it too
    for bad in ("0", "-1", "soon", "1e9"):
        monkeypatch.setenv(bigru_persistent.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=bigru_persistent.TIMEOUT_ENV):
            persistent_bigru(x, lengths, gru._flat_weights)


def test_bad_limits_variable(monkeypatch):
    monkeypatch.setenv(bigru_persistent.LIMITS_ENV, "sms=8")
    gru, x, lengths = _case(2, 5, 3, 4, seed=25)
    with pytest.raises(ValueError, match=bigru_persistent.LIMITS_ENV):
        persistent_bigru(x, lengths, gru._flat_weights)


@requires_cuda
def test_cuda_fallback_decision_matches_the_kernels_own_check():
    # The largest batch the Python plan admits runs the backward kernel; one more is refused by
    # the kernel's own check (so the Python mirror of its shared-memory formula is exact).
    props = torch.cuda.get_device_properties(0)
    sms, optin = props.multi_processor_count, props.shared_memory_per_block_optin
    hidden = 300
    fits = max(b for b in range(1, 400) if launch_plan(b, hidden, sms).backward_smem <= optin)
    for batch, ok in ((fits, True), (fits + 1, False)):
        z = lambda *shape: torch.randn(*shape, device="cuda")  # noqa: E731
        args = (z(2, batch, 2, hidden), z(2, batch, 2, hidden), z(2, batch, 2, 3 * hidden), z(2, batch, 2, 3 * hidden),
                torch.full((batch,), 2, device="cuda", dtype=torch.int64), z(2, 3 * hidden, hidden), 2)
        if ok:
            torch.ops.marn_fast.bigru_persistent_backward(*args)
            torch.cuda.synchronize()
        else:
            with pytest.raises(RuntimeError, match="bytes of shared memory"):
                torch.ops.marn_fast.bigru_persistent_backward(*args)
