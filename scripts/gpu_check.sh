#!/usr/bin/env bash
# One call on a GPU machine (H100/H200; Python 3.12 with torch + triton preinstalled, no internet):
# build marn_fast with its CUDA extension, run the whole test suite on the GPU, run every
# benchmark's GPU part (they write benchmarks/results/<device>/), and pack logs and results into
# $OUT/gpu_check.tgz (the device tool brings back at most 8 files) plus $OUT/summary.txt.
# Usage from the repository root:  bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
LOGS=$PWD/gpu_check_logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0

run() {  # run NAME CMD...: log to $LOGS/NAME.log, remember failures, keep going
  local name=$1; shift
  printf '\n=== %s (%s)\n' "$name" "$(date +%H:%M:%S)" | tee -a "$OUT/summary.txt"
  "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || { echo "!!! $name failed with exit code $rc" | tee -a "$OUT/summary.txt"; status=1; }
}

run env bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
# Build in place: no network, no build isolation, no dependency resolution.
run build env MARN_FAST_CUDA=1 python3 setup.py build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MARN_FAST_REQUIRE_EXTENSION=1
run tests python3 -m pytest -q -p no:cacheprovider tests
# Every op benchmark takes --device; the GPU runs are their CUDA parts. The model benchmark gets
# a time budget so the whole call fits one 10-minute device command.
for bench in benchmarks/bench_focal_loss.py benchmarks/bench_label_attention.py benchmarks/bench_ram.py; do
  run "$(basename "$bench" .py)" python3 "$bench" --device cuda
done
run bench_model python3 benchmarks/bench_model.py --device cuda --sections main,breakdown --budget-s 180
run pytest-benchmark python3 -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
  --benchmark-json pytest_benchmark.json
run report python3 benchmarks/report.py --pytest-json pytest_benchmark.json
tar czf "$OUT/gpu_check.tgz" gpu_check_logs benchmarks/results
echo "gpu_check finished with status $status" | tee -a "$OUT/summary.txt"
exit $status
