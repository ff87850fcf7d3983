"""Does a TORCH_CHECK failure inside marn_fast._C come back as a Python error here?"""
import sys

import torch

import marn_fast.ops  # noqa: F401  (loads the extension)

dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float64
r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
x, w1, b1, w2, b2 = r(2, 5, 4), r(3, 4, 3), r(3), r(3, 3, 3), r(3)
cases = [
    ("eval ok", lambda: torch.ops.marn_fast.ram_block_eval(x, w1, b1, w2, b2, None, 0)),
    ("eval bad epilogue", lambda: torch.ops.marn_fast.ram_block_eval(x, w1, b1, w2, b2, None, 7)),
    ("eval mixed dtype", lambda: torch.ops.marn_fast.ram_block_eval(x, w1.float(), b1, w2, b2, None, 0)),
    ("mul_tanh shapes", lambda: torch.ops.marn_fast.mul_tanh(r(2, 3), r(2, 4))),
]
for label, call in ([cases[int(sys.argv[2])]] if len(sys.argv) > 2 else cases):
    print(label, flush=True)
    try:
        call()
        print("  ok", flush=True)
    except Exception as exc:  # noqa: BLE001
        print("  raised", type(exc).__name__, str(exc).splitlines()[0][:150], flush=True)
