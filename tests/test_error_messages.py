"""Every TORCH_CHECK of the compiled ops that formats a number shows it when reached from Python.

A build whose extension carries its own static libstdc++ loses the numbers (g++ 12) or crashes
(g++ 13, the H200 run's SIGSEGV) exactly when a message formats one (tests/test_build.py shows
why). So each case calls an op through `torch.ops.marn_fast` with bad arguments and asserts the
digits of its message ("got 7", "[2, 5, 4]"). All cases of a device run in one child process,
which reports each result as it goes: a crash fails the case it happened in (and those after it)
instead of taking the test session down. CUDA cases run where a GPU is visible.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marn_fast.ops import cpu_extension_available

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="marn_fast._C not built")

OPS = torch.ops.marn_fast
B, N, C_IN, C_MID, C_OUT = 2, 5, 4, 3, 3


def _r(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------- RAM
def _eval_args(device, **change):
    args = dict(x=_r(B, N, C_IN, device=device), w1=_r(C_MID, C_IN, 3, device=device), b1=_r(C_MID, device=device),
                w2=_r(C_OUT, C_MID, 3, device=device), b2=_r(C_OUT, device=device), other=None, epilogue=0)
    args.update(change)
    return list(args.values())


def _eval_backward_args(device, **change):
    args = dict(grad=_r(B, N, C_OUT, device=device), x=_r(B, N, C_IN, device=device),
                w1=_r(C_MID, C_IN, 3, device=device), y1=_r(B, N, C_MID, device=device),
                w2=_r(C_OUT, C_MID, 3, device=device), v2=_r(B, N, C_OUT, device=device), other=None, epilogue=0)
    args.update(change)
    return list(args.values())


def _train_args(device, **change):
    args = dict(x=_r(B, N, C_IN, device=device), w1=_r(C_MID, C_IN, 3, device=device),
                gamma1=_r(C_MID, device=device), beta1=_r(C_MID, device=device),
                w2=_r(C_OUT, C_MID, 3, device=device), gamma2=_r(C_OUT, device=device),
                beta2=_r(C_OUT, device=device), other=None, epilogue=0, eps1=1e-5, eps2=1e-5)
    args.update(change)
    return list(args.values())


def _train_backward_args(device, **change):
    b, n = change.pop("b", B), change.pop("n", N)
    args = dict(grad=_r(b, n, C_OUT, device=device), x=_r(b, n, C_IN, device=device),
                w1=_r(C_MID, C_IN, 3, device=device), gamma1=_r(C_MID, device=device),
                z1=_r(b, n, C_MID, device=device), y1=_r(b, n, C_MID, device=device),
                mean1=_r(C_MID, device=device), var1=_r(C_MID, device=device).abs(),
                w2=_r(C_OUT, C_MID, 3, device=device), gamma2=_r(C_OUT, device=device),
                beta2=_r(C_OUT, device=device), z2=_r(b, n, C_OUT, device=device),
                mean2=_r(C_OUT, device=device), var2=_r(C_OUT, device=device).abs(), other=None, epilogue=0,
                eps1=1e-5, eps2=1e-5)
    args.update(change)
    return list(args.values())


RAM_CASES = {
    # name: (op, args(device), digits the message must show)
    "ram_eval_epilogue": ("ram_block_eval", lambda d: _eval_args(d, epilogue=7), ["got 7"]),
    "ram_eval_other_required": ("ram_block_eval", lambda d: _eval_args(d, epilogue=1), ["epilogue 1"]),
    "ram_eval_other_shape": ("ram_block_eval", lambda d: _eval_args(d, epilogue=2, other=_r(B, N, 4, device=d)),
                             ["[2, 5, 3]", "[2, 5, 4]"]),
    "ram_eval_x_dims": ("ram_block_eval", lambda d: _eval_args(d, x=_r(B, N, device=d)), ["[2, 5]"]),
    "ram_eval_x_strides": ("ram_block_eval", lambda d: _eval_args(d, x=_r(B, C_IN, N, device=d).transpose(1, 2)),
                           ["[2, 5, 4]", "[20, 1, 5]"]),
    "ram_eval_w1_kernel": ("ram_block_eval", lambda d: _eval_args(d, w1=_r(C_MID, C_IN, 2, device=d)),
                           ["got 2", "[3, 4, 2]"]),
    "ram_eval_w1_dims": ("ram_block_eval", lambda d: _eval_args(d, w1=_r(C_MID, C_IN, device=d)), ["[3, 4]"]),
    "ram_eval_w1_inputs": ("ram_block_eval", lambda d: _eval_args(d, w1=_r(C_MID, 6, 3, device=d)),
                           ["4 input channels, got 6"]),
    "ram_eval_w2_inputs": ("ram_block_eval", lambda d: _eval_args(d, w2=_r(C_OUT, 2, 3, device=d)),
                           ["3 input channels, got 2"]),
    "ram_eval_w1_strides": ("ram_block_eval",
                            lambda d: _eval_args(d, w1=_r(C_MID, 3, C_IN, device=d).transpose(1, 2)), ["[12, 1, 4]"]),
    "ram_eval_b1_shape": ("ram_block_eval", lambda d: _eval_args(d, b1=_r(5, device=d)), ["[3]", "[5]"]),
    "ram_eval_backward_grad_shape": ("ram_block_eval_backward",
                                     lambda d: _eval_backward_args(d, grad=_r(B, N, 2, device=d)),
                                     ["[2, 5, 3]", "[2, 5, 2]"]),
    "ram_eval_backward_v2_shape": ("ram_block_eval_backward",
                                   lambda d: _eval_backward_args(d, epilogue=2, other=_r(B, N, C_OUT, device=d),
                                                                 v2=_r(B, 4, C_OUT, device=d)),
                                   ["[2, 5, 3]", "[2, 4, 3]"]),
    "ram_train_rows": ("ram_block_train", lambda d: _train_args(d, x=_r(1, 1, C_IN, device=d)), ["= 1"]),
    "ram_train_gamma_shape": ("ram_block_train", lambda d: _train_args(d, gamma2=_r(7, device=d)), ["[3]", "[7]"]),
    "ram_train_backward_rows": ("ram_block_train_backward", lambda d: _train_backward_args(d, b=1, n=1), ["= 1"]),
    "ram_train_backward_stats": ("ram_block_train_backward",
                                 lambda d: _train_backward_args(d, mean1=_r(5, device=d)), ["[3]", "[5]"]),
}

CPU_ONLY_CASES = {
    "ram_bn_update_count": ("ram_bn_update_stats", lambda d: [_r(3), _r(3), _r(3), _r(3), 1, 0.1], ["got 1"]),
    "ram_bn_update_shapes": ("ram_bn_update_stats", lambda d: [_r(3), _r(4), _r(3), _r(3), 8, 0.1], ["[3]", "[4]"]),
    "focal_shape": ("focal_loss_forward", lambda d: [_r(3, 7), _r(3, 8).sigmoid(), 0.25, 2.0, False, True, 1.0, True],
                    ["[3, 7]", "[3, 8]"]),
    "focal_alpha": ("focal_loss_forward", lambda d: [_r(3, 7), _r(3, 7).sigmoid(), 1.5, 2.5, False, True, 1.0, True],
                    ["1.5", "2.5"]),
    "la_features_dims": ("label_attention_forward",
                         lambda d: [_r(2, 3), _r(3, 4), _r(3, 4), torch.tensor([3, 3])], ["got 2 dimensions"]),
    "la_queries_channels": ("label_attention_forward",
                            lambda d: [_r(2, 5, 4), _r(3, 6), _r(3, 6), torch.tensor([5, 5])], ["C=4", "[3, 6]"]),
    "la_weights_shape": ("label_attention_forward",
                         lambda d: [_r(2, 5, 4), _r(3, 4), _r(2, 4), torch.tensor([5, 5])], ["L=3", "[2, 4]"]),
    "la_lengths_shape": ("label_attention_forward",
                         lambda d: [_r(2, 5, 4), _r(3, 4), _r(3, 4), torch.tensor([5, 5, 5])], ["B=2", "[3]"]),
    "la_keys_shape": ("label_attention_forward",
                      lambda d: [_r(2, 5, 4), _r(3, 6), _r(3, 4), torch.tensor([5, 5]), _r(2, 4, 6)],
                      ["B=2", "n=5", "[2, 4, 6]"]),
    "la_queries_keys": ("label_attention_forward",
                        lambda d: [_r(2, 5, 4), _r(3, 4), _r(3, 4), torch.tensor([5, 5]), _r(2, 5, 6)],
                        ["d_k=6", "[3, 4]"]),
    "la_lengths_range": ("label_attention_forward",
                         lambda d: [_r(2, 5, 4), _r(3, 4), _r(3, 4), torch.tensor([5, 9])],
                         ["n=5", "got 9", "document 1"]),
}

FUSION_CASES = {
    "mul_tanh_shapes": ("mul_tanh", lambda d: [_r(2, 3, device=d), _r(2, 4, device=d)], ["[2, 3]", "[2, 4]"]),
    "mul_tanh_backward_grad_shape": ("mul_tanh_backward",
                                     lambda d: [_r(2, 5, device=d), _r(2, 3, device=d), _r(2, 3, device=d)],
                                     ["[2, 3]", "[2, 5]"]),
}


def _gru_fwd(d, **change):
    h = 4
    args = dict(gx=_r(2, B, N, 3 * h, device=d), lengths=torch.tensor([N, 3], device=d),
                w_hh=_r(2, 3 * h, h, device=d), b_hh=_r(2, 3 * h, device=d), steps=N)
    args.update(change)
    return list(args.values())


def _gru_bwd(d, **change):
    h = 4
    args = dict(dout=_r(2, B, N, h, device=d), hprev=_r(2, B, N, h, device=d), gx=_r(2, B, N, 3 * h, device=d),
                gh=_r(2, B, N, 3 * h, device=d), lengths=torch.tensor([N, 3], device=d),
                w_hh=_r(2, 3 * h, h, device=d), steps=N)
    args.update(change)
    return list(args.values())


CUDA_ONLY_CASES = {
    "gru_forward_gx_dims": ("bigru_persistent_forward", lambda d: _gru_fwd(d, gx=_r(2, 3, 12, device=d)),
                            ["[2, 3, 12]"]),
    "gru_forward_w_hh_shape": ("bigru_persistent_forward", lambda d: _gru_fwd(d, w_hh=_r(2, 12, 5, device=d)),
                               ["[2, 12, 4]", "[2, 12, 5]"]),
    "gru_forward_steps": ("bigru_persistent_forward", lambda d: _gru_fwd(d, steps=9), ["T=5", "got 9"]),
    "gru_forward_lengths": ("bigru_persistent_forward",
                            lambda d: _gru_fwd(d, lengths=torch.tensor([5, 3, 1], device=d)), ["B=2", "[3]"]),
    "gru_backward_hprev_shape": ("bigru_persistent_backward", lambda d: _gru_bwd(d, hprev=_r(2, B, 4, 4, device=d)),
                                 ["[2, 2, 5, 4]", "[2, 2, 4, 4]"]),
    "gru_backward_dout_dims": ("bigru_persistent_backward", lambda d: _gru_bwd(d, dout=_r(B, N, 4, device=d)),
                               ["[2, 5, 4]"]),
    "mul_tanh_backward_grad_device": ("mul_tanh_backward",
                                      lambda d: [_r(2, 3), _r(2, 3, device=d), _r(2, 3, device=d)], ["cuda:0"]),
}


def cases(device: str) -> dict:
    found = {**RAM_CASES, **FUSION_CASES}
    found.update(CPU_ONLY_CASES if device == "cpu" else CUDA_ONLY_CASES)
    return found


def run_cases(device: str) -> None:
    """Child process: call every case of `device`, one JSON line per result (flushed, so a crash
    still leaves the results before it)."""
    import marn_fast.ops  # noqa: F401  (registers the compiled ops)

    torch.manual_seed(0)
    for name, (op, make_args, _) in cases(device).items():
        print(json.dumps({"start": name}), flush=True)
        try:
            getattr(OPS, op)(*make_args(device))
            result = {"case": name, "raised": None, "message": ""}
        except Exception as exc:  # noqa: BLE001  (any exception type is a result to check)
            result = {"case": name, "raised": type(exc).__name__, "message": str(exc)}
        print(json.dumps(result), flush=True)


def _child_results(device: str) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_error_messages as t; t.run_cases({device!r})")
    # cwd: the tests folder, so that `-c` imports the installed package (with its built extension),
    # not the source tree of the repository root
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    results, started = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["case"]] = record
    if started is not None and started not in results:
        results[started] = {"case": started, "raised": f"child process died with exit code {proc.returncode}",
                            "message": proc.stderr[-2000:]}
    return results


@pytest.fixture(scope="module")
def cpu_results():
    return _child_results("cpu")


@pytest.fixture(scope="module")
def cuda_results():
    return _child_results("cuda")


def _check(results, name, expected):
    assert name in results, f"{name}: not reached (an earlier case crashed the child process)"
    record = results[name]
    assert record["raised"] in ("RuntimeError", "ValueError", "IndexError"), \
        f"{name}: expected a Python error, got {record['raised']!r}: {record['message'][:500]}"
    first_lines = record["message"]
    for digits in expected:
        assert digits in first_lines, f"{name}: {digits!r} missing from the message {first_lines[:300]!r}"


@pytest.mark.parametrize("name", sorted(cases("cpu")))
def test_cpu_messages_show_their_numbers(cpu_results, name):
    _check(cpu_results, name, cases("cpu")[name][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(cases("cuda")))
def test_cuda_messages_show_their_numbers(cuda_results, name):
    _check(cuda_results, name, cases("cuda")[name][2])
