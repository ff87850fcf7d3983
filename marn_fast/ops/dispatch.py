"""Measured dispatch: which implementation of an op runs, chosen by timing at the user's shapes.

An op with several implementations ("candidates": the plain-PyTorch reference, a C++ CPU kernel,
chunked PyTorch, GEMM-first, fused Triton, the CUDA extension, ...) asks `choose` which one to
run. The answer is decided once per key

    (op, device, dtype, mode, shape bucket)
        device  the GPU's name, or the CPU's model name with torch's thread count
        dtype   the op's compute dtype (the autocast dtype under autocast, ops/precision.py)
        mode    "train" when a gradient will flow through the op, else "infer"
        bucket  each size the op names, rounded up to a power of two

and is then fixed for the process (a model never switches paths mid-training). A key resolves
to the first of:
  1. a forced impl: MARN_FAST_IMPL="label_attention=gemm,ram=vendor_conv" (per op), or one name
     for every op that has it (MARN_FAST_IMPL=reference);
  2. this process's earlier answer;
  3. the user's cache file: MARN_FAST_DISPATCH_CACHE, else
     $XDG_CACHE_HOME/marn_fast/dispatch/<device-slug>.json (~/.cache when XDG_CACHE_HOME is unset);
  4. the table shipped with the package for this device (`marn_fast/ops/dispatch_tables/`,
     written by `marn-fast tune --write-table` on the machines the project measured);
  5. a measurement, when MARN_FAST_DISPATCH=tune (the default), below;
  6. the op's static default (what `MARN(backend="fused")` runs).
MARN_FAST_DISPATCH=table skips 5; MARN_FAST_DISPATCH=off skips 3–5 (no file is read).
Nothing is measured, forced or read from files under torch.compile: a key resolved in this
process (by an eager call, or `marn-fast tune`) keeps its choice in the compiled graph, any other
key takes the static default. So run one eager call before compiling.

Validity. Every entry of a cache or table file records what it was measured with
(`measured_with`): the marn_fast, torch and Triton versions, the compiled extensions' build
identity (a fingerprint of their C++/CUDA sources and the torch they were built against,
`_extension.build_identity`), torch's thread count and whether Triton ran interpreted. An entry
whose record differs from the running setup (the thread count is compared on the CPU only), or
that has no record (files of marn_fast before this format), is ignored: the key is measured anew
and the cache entry overwritten. Under TRITON_INTERPRET=1 nothing is measured (interpreted
kernels run hundreds of times slower than compiled ones, so their times choose nothing): the
static default runs and no cache entry is written, unless MARN_FAST_DISPATCH_INTERPRETED=1 (the
tests) allows it; such entries then record the interpreter and match only interpreted runs.

Measurement. Every candidate runs on the call's inputs (detached: no op writes its inputs), the
forward plus, when training, the backward of a fixed random upstream gradient:
  - memory: the op estimates each candidate's extra peak bytes at the call's shapes and compute
    dtype (`memory`); a candidate whose estimate exceeds the budget (ops/memory.py: half the free
    memory, or MARN_FAST_MEMORY_BUDGET) is not run and is recorded as skipped with the numbers.
    When every candidate is over the budget, the one needing least is taken unmeasured;
  - one warm-up call each (it includes any compilation), in the order reference, static
    default, the others; the first that runs is the oracle the others' outputs (and gradients)
    must match within CHECK_TOLERANCE, else the candidate is rejected with a warning (under
    bf16/fp16 autocast the oracle is the reference run once more in fp32, and each candidate may
    differ from it by 3× the eager half-precision reference's own error + 0.01);
  - then interleaved timed rounds (each round runs every contender once) among the candidates
    whose warm-up took at most SLOW_FACTOR times the fastest: up to ROUNDS rounds while the
    rounds have used at most TIME_BUDGET_S; candidates within CLOSE_MARGIN (25 %) of the fastest
    (by warm-up, or by their median so far) get CLOSE_ROUNDS (3) rounds each even past the time
    budget, which only cuts short the clearly lost;
  - the fastest by the median wins; the margin to the runner-up is recorded with the choice and
    written with it, atomically, to the cache file.
A measurement announces itself on stderr as one line (op, mode, dtype, sizes, candidates, then
the choice, each candidate's time, the skipped ones and the seconds spent), TTY or not;
`announcements(sink)` sends the whole lines elsewhere instead (training's log, a progress bar).

Every answer is recorded (`choices()`) with where it came from, for run manifests and
`marn-fast info`. This module knows no op's math: each op passes its candidate names, its
static default, a factory of the trial that runs one candidate on its inputs, and its memory
estimate.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..files import write_text_atomic
from ._backend import interpreting
from ._extension import build_identity
from .memory import format_bytes, memory_budget

ENV_MODE = "MARN_FAST_DISPATCH"
ENV_FORCE = "MARN_FAST_IMPL"
ENV_CACHE = "MARN_FAST_DISPATCH_CACHE"
ENV_INTERPRETED = "MARN_FAST_DISPATCH_INTERPRETED"
MODES = ("tune", "table", "off")
REFERENCE = "reference"
TABLES_DIR = Path(__file__).resolve().parent / "dispatch_tables"
TABLE_FORMAT = 2  # entries carry measured_with (format 1, before it: entries without)
# Timing: after one warm-up call per candidate, up to ROUNDS interleaved rounds, fewer when the
# candidates together have already used TIME_BUDGET_S; a candidate whose warm-up took SLOW_FACTOR
# times the fastest warm-up (and over SLOW_FLOOR_S) is dropped before the rounds. Candidates
# within CLOSE_MARGIN of the fastest get CLOSE_ROUNDS rounds whatever the time budget.
ROUNDS = 3
TIME_BUDGET_S = 3.0
SLOW_FACTOR = 4.0
SLOW_FLOOR_S = 0.02
CLOSE_MARGIN = 0.25
CLOSE_ROUNDS = 3
# Largest relative difference max|x − ref| / max(max|ref|, 1e-6) a candidate may show against
# the reference on the first input (a sanity guard: the parity tests hold the real tolerances;
# fp32 allows TF32 GEMMs on GPUs).
CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2, torch.bfloat16: 6e-2, torch.float16: 3e-2}
# Under half-precision autocast the candidates are checked against the reference run in fp32,
# each within max(CHECK_TOLERANCE, HALF_REFERENCE_FACTOR × the eager half reference's own error
# + HALF_FLOOR) (see _full_precision_oracle).
HALF_REFERENCE_FACTOR = 3.0
HALF_FLOOR = 1e-2
# What an entry of a cache or table file holds (`Choice.entry`); choices() rows hold these too.
ENTRY_FIELDS = ("impl", "ms", "rejected", "skipped", "margin", "runner_up", "rounds", "seconds", "measured_with")

Trial = Callable[[str], Sequence[torch.Tensor]]
# memory(impl, dtype): the estimated extra peak bytes of one call of impl at the call's shapes in
# compute dtype `dtype` (the key's), beyond its inputs.
Memory = Callable[[str, torch.dtype], int]


# ------------------------------------------------------------------------------------------ devices
def device_name(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; 'CPU <model name> x<cores>' on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} x{os.cpu_count()}"


def device_slug(device: torch.device | str | None = None) -> str:
    """device_name as a file name: lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")[:60]


_DEVICE_KEYS: Dict[Tuple[str, int], str] = {}


def _device_key(device: torch.device) -> str:
    """The key's device: the GPU's name, or the CPU's name and torch's thread count (timings
    on the CPU depend on it)."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    memo = (str(device), threads)
    if memo not in _DEVICE_KEYS:
        name = device_name(device)
        _DEVICE_KEYS[memo] = f"{name}, {threads} threads" if device.type == "cpu" else name
    return _DEVICE_KEYS[memo]


# ------------------------------------------------------------------------------------------ validity
@functools.lru_cache(maxsize=None)
def _triton_version() -> Optional[str]:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def measured_with() -> Dict[str, Any]:
    """What a measurement made now depends on besides its key (see the module docstring)."""
    from .. import __version__

    return {"marn_fast": __version__, "torch": torch.__version__, "triton": _triton_version(),
            "extension": build_identity(), "threads": torch.get_num_threads(), "triton_interpret": interpreting()}


def mismatch(entry: Mapping[str, Any], device: torch.device) -> Optional[str]:
    """Why a file entry does not hold for the running setup (None: it does)."""
    recorded = entry.get("measured_with")
    if not isinstance(recorded, dict):
        return "no record of what it was measured with (an older marn_fast's file)"
    here = measured_with()
    for name, value in here.items():
        if name == "threads" and device.type != "cpu":
            continue
        if recorded.get(name, "absent") != value:
            return f"measured with {name} {recorded.get(name, 'absent')}, here {value}"
    return None


def measurement_blocked() -> Optional[str]:
    """Why nothing may be measured in this process now (None: it may)."""
    if interpreting() and os.environ.get(ENV_INTERPRETED, "").strip() != "1":
        return ("TRITON_INTERPRET=1: interpreted Triton kernels are no measure of real ones, so nothing is "
                f"measured or cached (the static defaults run); unset it, or set {ENV_INTERPRETED}=1 (tests)")
    return None


# ------------------------------------------------------------------------------------------ keys
def bucket(size: int) -> int:
    """The power of two at or above size (sizes ≤ 1 stay as they are)."""
    return size if size <= 1 else 1 << (int(size) - 1).bit_length()


@dataclass(frozen=True)
class Key:
    op: str
    device: str
    dtype: str
    mode: str
    sizes: Tuple[Tuple[str, int], ...]

    def text(self) -> str:
        return f"{self.op}|{self.device}|{self.dtype}|{self.mode}|{self.sizes_text()}"

    def sizes_text(self) -> str:
        return ",".join(f"{name}={value}" for name, value in self.sizes)


def make_key(op: str, device: torch.device, dtype: torch.dtype, train: bool, sizes: Mapping[str, int]) -> Key:
    """The key of a call: sizes are bucketed here (pass the exact sizes)."""
    return Key(op, _device_key(device), str(dtype).replace("torch.", ""), "train" if train else "infer",
               tuple((name, bucket(int(value))) for name, value in sizes.items()))


@dataclass
class Choice:
    """One resolved key: the impl and where it came from; when measured (or read from a file) the
    candidates' milliseconds, the rejected and skipped ones with why, the margin to the runner-up
    (runner-up's ms / winner's − 1), the timed rounds per candidate, the seconds spent and what it
    was measured with; `stale`: file entries ignored on the way, with why."""

    impl: str
    source: str                     # forced | cache | table | measured | default | only | memory
    ms: Dict[str, float] = field(default_factory=dict)
    rejected: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    margin: Optional[float] = None
    runner_up: Optional[str] = None
    rounds: Dict[str, int] = field(default_factory=dict)
    seconds: Optional[float] = None
    measured_with: Optional[Dict[str, Any]] = None
    stale: Dict[str, str] = field(default_factory=dict)

    def entry(self) -> dict:
        """The cache/table file entry (ENTRY_FIELDS)."""
        return {"impl": self.impl, "ms": {k: round(v, 4) for k, v in self.ms.items()}, "rejected": self.rejected,
                "skipped": self.skipped, "margin": None if self.margin is None else round(self.margin, 4),
                "runner_up": self.runner_up, "rounds": self.rounds,
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "measured_with": self.measured_with}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], source: str) -> "Choice":
        return cls(entry["impl"], source, dict(entry.get("ms") or {}), dict(entry.get("rejected") or {}),
                   dict(entry.get("skipped") or {}), entry.get("margin"), entry.get("runner_up"),
                   dict(entry.get("rounds") or {}), entry.get("seconds"), entry.get("measured_with"))


# ------------------------------------------------------------------------------------------ settings
def mode() -> str:
    value = os.environ.get(ENV_MODE, "tune").strip().lower() or "tune"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}: expected one of {MODES}, got {value!r}")
    return value


def forced(op: str, candidates: Sequence[str]) -> Optional[str]:
    """The impl MARN_FAST_IMPL forces for op, or None. A per-op entry ("op=impl") must name one of
    the op's available candidates; a bare name applies to every op that has it."""
    spec = os.environ.get(ENV_FORCE, "").strip()
    if not spec:
        return None
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if "=" in item:
            name, impl = (s.strip() for s in item.split("=", 1))
            if name == op:
                if impl not in candidates:
                    raise ValueError(f"{ENV_FORCE}: {op}={impl} is not available for this call; "
                                     f"available: {', '.join(candidates)}")
                return impl
        elif item in candidates:
            return item
    return None


def cache_path(device: torch.device) -> Path:
    """The user's cache file for this device (MARN_FAST_DISPATCH_CACHE overrides)."""
    override = os.environ.get(ENV_CACHE, "").strip()
    if override:
        return Path(override).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "marn_fast" / "dispatch" / f"{device_slug(device)}.json"


def table_path(device: torch.device) -> Path:
    return TABLES_DIR / f"{device_slug(device)}.json"


# ------------------------------------------------------------------------------------------ state
_LOCK = threading.RLock()
_CHOICES: Dict[Key, Choice] = {}
_MEMO: Dict[tuple, str] = {}  # the per-call fast path: raw (unbucketed) call facts → impl
_FILES: Dict[Path, Dict[str, dict]] = {}
_IGNORE_FILES = False
_ROUNDS, _BUDGET_S = ROUNDS, TIME_BUDGET_S
_SINKS: List[Callable[[str], None]] = []  # announcements(): where whole announcement lines go
_WARNED_BLOCKED: List[str] = []


def read_table(path: Path) -> Dict[str, dict]:
    """The entries of a table/cache file ({} when absent; a warning, not an error, when unreadable)."""
    if path not in _FILES:
        entries: Dict[str, dict] = {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = {k: v for k, v in data.get("entries", {}).items() if isinstance(v, dict) and "impl" in v}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            warnings.warn(f"marn_fast dispatch: ignoring unreadable table {path} ({exc})", RuntimeWarning, stacklevel=3)
        _FILES[path] = entries
    return _FILES[path]


def write_table(path: Path, device: str, entries: Mapping[str, dict]) -> None:
    """Merge entries into the JSON table at path, atomically (temporary file, then os.replace)."""
    path = Path(path)
    merged = dict(read_table(path))
    merged.update(entries)
    write_text_atomic(path, json.dumps({"format": TABLE_FORMAT, "device": device,
                                        "entries": dict(sorted(merged.items()))}, indent=1) + "\n")
    _FILES[path] = merged


def reset() -> None:
    """Forget this process's answers and the files read (tests; a new cache file)."""
    with _LOCK:
        _CHOICES.clear()
        _MEMO.clear()
        _FILES.clear()
        _WARNED_BLOCKED.clear()


def choices() -> List[dict]:
    """Every key resolved in this process: key (its text in table files), op, device, dtype, mode,
    sizes, source, stale (file entries ignored, with why) and the ENTRY_FIELDS (impl, ms per
    candidate, rejected and skipped candidates with why, margin, runner_up, rounds, seconds,
    measured_with)."""
    with _LOCK:
        return [{"key": k.text(), "op": k.op, "device": k.device, "dtype": k.dtype, "mode": k.mode,
                 "sizes": dict(k.sizes), "source": c.source, "stale": dict(c.stale), **c.entry()}
                for k, c in _CHOICES.items()]


@contextlib.contextmanager
def fresh_measurements(rounds: int = ROUNDS, budget_s: float = TIME_BUDGET_S) -> Iterator[None]:
    """Within the block, keys not yet resolved in this process are measured (when
    MARN_FAST_DISPATCH allows) without reading the cache file or the shipped tables, with up to
    `rounds` timed rounds in `budget_s` seconds per key (close candidates still get CLOSE_ROUNDS):
    what `marn-fast tune --fresh` uses to write a new table."""
    global _IGNORE_FILES, _ROUNDS, _BUDGET_S
    if rounds < 1 or budget_s <= 0:
        raise ValueError(f"rounds, budget_s: expected >= 1 and > 0, got {rounds}, {budget_s}")
    with _LOCK:
        previous = (_IGNORE_FILES, _ROUNDS, _BUDGET_S)
        _IGNORE_FILES, _ROUNDS, _BUDGET_S = True, rounds, budget_s
    try:
        yield
    finally:
        with _LOCK:
            _IGNORE_FILES, _ROUNDS, _BUDGET_S = previous


@contextlib.contextmanager
def announcements(sink: Callable[[str], None]) -> Iterator[None]:
    """Within the block, each measurement's announcement goes to sink(line) as one whole line
    when it ends (instead of stderr, where it starts when the measurement starts and ends with it)."""
    with _LOCK:
        _SINKS.append(sink)
    try:
        yield
    finally:
        with _LOCK:
            _SINKS.remove(sink)


# ------------------------------------------------------------------------------------------ choosing
def choose(op: str, *, device: torch.device, dtype: torch.dtype, train: bool, sizes: Mapping[str, int],
           candidates: Callable[[], Sequence[str]], default: str, trial: Callable[[], Trial],
           memory: Optional[Memory] = None) -> str:
    """The impl to run for this call (see the module docstring).

    dtype: the op's compute dtype; candidates(): the impls available for these inputs (the
    reference among them where it can run); default: the static choice; trial(): a function
    impl → the tensors to compare (the forward outputs, then the gradients when training), run on
    this call's inputs; memory(impl, dtype): the estimated extra peak bytes of impl at this call's
    shapes (None: no estimate, nothing is skipped for memory). They are called only when the key
    is new to this process.
    """
    if torch.compiler.is_compiling():
        return _resolved(op, device, dtype, train, tuple(sizes.items()), default)
    memo = (op, device, dtype, train, torch.get_num_threads(), tuple(sizes.values()))
    impl = _MEMO.get(memo)
    if impl is None:
        impl = _MEMO[memo] = _resolve(op, make_key(op, device, dtype, train, sizes), tuple(candidates()), default,
                                      trial, memory, device, dtype)
    return impl


def _resolve(op: str, key: Key, candidates: Tuple[str, ...], default: str, trial: Callable[[], Trial],
             memory: Optional[Memory], device: torch.device, dtype: torch.dtype) -> str:
    if default not in candidates:
        raise ValueError(f"{op}: default impl {default!r} is not among the candidates {candidates}")
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit.impl
    forced_impl = forced(op, candidates)
    if forced_impl is not None:
        return _record(key, Choice(forced_impl, "forced"))
    if len(candidates) == 1:
        return _record(key, Choice(candidates[0], "only"))
    setting = mode()
    stale: Dict[str, str] = {}
    if setting != "off" and not _IGNORE_FILES:
        for source, path in (("cache", cache_path(device)), ("table", table_path(device))):
            entry = read_table(path).get(key.text())
            if entry is None:
                continue
            reason = (f"{entry['impl']} is not available here" if entry["impl"] not in candidates
                      else mismatch(entry, device))
            if reason is None:
                return _record(key, Choice.from_entry(entry, source))
            stale[source] = reason
    blocked = measurement_blocked() if setting == "tune" else None
    if setting != "tune" or blocked:
        if blocked and not _WARNED_BLOCKED:
            _WARNED_BLOCKED.append(blocked)
            warnings.warn(f"marn_fast dispatch: {blocked}", RuntimeWarning, stacklevel=3)
        return _record(key, Choice(default, "default", stale=stale))
    with _LOCK:
        if key in _CHOICES:  # another thread measured it meanwhile
            return _CHOICES[key].impl
        choice = _measure_announced(op, key, candidates, default, trial, memory, device, dtype)
        choice.stale = stale
        _record(key, choice)
        if choice.source == "measured":
            try:
                write_table(cache_path(device), key.device, {key.text(): choice.entry()})
            except OSError as exc:
                warnings.warn(f"marn_fast dispatch: could not write the cache {cache_path(device)} ({exc}); "
                              "the choice holds for this process only", RuntimeWarning, stacklevel=3)
        _warn_rejected(op, choice, default)
        return choice.impl


@torch.compiler.assume_constant_result
def _resolved(op: str, device: torch.device, dtype: torch.dtype, train: bool, sizes: Tuple[Tuple[str, int], ...],
              default: str) -> str:
    """The choice under torch.compile, run once at trace time and baked into the graph as a
    constant: this process's earlier answer (measured, forced, from a table...), else the static
    default. Nothing is measured or read from files while tracing."""
    key = make_key(op, device, dtype, train, dict(sizes))
    hit = _CHOICES.get(key)
    return hit.impl if hit is not None else _record(key, Choice(default, "default"))


def _record(key: Key, choice: Choice) -> str:
    with _LOCK:
        _CHOICES.setdefault(key, choice)
        return _CHOICES[key].impl


# ------------------------------------------------------------------------------------------ announcing
def _announce_start(text: str) -> None:
    if not _SINKS:
        sys.stderr.write(text)
        sys.stderr.flush()


def _announce_end(start: str, end: str) -> None:
    if _SINKS:
        _SINKS[-1](start + end)
    else:
        sys.stderr.write(end + "\n")
        sys.stderr.flush()


def _outcome(choice: Choice) -> str:
    """The announcement's second half: the choice, the times, the skipped and rejected, the seconds."""
    if choice.source == "measured":
        text = f"→ {choice.impl}"
        if choice.margin is not None:
            text += f", {describe_margin(choice.margin, choice.runner_up)}"
    elif choice.source == "memory":
        text = f"→ {choice.impl} unmeasured: every candidate is over the memory budget, it needs least"
    else:
        text = f"→ {choice.impl} (static default: no candidate ran)"
    times = ", ".join(f"{impl} {ms:.3g} ms" for impl, ms in sorted(choice.ms.items(), key=lambda kv: kv[1]))
    parts = [text] + ([times] if times else [])
    parts += [f"skipped {impl}: {why}" for impl, why in choice.skipped.items()]
    parts += [f"rejected {impl}" for impl in choice.rejected]
    return "; ".join(parts) + f"; {choice.seconds:.1f} s"


def describe_margin(margin: float, runner_up: Optional[str]) -> str:
    """'12 % faster than gemm' (the runner-up's median 1.12× the winner's), '3.4× faster than torch'."""
    return (f"{100 * margin:.0f} % faster than {runner_up}" if margin < 1 else
            f"{1 + margin:.1f}× faster than {runner_up}")


def _measure_announced(op: str, key: Key, candidates: Sequence[str], default: str, trial: Callable[[], Trial],
                       memory: Optional[Memory], device: torch.device, dtype: torch.dtype) -> Choice:
    start = (f"marn_fast dispatch: measuring {op} ({key.mode}, {key.dtype}, {key.sizes_text()}) "
             f"among {', '.join(candidates)} … ")
    _announce_start(start)
    began = time.perf_counter()
    try:
        skipped = _over_budget(candidates, memory, device, dtype)
        runnable = [c for c in candidates if c not in skipped]
        if runnable:
            choice = measure(op, runnable, default, trial(), device, dtype)
        else:
            need = {c: memory(c, dtype) for c in candidates} if memory is not None else {}
            choice = Choice(min(candidates, key=lambda c: need.get(c, 0)), "memory")
        choice.skipped = skipped
    except BaseException:
        _announce_end(start, "failed")
        raise
    choice.seconds = time.perf_counter() - began
    _announce_end(start, _outcome(choice))
    return choice


def _over_budget(candidates: Sequence[str], memory: Optional[Memory], device: torch.device,
                 dtype: torch.dtype) -> Dict[str, str]:
    """{impl: "needs ~X, budget Y"} for the candidates whose estimate exceeds the memory budget."""
    if memory is None:
        return {}
    budget = memory_budget(device)
    if budget is None:
        return {}
    skipped = {}
    for impl in candidates:
        need = memory(impl, dtype)
        if need > budget:
            skipped[impl] = f"needs ~{format_bytes(need)}, budget {format_bytes(budget)}"
    return skipped


def _warn_rejected(op: str, choice: Choice, default: str) -> None:
    if choice.source == "default" and choice.rejected:
        warnings.warn(f"marn_fast dispatch: no candidate of {op} ran ({choice.rejected}); using {default!r}",
                      RuntimeWarning, stacklevel=4)
        return
    for impl, why in choice.rejected.items():
        if not why.startswith("out of memory"):
            warnings.warn(f"marn_fast dispatch: {op} candidate {impl!r} rejected: {why}", RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Trial, impl: str, device: torch.device) -> Tuple[float, Sequence[torch.Tensor]]:
    _sync(device)
    start = time.perf_counter()
    out = run(impl)
    _sync(device)
    return time.perf_counter() - start, out


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def relative_difference(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max over the tensor pairs of max|x − ref| / max(max|ref|, 1e-6); inf on a shape mismatch or
    a non-finite value where the reference is finite."""
    if len(outputs) != len(reference):
        return math.inf
    worst = 0.0
    for x, ref in zip(outputs, reference):
        if x is None or ref is None:
            if x is not ref:
                return math.inf
            continue
        if x.shape != ref.shape:
            return math.inf
        x, ref = x.detach().double(), ref.detach().double()
        if not torch.equal(torch.isfinite(x), torch.isfinite(ref)):
            return math.inf
        finite = torch.isfinite(ref)
        if finite.any():
            scale = max(ref[finite].abs().max().item(), 1e-6)
            worst = max(worst, ((x - ref)[finite].abs().max().item()) / scale)
    return worst


def measure(op: str, candidates: Sequence[str], default: str, run: Trial, device: torch.device,
            dtype: torch.dtype) -> Choice:
    """Time the candidates on one trial (see the module docstring) → the Choice (rejected
    candidates are recorded in it; the caller warns)."""
    tolerance = CHECK_TOLERANCE.get(dtype, 1e-2)
    full = _full_precision_oracle(run, candidates, device, dtype)
    order = [REFERENCE] if REFERENCE in candidates else []
    order += [default] if default != REFERENCE and default in candidates else []
    order += [c for c in candidates if c not in order]
    warm: Dict[str, float] = {}
    rejected: Dict[str, str] = {}
    oracle: Optional[Sequence[torch.Tensor]] = None
    oracle_name = None
    for impl in order:
        try:
            seconds, out = _timed(run, impl, device)
        except Exception as exc:  # a failing candidate must not end the user's run: reject it
            rejected[impl] = ("out of memory" if _out_of_memory(exc) else f"{type(exc).__name__}: {exc}")[:200]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if full is not None and impl == REFERENCE:  # half precision: judge all against the fp32 oracle
            oracle, oracle_name = full, "the reference in fp32"
            tolerance = max(tolerance, HALF_REFERENCE_FACTOR * relative_difference(out, full) + HALF_FLOOR)
        elif oracle is None:  # the reference when it runs, else the static default, checks the rest
            oracle, oracle_name = [t.detach() if t is not None else None for t in out], impl
        else:
            diff = relative_difference(out, oracle)
            if not diff <= tolerance:
                rejected[impl] = f"differs from {oracle_name} by {diff:.3g} (> {tolerance:g})"
                continue
        warm[impl] = seconds
        del out
    if not warm:
        return Choice(default, "default", {}, rejected)
    times = _timed_rounds(run, warm, device)
    ms = {i: 1e3 * (statistics.median(times[i]) if times.get(i) else s) for i, s in warm.items()}
    ranked = sorted(ms, key=lambda i: ms[i])
    best = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    margin = ms[runner_up] / max(ms[best], 1e-9) - 1 if runner_up is not None else None
    return Choice(best, "measured", ms, rejected, margin=margin, runner_up=runner_up,
                  rounds={i: len(times.get(i, ())) for i in warm}, measured_with=measured_with())


def _full_precision_oracle(run: Trial, candidates: Sequence[str], device: torch.device,
                           dtype: torch.dtype) -> Optional[Sequence[torch.Tensor]]:
    """Under half-precision autocast, the reference run with autocast off (fp32 on the same fp32
    inputs and parameters): the oracle every candidate, the eager reference among them, is checked
    against, each allowed HALF_REFERENCE_FACTOR times the eager reference's own half-precision
    error (+ HALF_FLOOR). Two bf16 computations of a deep op (the RAM's BatchNorms, the GRU's
    recurrence) differ from each other by more than either differs from fp32, so checking one
    against the other rejected correct candidates. None where autocast is off or the reference
    is not a candidate (then the first candidate to run is the oracle, as for fp32)."""
    if dtype not in (torch.bfloat16, torch.float16) or REFERENCE not in candidates:
        return None
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    try:
        with torch.autocast(device.type, enabled=False):
            out = run(REFERENCE)
    except Exception:  # e.g. out of memory in fp32: fall back to the half-precision reference
        return None
    return [t.detach() if t is not None else None for t in out]


def _timed_rounds(run: Trial, warm: Mapping[str, float], device: torch.device) -> Dict[str, List[float]]:
    """Interleaved timed rounds among the contenders (module docstring) → their times."""
    fastest = min(warm.values())
    contenders = [i for i, s in warm.items() if s <= max(SLOW_FACTOR * fastest, SLOW_FLOOR_S)]
    times: Dict[str, List[float]] = {i: [] for i in contenders}
    if len(contenders) < 2:
        return times
    close = {i for i in contenders if warm[i] <= (1 + CLOSE_MARGIN) * fastest}
    active, spent, done = list(contenders), 0.0, 0
    while active:
        for impl in active:
            seconds, out = _timed(run, impl, device)
            del out
            times[impl].append(seconds)
            spent += seconds
        done += 1
        medians = {i: statistics.median(times[i]) for i in active}
        best = min(medians.values())
        close |= {i for i, m in medians.items() if m <= (1 + CLOSE_MARGIN) * best}
        in_budget = done < _ROUNDS and spent <= _BUDGET_S
        close_call = len(close) > 1 and done < CLOSE_ROUNDS
        active = [i for i in active if in_budget or (close_call and i in close)]
    return times


# ------------------------------------------------------------------------------------------ trials
def grad_flows(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on these tensors records a gradient (the key's mode "train")."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# What an op returns to a trial: one tensor, or a sequence of tensors (None where not computed).
OpOutput = Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]


def autograd_trial(call: Callable[..., OpOutput], inputs: Sequence[Optional[torch.Tensor]], train: bool,
                   params: Sequence[torch.Tensor] = (), seed: int = 0) -> Trial:
    """A trial for an op taking tensors: impl → [outputs..., gradients...].

    call(impl, *tensors) runs the op on detached aliases of `inputs` (None stays None; no copy:
    no op writes its inputs, and a copy would add the inputs' size to the measurement's peak
    memory). When training, the aliases of inputs that require grad are leaves that require grad,
    and the gradients of Σ_outputs ⟨output, G⟩ (G fixed N(0, 1) per output, drawn once) with
    respect to them and to `params` (tensors the call reads by itself, e.g. a module's
    parameters) follow the outputs.
    """
    copies = [None if t is None else t.detach().requires_grad_(train and t.requires_grad and t.is_floating_point())
              for t in inputs]
    leaves = [t for t in copies if t is not None and t.requires_grad] + [p for p in params if p.requires_grad]
    upstream: Dict[int, torch.Tensor] = {}

    def run(impl: str) -> Sequence[torch.Tensor]:
        with torch.set_grad_enabled(train):
            out = call(impl, *copies)
        outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        if not (train and leaves):
            return [o.detach() for o in outs]
        differentiable = [(i, o) for i, o in enumerate(outs) if o.requires_grad]
        for i, o in differentiable:
            if i not in upstream:
                g = torch.Generator().manual_seed(seed + i)
                upstream[i] = torch.randn(o.shape, generator=g, dtype=torch.float32).to(o.device, o.dtype)
        grads = torch.autograd.grad([o for _, o in differentiable], leaves,
                                    [upstream[i] for i, _ in differentiable], allow_unused=True)
        return [o.detach() for o in outs] + list(grads)

    return run
