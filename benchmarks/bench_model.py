"""End-to-end MARN benchmark: training step and inference of the eager reference, torch.compile of
the reference, and the fused `marn_fast.MARN`, plus a per-component breakdown, scaling sweeps and
(GPU) the largest batch / longest document that fit in memory.

Variants (all built from one state_dict, fed the same batch):
  eager    marn_fast.reference.MARN (the official code's behaviour: packed BiGRU, materialised
           attention, nn.Module RAM, plain focal loss)
  compiled torch.compile of the reference's forward and compute_loss (default options)
  fused    marn_fast.MARN(config, backend="auto"); the backend actually used is in each row
A plan entry runs its variants in the entry's dtype; "variant@bf16" / "variant@fp32" runs one in
another, so that a group interleaves, say, eager fp32 with marn_fast bf16 in one process (the CPU
plan's bf16 rows). Each row names its variant and dtype; ratio_vs_eager / ratio_vs_compiled /
memory_vs_eager compare with the same-dtype eager or compiled row, ratio_vs_eager_fp32 and
ratio_vs_fused_fp32 (bf16 rows) with the fp32 eager and fp32 marn_fast rows of the group.
Modes:
  train      forward + loss (autocast when bf16), backward, gradient clipping, AdamW step
             (marn_fast.training.TrainConfig defaults), then the gradients set to None
  inference  eval mode, no_grad, forward only
Timing: warm-up calls (they include compilation), then interleaved rounds (one call of each
variant per round); median and best of the rounds; ratios use medians. docs/s = B / median.
Peak memory, reported as peak_bytes = the call's extra peak over what was resident before it
  + the variant's resident state (weights and buffers; + AdamW state for a training step):
  CUDA  extra = torch.cuda.max_memory_allocated() − memory_allocated() before the call, in this
        process, on every timed call (median).
  CPU   extra = VmHWM − VmRSS before the call, in a fresh child process per shape (one warm-up
        inference, then /proc/self/clear_refs resets VmHWM before each measured call), with a
        fixed glibc mmap threshold so freed buffers are unmapped, not silently reused.
Breakdown (issue 11): the model's steps timed separately on the same inputs, interleaved with
the whole step: embedding (+dropout), BiGRU (`_encode_tokens`), RAM (`_recalibrate` + dropout),
attention heads (`_head_logits`, both heads), loss (`compute_loss`), optimiser (clip + AdamW);
training pieces include their backward (random upstream gradient of the output's shape).
share = piece / whole step; "other" = whole − Σ pieces (input checks, glue; negative = noise).

    python benchmarks/bench_model.py                     # this machine's plan (CPU or CUDA)
    python benchmarks/bench_model.py --no-compile        # skip the torch.compile variant
    python benchmarks/bench_model.py --device cuda       # the GPU plan (gpu_plan() below)
    python benchmarks/bench_model.py --sections main,breakdown --budget-s 300
    python benchmarks/bench_model.py --plan smoke        # GPU plan's code paths, tiny, writes nothing

Writes benchmarks/results/<device-slug>/model.{json,csv} (main rows and targets),
model_breakdown.*, model_sweep.* (+ model_sweep_n.png, model_sweep_L.png), model_limits.*
(CUDA) and model_breakdown.png, each atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, device_name, device_slug, time_cpu, write_results  # noqa: E402

import marn_fast  # noqa: E402
from marn_fast import MARNConfig, MARNOutput, reference  # noqa: E402
from marn_fast.files import atomic_path  # noqa: E402
from marn_fast.training import TrainConfig  # noqa: E402

NAME = "model"
VARIANTS = ("eager", "compiled", "fused")
MODES = ("train", "inference")
COMPONENTS_TRAIN = ("embedding", "bigru", "ram", "attention", "loss", "optimiser")
COMPONENTS_INFERENCE = ("embedding", "bigru", "ram", "attention")
VOCAB = 50_000
LABELS_50 = (50, 38)          # MIMIC-III-50: ICD codes, CCS codes
LABELS_FULL = (8921, 295)     # MIMIC-III full
TRAIN = TrainConfig()         # lr, weight decay, gradient clipping of the official recipe
DEFAULT_MAX_LENGTH = MARNConfig.__dataclass_fields__["max_length"].default
DEFAULT_HIDDEN = MARNConfig.__dataclass_fields__["hidden_size"].default
CPU_MMAP_THRESHOLD = 128 * 1024  # bytes; see the module docstring (CPU peak memory)


# ------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    n: int
    num_icd: int
    num_ccs: int
    hidden: int = DEFAULT_HIDDEN

    def config(self, max_length: Optional[int] = None) -> MARNConfig:
        return MARNConfig(vocab_size=VOCAB, num_icd=self.num_icd, num_ccs=self.num_ccs, hidden_size=self.hidden,
                          max_length=max(max_length or self.n, DEFAULT_MAX_LENGTH))

    def describe(self) -> dict:
        return {"shape": self.name, "B": self.batch, "n": self.n, "L_icd": self.num_icd, "L_ccs": self.num_ccs,
                "hidden": self.hidden}


@dataclass
class Plan:
    """What one run measures. main: (shape, dtype, variants[, modes]) in priority order (modes
    default to MODES; a variant "name@dtype" runs in that dtype instead of the entry's)."""

    main: list
    breakdown: list            # (shape, dtype)
    sweep_n: Optional[tuple]   # (base shape, n values, dtype, modes, variants)
    sweep_l: Optional[tuple]   # (base shape, L values, dtype, modes, variants); L = num_icd, num_ccs = 0
    limits: Optional[dict]     # {"shape", "dtype", "batch_cap", "n_cap", "fake_oom_tokens"}
    repeat: int                # timed rounds of the main measurement (after `warmup` calls)
    warmup: int
    breakdown_repeat: int
    sweep_repeat: int
    notes: str


def gpu_plan() -> Plan:
    m50 = Shape("mimic3-50", 16, 4000, *LABELS_50)
    full = Shape("mimic3-full", 16, 4000, *LABELS_FULL)
    return Plan(
        main=[(full, "bf16", VARIANTS), (m50, "bf16", VARIANTS), (full, "fp32", VARIANTS), (m50, "fp32", VARIANTS)],
        breakdown=[(full, "bf16"), (m50, "bf16"), (full, "fp32"), (m50, "fp32")],
        sweep_n=(full, [500, 1000, 2000, 4000, 8000, 16000, 32000], "bf16", MODES, VARIANTS),
        sweep_l=(dataclasses.replace(full, name="L-sweep"), [50, 500, 2000, 8921, 20000, 70000], "bf16", MODES,
                 VARIANTS),
        limits={"shape": full, "dtype": "bf16", "batch_cap": 4096, "n_cap": 131072, "fake_oom_tokens": None},
        repeat=5, warmup=2, breakdown_repeat=5, sweep_repeat=3,
        notes="GPU plan: the issue's shapes (B=16, n=4,000, h=300), bf16 autocast and fp32.")


CPU_BF16 = ("eager", "fused", "eager@bf16", "fused@bf16")  # one process: fp32 and bf16, eager and fused


def cpu_plan() -> Plan:
    m50 = Shape("mimic3-50 (CPU size)", 4, 500, *LABELS_50)
    full = Shape("mimic3-full (CPU size)", 4, 500, *LABELS_FULL)
    big = Shape("mimic3-full B=16 n=1000 (CPU)", 16, 1000, *LABELS_FULL)
    note = Shape("one 4,000-token note (CPU)", 1, 4000, *LABELS_FULL)
    tiny = Shape("tiny-50 (compile size)", 2, 200, *LABELS_50)
    sweep = Shape("n-sweep (CPU size)", 2, 500, *LABELS_FULL)
    return Plan(
        main=[(full, "fp32", CPU_BF16), (big, "fp32", CPU_BF16, ("train",)),
              (note, "fp32", ("eager", "fused", "fused@bf16"), ("inference",)), (m50, "fp32", CPU_BF16),
              (tiny, "fp32", VARIANTS + ("fused@bf16", "compiled@bf16"))],
        breakdown=[(full, "fp32"), (m50, "fp32")],
        sweep_n=(sweep, [250, 500, 1000, 2000], "fp32", ("inference",), ("eager", "fused")),
        sweep_l=(dataclasses.replace(sweep, name="L-sweep (CPU size)"), [50, 1000, 8921, 30000], "fp32",
                 ("inference",), ("eager", "fused")),
        limits=None, repeat=5, warmup=1, breakdown_repeat=3, sweep_repeat=3,
        notes=("CPU plan: reduced B and n (the issue's B=16, n=4,000 take minutes per reference step here), "
               "h=300 and the real label counts; fp32 and bf16 autocast (variant@bf16) interleaved in one process; "
               "torch.compile only at the tiny shape (compilation is slow on "
               "2 cores); sweeps are inference only, because the reference's packed-sequence BiGRU backward "
               "is quadratic in n on the CPU (see /work/shared/notes/toolchain.md)."))


def smoke_plan() -> Plan:
    tiny = Shape("smoke", 2, 48, 20, 6, hidden=16)
    return Plan(
        main=[(tiny, "fp32", VARIANTS), (tiny, "bf16", ("eager", "fused"))],
        breakdown=[(tiny, "fp32")],
        sweep_n=(tiny, [32, 64], "fp32", MODES, VARIANTS),
        sweep_l=(dataclasses.replace(tiny, name="smoke-L"), [10, 40], "fp32", MODES, ("eager", "fused")),
        # CPU stand-in for running out of GPU memory: a synthetic OOM above B·n = 1,000 tokens
        limits={"shape": tiny, "dtype": "fp32", "batch_cap": 64, "n_cap": 512, "fake_oom_tokens": 1000},
        repeat=2, warmup=1, breakdown_repeat=2, sweep_repeat=2,
        notes="smoke: the GPU plan's code paths at tiny sizes on this CPU; nothing written")


# ------------------------------------------------------------------------------------- inputs and runners
def make_batch(shape: Shape, device: torch.device, seed: int = 0):
    """Random tokens with lengths in [n/2, n] (document 0 full), PAD after each document's end;
    ~1 % positive ICD and ~5 % positive CCS targets."""
    g = torch.Generator().manual_seed(seed)
    b, n = shape.batch, shape.n
    tokens = torch.randint(2, VOCAB, (b, n), generator=g)
    lengths = torch.randint(max(1, n // 2), n + 1, (b,), generator=g)
    lengths[0] = n
    tokens.masked_fill_(torch.arange(n)[None, :] >= lengths[:, None], 0)
    y_icd = (torch.rand(b, shape.num_icd, generator=g) < 0.01).float()
    y_ccs = (torch.rand(b, shape.num_ccs, generator=g) < 0.05).float() if shape.num_ccs else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(tokens), to(lengths), to(y_icd), to(y_ccs)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class Runner:
    """One variant of the model with its optimiser; train_step(batch) and infer(batch)."""

    def __init__(self, variant: str, config: MARNConfig, state: dict, device: torch.device, dtype: str) -> None:
        model = marn_fast.MARN(config, backend="auto") if variant == "fused" else reference.MARN(config)
        model.load_state_dict(state)
        self.model = model.to(device)
        self.variant, self.device, self.dtype = variant, device, dtype
        self.backend = getattr(model, "backend", "reference")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=TRAIN.lr, weight_decay=TRAIN.weight_decay)
        # Allocate AdamW's state now (a zero gradient leaves the weights unchanged), so every
        # measured step, the first included, runs with the steady-state memory of training.
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if variant == "compiled":
            self.forward, self.loss = torch.compile(model), torch.compile(model.compute_loss)
        else:
            self.forward, self.loss = model, model.compute_loss

    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def weight_bytes(self) -> int:
        return tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()))

    def state_bytes(self, mode: str) -> int:
        """What stays resident between calls: weights (+ AdamW state when training)."""
        optimiser = [t for s in self.opt.state.values() for t in s.values()] if mode == "train" else []
        return self.weight_bytes() + tensor_bytes(optimiser)

    def train_step(self, batch) -> None:
        tokens, lengths, y_icd, y_ccs = batch
        self.model.train()
        with self.autocast():
            loss = self.loss(self.forward(tokens, lengths), y_icd, y_ccs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, TRAIN.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def infer(self, batch) -> None:
        tokens, lengths, _, _ = batch
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.forward(tokens, lengths)

    def call(self, mode: str, batch) -> Callable[[], None]:
        return (lambda: self.train_step(batch)) if mode == "train" else (lambda: self.infer(batch))


def reference_state(config: MARNConfig, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return reference.MARN(config).state_dict()


def split_variant(name: str, dtype: str) -> tuple[str, str]:
    """"fused@bf16" → ("fused", "bf16"); a bare name runs in the group's dtype."""
    base, _, own = name.partition("@")
    return base, own or dtype


def build_runners(variants, config, device, dtype, errors: dict) -> dict:
    state = reference_state(config)
    runners = {}
    for name in variants:
        base, own_dtype = split_variant(name, dtype)
        try:
            runners[name] = Runner(base, config, state, device, own_dtype)
        except Exception as exc:  # recorded in the results, never fatal for the other variants
            errors[name] = describe_error(exc)
    return runners


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """fn followed by a CUDA synchronize (for timers outside this module, e.g. pytest-benchmark)."""
    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def describe_error(exc: BaseException) -> str:
    return ("OOM: " if is_oom(exc) else "") + f"{type(exc).__name__}: {exc}"[:300]


# ------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Extra peak memory of the code inside the block: CUDA allocator, or the process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.extra = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = 1024 * _status_kib("VmRSS:")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = 1024 * _status_kib("VmHWM:") - self.base


def memory_child(spec: dict) -> None:
    """Child-process body (CPU): extra peak RSS of one call per (variant, mode), printed as JSON."""
    torch.set_num_threads(spec["threads"])
    shape, device = Shape(**spec["shape"]), torch.device("cpu")
    batch = make_batch(shape, device)
    errors: dict = {}
    runners = build_runners(spec["variants"], shape.config(spec.get("max_length")), device, spec["dtype"], errors)
    result = {v: {"error": e} for v, e in errors.items()}
    for variant, runner in runners.items():
        result[variant] = {}
        try:
            runner.infer(batch)  # warm-up: thread pools, library scratch, RAM's folded weights
            for mode in spec["modes"]:
                call = runner.call(mode, batch)
                with PeakMemory(device) as peak:
                    call()
                result[variant][mode] = {"extra": peak.extra, "state": runner.state_bytes(mode)}
        except Exception as exc:
            result[variant] = {"error": describe_error(exc)}
        del runner
        runners[variant] = None
        gc.collect()
    result["vmhwm_bytes"] = 1024 * _status_kib("VmHWM:")
    print(json.dumps(result))


def cpu_memory(shape: Shape, variants, modes, dtype: str, max_length: Optional[int] = None) -> dict:
    """{variant: {mode: {"extra", "state"}} | {"error"}} measured in a fresh child process."""
    spec = {"shape": dataclasses.asdict(shape), "variants": list(variants), "modes": list(modes), "dtype": dtype,
            "threads": torch.get_num_threads(), "max_length": max_length}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(CPU_MMAP_THRESHOLD)}
    proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        return {v: {"error": f"memory child failed: {proc.stderr.strip()[-300:]}"} for v in variants}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- timing
def interleaved(calls: dict, repeat: int, warmup: int, device: torch.device, errors: dict,
                measure_memory: bool) -> dict:
    """{name: {"times": [...], "extra": [...], "warmup_s": first call}}; a failing call drops its name."""
    out = {}
    for name, call in calls.items():
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                time_cpu(call, warmup=0, repeat=1)
            out[name] = {"times": [], "extra": [], "warmup_s": time.perf_counter() - start}
        except Exception as exc:
            errors[name] = describe_error(exc)
        release(device)
    for _ in range(repeat):
        for name in list(out):
            try:
                if measure_memory:
                    with PeakMemory(device) as peak:
                        t = time_cpu(calls[name], warmup=0, repeat=1)
                    out[name]["extra"].append(peak.extra)
                else:
                    t = time_cpu(calls[name], warmup=0, repeat=1)
                out[name]["times"].append(t)
            except Exception as exc:
                errors[name] = describe_error(exc)
                del out[name]
            if name not in out:
                release(device)
    return out


def measure(shape: Shape, dtype: str, runners: dict, modes, repeat: int, warmup: int, device: torch.device,
            build_errors: dict, memory: Optional[dict] = None) -> list[dict]:
    """Rows (one per variant and mode) with times, docs/s, memory and ratios vs eager/compiled."""
    batch = make_batch(shape, device)
    rows = []
    for mode in modes:
        errors = dict(build_errors)
        calls = {v: r.call(mode, batch) for v, r in runners.items()}
        load_start = os.getloadavg()[0]
        result = interleaved(calls, repeat, warmup, device, errors, measure_memory=device.type == "cuda")
        load = {"load_1min_start": load_start, "load_1min_end": os.getloadavg()[0]}
        mode_rows = {}
        for variant in dict.fromkeys(list(runners) + list(build_errors)):
            base, own_dtype = split_variant(variant, dtype)
            row = {**shape.describe(), "dtype": own_dtype, "mode": mode, "variant": base,
                   "backend": runners[variant].backend if variant in runners else None, **load}
            if variant in result:
                times = result[variant]["times"]
                median = statistics.median(times)
                row.update(time_median_s=median, time_best_s=min(times), repeats=len(times),
                           docs_per_s=shape.batch / median, warmup_s=result[variant]["warmup_s"])
                extra = result[variant]["extra"]
                mem = (memory or {}).get(variant, {})
                if extra:
                    row["peak_extra_bytes"] = int(statistics.median(extra))
                elif mode in mem:
                    row["peak_extra_bytes"] = int(mem[mode]["extra"])
                if "peak_extra_bytes" in row:
                    row["state_bytes"] = runners[variant].state_bytes(mode)
                    row["peak_bytes"] = row["peak_extra_bytes"] + row["state_bytes"]
                if "error" in mem:
                    row["memory_error"] = mem["error"]
            else:
                row["error"] = errors.get(variant, "not run")
            mode_rows[variant] = row
        by_kind = {(r["variant"], r["dtype"]): r for r in mode_rows.values()}
        for row in mode_rows.values():
            same = lambda base: by_kind.get((base, row["dtype"]), {})  # noqa: E731
            comparisons = [("ratio_vs_eager", same("eager")), ("ratio_vs_compiled", same("compiled"))]
            if row["dtype"] != "fp32":
                comparisons += [("ratio_vs_eager_fp32", by_kind.get(("eager", "fp32"), {})),
                                ("ratio_vs_fused_fp32", by_kind.get(("fused", "fp32"), {}))]
            for key, ref in comparisons:
                if "time_median_s" in row and "time_median_s" in ref:
                    row[key] = ref["time_median_s"] / row["time_median_s"]
            ref = same("eager")
            if "time_best_s" in row and "time_best_s" in ref:
                row["ratio_vs_eager_best"] = ref["time_best_s"] / row["time_best_s"]
            if "peak_bytes" in row and "peak_bytes" in ref:
                row["memory_vs_eager"] = row["peak_bytes"] / ref["peak_bytes"]
        rows.extend(mode_rows.values())
    return rows


def run_main(plan: Plan, device: torch.device, args, deadline: float, log) -> list[dict]:
    rows = []
    for shape, dtype, variants, *entry_modes in plan.main:
        modes = entry_modes[0] if entry_modes else MODES
        variants = [v for v in variants if not (args.no_compile and v.startswith("compiled"))]
        if time.perf_counter() > deadline:
            rows.append({**shape.describe(), "dtype": dtype, "error": "skipped: time budget spent"})
            continue
        build_errors: dict = {}
        runners = build_runners(variants, shape.config(), device, dtype, build_errors)
        measured = [v for v in runners if not v.startswith("compiled")]
        memory = cpu_memory(shape, measured, modes, dtype) if device.type == "cpu" and measured else None
        new = measure(shape, dtype, runners, modes, plan.repeat, plan.warmup, device, build_errors, memory)
        for row in new:
            log(row)
        rows.extend(new)
        del runners
        release(device)
    return rows


# ------------------------------------------------------------------------------------- breakdown
def component_calls(runner: Runner, batch, mode: str) -> dict:
    """{component: call} on the same inputs; training calls include the piece's backward."""
    model, train = runner.model, mode == "train"
    tokens, lengths, y_icd, y_ccs = batch
    heads = [h for h in (model.icd_head, model.ccs_head) if h is not None]
    model.train(train)
    with torch.set_grad_enabled(train), runner.autocast():  # intermediates of one forward
        x = model.dropout(model.embedding(tokens))
        h = model._encode_tokens(x, lengths)
        o = model.dropout(model._recalibrate(h).contiguous()) if model.ram is not None else h
        logits = [model._head_logits(head, o, lengths) for head in heads]
    leaf = lambda t: t.detach().requires_grad_(t.requires_grad)  # noqa: E731
    x, h, o, logits = leaf(x), leaf(h), leaf(o), [leaf(t) for t in logits]
    g = torch.Generator(device=h.device).manual_seed(1)
    grad = lambda t: torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype)  # noqa: E731
    grads = {"embedding": [grad(x)], "bigru": [grad(h)], "ram": [grad(o)], "attention": [grad(t) for t in logits]}

    def piece(name: str, forward: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            with torch.set_grad_enabled(train), runner.autocast():
                out = forward()
            outs = out if isinstance(out, list) else [out]
            if train and outs[0].requires_grad:
                torch.autograd.backward(outs, grads.get(name))
        return call

    def output(icd, ccs=None):
        return MARNOutput(icd_logits=icd, ccs_logits=ccs)

    calls = {
        "embedding": piece("embedding", lambda: model.dropout(model.embedding(tokens))),
        "bigru": piece("bigru", lambda: model._encode_tokens(x, lengths)),
    }
    if model.ram is not None:
        calls["ram"] = piece("ram", lambda: model.dropout(model._recalibrate(h).contiguous()))
    calls["attention"] = piece("attention", lambda: [model._head_logits(hd, o, lengths) for hd in heads])
    if train:
        calls["loss"] = piece("loss", lambda: model.compute_loss(output(*logits), y_icd, y_ccs))

        def optimiser() -> None:  # gradients are those the pieces above accumulated this round
            torch.nn.utils.clip_grad_norm_(runner.params, TRAIN.grad_clip)
            runner.opt.step()
        calls["optimiser"] = optimiser
    calls["whole"] = runner.call(mode, batch)
    return calls


def run_breakdown(plan: Plan, device: torch.device, deadline: float, log) -> list[dict]:
    rows = []
    for shape, dtype in plan.breakdown:
        for variant in ("eager", "fused"):
            if time.perf_counter() > deadline:
                rows.append({**shape.describe(), "dtype": dtype, "variant": variant,
                             "error": "skipped: time budget spent"})
                continue
            errors: dict = {}
            runners = build_runners([variant], shape.config(), device, dtype, errors)
            batch = make_batch(shape, device)
            for mode in MODES:
                if variant not in runners:
                    rows.append({**shape.describe(), "dtype": dtype, "variant": variant, "mode": mode,
                                 "error": errors[variant]})
                    continue
                runner = runners[variant]
                try:
                    calls = component_calls(runner, batch, mode)
                except Exception as exc:
                    rows.append({**shape.describe(), "dtype": dtype, "variant": variant, "mode": mode,
                                 "error": describe_error(exc)})
                    release(device)
                    continue
                result = interleaved(calls, plan.breakdown_repeat, plan.warmup, device, errors, measure_memory=False)
                runner.opt.zero_grad(set_to_none=True)
                if "whole" not in result:
                    rows.append({**shape.describe(), "dtype": dtype, "variant": variant, "mode": mode,
                                 "error": errors.get("whole", "whole step failed")})
                    continue
                whole = statistics.median(result["whole"]["times"])
                parts = {}
                for name in calls:
                    if name == "whole":
                        continue
                    row = {**shape.describe(), "dtype": dtype, "variant": variant, "backend": runner.backend,
                           "mode": mode, "component": name, "step_time_s": whole}
                    if name in result:
                        parts[name] = statistics.median(result[name]["times"])
                        row.update(time_median_s=parts[name], share_of_step=parts[name] / whole)
                    else:
                        row["error"] = errors.get(name, "not run")
                    rows.append(row)
                other = whole - sum(parts.values())
                rows.append({**shape.describe(), "dtype": dtype, "variant": variant, "backend": runner.backend,
                             "mode": mode, "component": "other", "step_time_s": whole, "time_median_s": other,
                             "share_of_step": other / whole})
                log({"shape": shape.name, "dtype": dtype, "variant": variant, "mode": mode, "step_time_s": whole,
                     **{name: round(t / whole, 3) for name, t in parts.items()}, "other": round(other / whole, 3)})
            del runners
            release(device)
    return rows


# ------------------------------------------------------------------------------------- sweeps
def run_sweep(axis: str, spec: tuple, device: torch.device, args, repeat: int, warmup: int, deadline: float,
              log) -> list[dict]:
    """Time and peak memory vs n (one model per variant, reused: max_length covers the sweep) or
    vs L (L = num_icd, num_ccs = 0: one model per point). Eager and fused first; the compiled
    variant afterwards while the budget lasts (its recompilations are the slowest part)."""
    base, values, dtype, modes, variants = spec
    rows = []
    variants = [v for v in variants if not (args.no_compile and v == "compiled")]
    groups = [[v for v in variants if v != "compiled"], [v for v in variants if v == "compiled"]]
    for group in [g for g in groups if g]:
        runners: dict = {}
        build_errors: dict = {}
        for value in values:
            shape = (dataclasses.replace(base, n=value) if axis == "n"
                     else dataclasses.replace(base, num_icd=value, num_ccs=0))
            describe = {**shape.describe(), "axis": axis, "value": value, "dtype": dtype}
            if time.perf_counter() > deadline:
                rows.extend({**describe, "variant": v, "mode": m, "error": "skipped: time budget spent"}
                            for v in group for m in modes)
                continue
            max_length = max(values) if axis == "n" else None
            if axis == "L" or not runners:
                runners, build_errors = {}, {}
                release(device)
                runners = build_runners(group, shape.config(max_length), device, dtype, build_errors)
            measured = [v for v in runners if v != "compiled"]
            memory = (cpu_memory(shape, measured, modes, dtype, max_length)
                      if device.type == "cpu" and measured else None)
            new = measure(shape, dtype, runners, modes, repeat, warmup, device, build_errors, memory)
            for row in new:
                for key in [k for k in row if k.startswith(("ratio_vs", "memory_vs"))]:
                    del row[key]  # groups are measured apart; ratios are recomputed below
                row.update(axis=axis, value=value)
                log({k: row.get(k) for k in ("axis", "value", "variant", "mode", "time_median_s",
                                             "peak_bytes", "error")})
            rows.extend(new)
        del runners
        release(device)
    by_key = {(r["value"], r.get("mode"), r.get("variant")): r for r in rows}
    for r in rows:
        ref = by_key.get((r["value"], r.get("mode"), "eager"), {})
        if "time_median_s" in r and "time_median_s" in ref:
            r["ratio_vs_eager"] = ref["time_median_s"] / r["time_median_s"]
    return rows


# ------------------------------------------------------------------------------------- limits (GPU)
def largest_fitting(fits: Callable[[int], bool], start: int, cap: int, deadline: float,
                    tolerance: float = 1.1) -> tuple[Optional[int], Optional[int], bool]:
    """(largest x ≤ cap with fits(x), smallest x found not to fit, finished within the deadline).
    Doubling from start, then bisection until the bracket is within `tolerance`."""
    if not fits(start):
        return None, start, True
    lo, hi = start, None
    while hi is None and lo < cap:
        if time.perf_counter() > deadline:
            return lo, hi, False
        nxt = min(2 * lo, cap)
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi is not None and hi > lo * tolerance and hi - lo > 1:
        if time.perf_counter() > deadline:
            return lo, hi, False
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, True


def run_limits(spec: dict, device: torch.device, args, deadline: float, log) -> list[dict]:
    """Largest batch at the shape's n and longest n at its batch for one training step (until an
    out-of-memory error; the smoke plan raises a synthetic one above fake_oom_tokens = B·n)."""
    base, dtype, fake_oom = spec["shape"], spec["dtype"], spec["fake_oom_tokens"]
    rows = []
    variants = [v for v in ("fused", "eager", "compiled") if not (args.no_compile and v == "compiled")]
    for variant in variants:
        errors: dict = {}
        runners = build_runners([variant], base.config(spec["n_cap"]), device, dtype, errors)
        if variant not in runners:
            rows.append({**base.describe(), "dtype": dtype, "variant": variant, "error": errors[variant]})
            continue
        runner = runners[variant]
        peaks: dict = {}

        def fits(batch_size: int, n: int, runner=runner) -> bool:
            shape = dataclasses.replace(base, batch=batch_size, n=n)
            try:
                if fake_oom is not None and batch_size * n > fake_oom:
                    raise torch.OutOfMemoryError(f"smoke plan: synthetic out of memory above {fake_oom} tokens")
                with PeakMemory(device) as peak:
                    runner.train_step(make_batch(shape, device))
                oom = False
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom = True
            if oom:  # outside the except block: its traceback no longer pins the step's tensors
                runner.opt.zero_grad(set_to_none=True)
                release(device)
                return False
            peaks[(batch_size, n)] = peak.extra + runner.state_bytes("train")
            return True

        for axis, start, cap in (("batch", base.batch, spec["batch_cap"]), ("n", base.n, spec["n_cap"])):
            row = {**base.describe(), "dtype": dtype, "variant": variant, "backend": runner.backend, "axis": axis,
                   "cap": cap}
            try:
                if axis == "batch":
                    best, failed, done = largest_fitting(lambda b: fits(b, base.n), start, cap, deadline)
                else:
                    best, failed, done = largest_fitting(lambda n: fits(base.batch, n), start, cap, deadline)
                key = (best, base.n) if axis == "batch" else (base.batch, best)
                row.update(largest=best, smallest_failing=failed, complete=done, peak_bytes_at_largest=peaks.get(key))
            except Exception as exc:
                row["error"] = describe_error(exc)
            log(row)
            rows.append(row)
        del runner, runners
        release(device)
    return rows


# ------------------------------------------------------------------------------------- targets
def where_time_goes(breakdown: list[dict], shape: str, dtype: str, mode: str, variant: str = "fused") -> str:
    parts = [r for r in breakdown if r.get("shape") == shape and r.get("dtype") == dtype and r.get("mode") == mode
             and r.get("variant") == variant and "share_of_step" in r]
    parts.sort(key=lambda r: -r["share_of_step"])
    return ", ".join(f"{r['component']} {100 * r['share_of_step']:.0f}%" for r in parts)


def targets(rows: list[dict], breakdown: list[dict], device: torch.device) -> list[dict]:
    """The issue's measured targets, each with the measured value, whether it is met and, where
    missed, by how much (measured / required) and the fused step's time shares."""
    checks = []
    if device.type == "cuda":
        wanted = [("mimic3-full", "bf16", "train", "ratio_vs_eager", 3.0, ">="),
                  ("mimic3-full", "bf16", "train", "ratio_vs_compiled", 1.5, ">="),
                  ("mimic3-full", "bf16", "train", "memory_vs_eager", 1 / 3, "<=")]
    else:
        wanted = [(r["shape"], r["dtype"], "inference", "ratio_vs_eager", 2.0, ">=") for r in rows
                  if r.get("variant") == "fused" and r.get("dtype") == "fp32" and r.get("mode") == "inference"
                  and "ratio_vs_eager" in r]
        # bf16 on the CPU (issue 25): inference ≥ 4× eager fp32; a training step ≥ 2× marn_fast fp32 and
        # ≥ 2.5× eager fp32 at full codes; one 4,000-token note at full codes in ≤ 0.35 s.
        for r in rows:
            if r.get("variant") != "fused" or r.get("dtype") != "bf16" or "time_median_s" not in r:
                continue
            if r["B"] == 1 and r["n"] == 4000:
                wanted.append((r["shape"], "bf16", r["mode"], "time_median_s", 0.35, "<="))
            elif r["L_icd"] == LABELS_FULL[0] and r["mode"] == "inference":
                wanted.append((r["shape"], "bf16", "inference", "ratio_vs_eager_fp32", 4.0, ">="))
            elif r["L_icd"] == LABELS_FULL[0] and r["mode"] == "train":
                wanted += [(r["shape"], "bf16", "train", "ratio_vs_fused_fp32", 2.0, ">="),
                           (r["shape"], "bf16", "train", "ratio_vs_eager_fp32", 2.5, ">=")]
    for shape, dtype, mode, key, required, op in wanted:
        row = next((r for r in rows if r.get("shape") == shape and r.get("dtype") == dtype and r.get("mode") == mode
                    and r.get("variant") == "fused"), {})
        measured = row.get(key)
        met = None if measured is None else (measured >= required if op == ">=" else measured <= required)
        checks.append({"shape": shape, "dtype": dtype, "mode": mode, "metric": key, "required": f"{op} {required:.3g}",
                       "measured": measured, "met": met,
                       "measured_over_required": None if measured is None else measured / required,
                       "fused_shares": where_time_goes(breakdown, shape, dtype, mode),
                       "eager_shares": where_time_goes(breakdown, shape, dtype, mode, "eager")})
    return checks


# ------------------------------------------------------------------------------------- plots
def plot_sweep(rows: list[dict], axis: str, path: Path, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.get("axis") == axis and "time_median_s" in r for r in rows):
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"train": "-", "inference": "--"}
    for variant in VARIANTS:
        for mode in MODES:
            pts = sorted((r["value"], r) for r in rows if r.get("axis") == axis and r.get("variant") == variant
                         and r.get("mode") == mode and "time_median_s" in r)
            if not pts:
                continue
            label = f"{variant} {mode}"
            ax_t.plot([v for v, _ in pts], [r["time_median_s"] for _, r in pts], styles[mode], marker="o", label=label)
            mem = [(v, r["peak_bytes"] / 2 ** 20) for v, r in pts if "peak_bytes" in r]
            if mem:
                ax_m.plot(*zip(*mem), styles[mode], marker="o", label=label)
    sample = next((r for r in rows if r.get("axis") == axis), {})
    fixed = (f"B={sample.get('B')}, L={sample.get('L_icd')}+{sample.get('L_ccs')}" if axis == "n"
             else f"B={sample.get('B')}, n={sample.get('n')}")
    for ax, ylabel in ((ax_t, "seconds per call (median)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("document length n" if axis == "n" else "labels L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"MARN vs {axis} ({fixed}, {sample.get('dtype')}) on {device}", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_breakdown(rows: list[dict], path: Path, device: str) -> None:
    """One stacked bar per (shape, dtype, mode, variant): each piece's share of the whole call."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keyed = {}
    for r in rows:
        if "share_of_step" in r:
            keyed.setdefault((r["shape"], r["dtype"], r["mode"], r["variant"]), {})[r["component"]] = r
    if not keyed:
        return
    bars = list(keyed)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.8))
    left = [0.0] * len(bars)
    colours = plt.get_cmap("tab10").colors
    for i, comp in enumerate(COMPONENTS_TRAIN + ("other",)):
        widths = [max(0.0, keyed[bar].get(comp, {}).get("share_of_step", 0.0)) for bar in bars]
        ax.barh(range(len(bars)), widths, left=left, color=colours[i % 10], label=comp)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([f"{s} {d} {m} {v} ({1000 * next(iter(keyed[(s, d, m, v)].values()))['step_time_s']:.0f} ms)"
                        for s, d, m, v in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the whole call (median of each piece / median of the whole)")
    ax.legend(fontsize=7, ncol=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(bars)))
    ax.set_title(f"Where a MARN call's time goes on {device}", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
        os.chmod(tmp, 0o644)
    plt.close(fig)


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plan", choices=("auto", "smoke"), default="auto",
                   help="auto: the device's plan; smoke: tiny sizes, nothing written")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--sections", default="main,breakdown,sweep,limits")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new measurements after this many seconds (default 900 CPU, 420 CUDA)")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default: the plan's)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_model: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    plan = smoke_plan() if args.plan == "smoke" else gpu_plan() if device.type == "cuda" else cpu_plan()
    if args.repeat:
        plan.repeat = args.repeat
    sections = set(args.sections.split(","))
    budget = args.budget_s if args.budget_s is not None else (420.0 if device.type == "cuda" else 900.0)
    start = time.perf_counter()
    deadline = start + budget
    write = args.plan != "smoke"
    log = lambda row: print(json.dumps(row, default=str), flush=True)  # noqa: E731
    meta = {"plan": plan.notes, "repeat": plan.repeat, "warmup": plan.warmup, "budget_s": budget,
            "breakdown_repeat": plan.breakdown_repeat, "sweep_repeat": plan.sweep_repeat,
            "timing": ("interleaved rounds after warm-up; median (ratio_vs_*) and best (ratio_vs_eager_best); "
                       "load_1min_* = the machine's 1-minute load average around each measurement"),
            "memory": ("CUDA: max_memory_allocated − allocated before the call, + resident weights (+ AdamW state)"
                       if device.type == "cuda" else
                       "CPU: VmHWM − VmRSS before the call in a fresh child process per shape (glibc mmap threshold "
                       f"{CPU_MMAP_THRESHOLD} B), + resident weights (+ AdamW state); compiled variant not measured"),
            "train_step": f"forward + loss, backward, clip_grad_norm {TRAIN.grad_clip}, AdamW lr {TRAIN.lr}",
            "variants": {"eager": "marn_fast.reference.MARN", "compiled": "torch.compile(reference)",
                         "fused": "marn_fast.MARN(backend='auto')"},
            "extension": marn_fast.ops.cpu_extension_available()}
    print(f"bench_model on {device_name(device)}: plan {args.plan}, sections {sorted(sections)}, "
          f"budget {budget:.0f} s, {torch.get_num_threads()} threads", flush=True)
    folder = RESULTS_DIR / device_slug(device) if write else Path(tempfile.mkdtemp(prefix="bench_model_smoke_"))
    rows, breakdown = [], []
    measured = lambda rs: any("time_median_s" in r for r in rs)  # noqa: E731  (else keep older files)
    if "main" in sections:
        rows = run_main(plan, device, args, deadline, log)
        if write and measured(rows):  # now, and again with the targets once the breakdown is in
            write_results(NAME, rows, {**meta, "targets": targets(rows, [], device)}, device)
    if "breakdown" in sections:
        breakdown = run_breakdown(plan, device, deadline, log)
        if measured(breakdown):
            if write:
                write_results(f"{NAME}_breakdown", breakdown, meta, device)
                if measured(rows):
                    write_results(NAME, rows, {**meta, "targets": targets(rows, breakdown, device)}, device)
            plot_breakdown(breakdown, folder / f"{NAME}_breakdown.png", device_name(device))
    if "sweep" in sections:
        sweep = []
        for axis, spec in (("n", plan.sweep_n), ("L", plan.sweep_l)):
            if spec:
                sweep += run_sweep(axis, spec, device, args, plan.sweep_repeat, 1, deadline, log)
                plot_sweep(sweep, axis, folder / f"{NAME}_sweep_{axis}.png", device_name(device))
        if write and measured(sweep):
            write_results(f"{NAME}_sweep", sweep, {**meta, "L_sweep": "L = num_icd, num_ccs = 0"}, device)
    if "limits" in sections and plan.limits:
        limits = run_limits(plan.limits, device, args, deadline, log)
        if write and any("largest" in r for r in limits):
            write_results(f"{NAME}_limits", limits, {**meta, "step": "one training step (bf16 autocast on CUDA)"},
                          device)
    if not write:
        print(f"smoke run: plots in {folder}")
        for row in targets(rows, breakdown, device):
            log(row)
    print(f"bench_model finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
