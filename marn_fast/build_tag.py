"""The local version tag that names the torch a wheel of marn_fast is bound to.

The compiled extensions link against one torch's C++ API, so a wheel runs only under the torch
(major.minor and CPU/CUDA/ROCm build) it was compiled with. With MARN_FAST_LOCAL_VERSION=1 at build
time, setup.py appends this tag to the wheel's version (`0.1.0+torch2.13cpu`, `0.1.0+torch2.14cu130`),
as kernel packages built per torch/CUDA pair do; `marn-fast info` compares it with the running
torch. setup.py loads this file by path before the package exists: it imports nothing.
"""
from __future__ import annotations

import re
from typing import Optional

ENV_VAR = "MARN_FAST_LOCAL_VERSION"
PREFIX = "torch"


def torch_tag(torch_version: str, cuda: Optional[str], hip: Optional[str] = None) -> str:
    """`torch<major>.<minor><variant>` for a torch `__version__` and its `version.cuda` /
    `version.hip`: variant `cu<major><minor>` (CUDA 13.0 → cu130), `rocm<major>.<minor>`, or `cpu`.
    A valid PEP 440 local version label (letters, digits and dots)."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise ValueError(f"torch_version: expected '<major>.<minor>...' (torch.__version__), got {torch_version!r}")
    if cuda:
        variant = "cu" + "".join(cuda.split(".")[:2])
    elif hip:
        variant = "rocm" + ".".join(hip.split(".")[:2])
    else:
        variant = "cpu"
    return f"{PREFIX}{match[1]}.{match[2]}{variant}"


def local_tag(version: str) -> Optional[str]:
    """The torch tag of a version string (`0.1.0+torch2.13cpu` → `torch2.13cpu`); None when the
    version has no local part or its local part is not a torch tag."""
    _, plus, local = version.partition("+")
    return local if plus and local.startswith(PREFIX) else None
