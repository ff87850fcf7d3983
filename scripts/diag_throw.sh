#!/usr/bin/env bash
# Does a TORCH_CHECK failure in marn_fast._C crash the process on this machine? Each case in its
# own process; a native backtrace of the first crashing one (cuda-gdb also debugs host code); and
# the same case against a second build of _C without OpenMP.
cd "$(dirname "$0")/.."
TORCH_LIB=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
ldd marn_fast/_C.*.so | grep -E "gomp|stdc|gcc_s|torch_cpu"
ldd "$TORCH_LIB/libtorch_cpu.so" | grep -E "gomp|stdc"
g++ --version | head -1; /opt/gcc/bin/g++ --version 2>/dev/null | head -1
for dtype in float64 float32; do
  for i in 0 1 2 3; do
    python3 scripts/diag_throw.py $dtype $i > /tmp/diag.out 2>&1; rc=$?; tail -2 /tmp/diag.out
    echo "  [$dtype case $i] exit $rc"
  done
done
timeout 60 cuda-gdb -q -batch -ex run -ex bt --args python3 scripts/diag_throw.py float64 1 2>&1 | grep -E "^#|signal|Error" | head -40
mkdir -p /tmp/alt && git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C /tmp/alt
(cd /tmp/alt && MARN_FAST_OPENMP=0 MARN_FAST_CUDA=0 timeout 120 python3 setup.py build_ext --inplace > /tmp/alt/build.log 2>&1; echo "no-OpenMP build exit $?")
for i in 1 3; do
  PYTHONPATH=/tmp/alt python3 scripts/diag_throw.py float64 $i > /tmp/diag.out 2>&1; rc=$?; tail -2 /tmp/diag.out
  echo "  [no OpenMP, case $i] exit $rc"
done
