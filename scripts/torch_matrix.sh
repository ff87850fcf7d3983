#!/usr/bin/env bash
# Build marn_fast and run its tests against each end of the supported torch range, each in a
# scratch venv, and write a summary to results/torch-matrix/ (summary.md, summary.json, one log
# per version). CI (.ci/run) tests one torch; this script covers the ends of the range.
#
#   scripts/torch_matrix.sh                 # the oldest and the newest supported torch
#   scripts/torch_matrix.sh 2.5.1 2.13.0    # chosen versions
#
# Per version: a venv; `pip install torch==V` alone and pinned (a CPU build where the registry
# has one, else the CUDA build, which runs on the CPU too); the matching triton (the CUDA builds
# pull it in; TRITON_FOR below for CPU builds); the test requirements; marn_fast built in place
# with its C++ extension against that torch (CPU extension only: MARN_FAST_CUDA=0); then pytest
# under TRITON_INTERPRET=1 with MARN_FAST_REQUIRE_EXTENSION=1.
#
# Environment: MATRIX_DIR (scratch, default /tmp/marn-fast-torch-matrix; each venv is removed
# after its run unless KEEP=1; a CUDA build's venv takes ~5 GB), TESTS ("all", the default, or a
# pytest selection such as "tests/test_focal_loss.py tests/test_model.py"), OUT (default
# results/torch-matrix), NICE (default 10), SUMMARY_ONLY=1 (no runs: rewrite the summary of the
# given versions from OUT/torch-<version>.json, e.g. after running the versions in parallel).
# Exit status: 0 when every version built and passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OLDEST=2.7.1   # custom_op reads string annotations in the defining module only from 2.7 (see pyproject.toml)
NEWEST=2.14.1  # the newest this machine's pip may install (PyPI has newer; untested here)
declare -A TRITON_FOR=([2.13.0+cpu]=3.7.1 [2.13.0]=3.7.1)  # CPU builds, which do not pin one

VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=("$OLDEST" "$NEWEST")
MATRIX_DIR=${MATRIX_DIR:-/tmp/marn-fast-torch-matrix}
OUT=${OUT:-$ROOT/results/torch-matrix}
TESTS=${TESTS:-all}
NICE=${NICE:-10}
export MAX_JOBS=${MAX_JOBS:-2} PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$MATRIX_DIR" "$OUT"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

run_version() {  # $1 = torch version; writes $OUT/torch-$1.{log,xml,json}
  local v=$1 dir="$MATRIX_DIR/torch-$v" start
  start=$(date +%s)
  rm -rf "$dir" && mkdir -p "$dir"
  local status=ok
  {
    log "venv for torch $v"
    python3 -m venv "$dir/venv"
    # shellcheck disable=SC1091
    . "$dir/venv/bin/activate"
    pip install -q "torch==$v" || status=install-failed
    if [ "$status" = ok ] && ! python -c "import triton" 2>/dev/null; then
      pip install -q "triton==${TRITON_FOR[$v]:-}" || status=install-failed
    fi
    [ "$status" = ok ] && { pip install -q numpy setuptools wheel ninja pybind11 \
      -r requirements/test.txt -r requirements/data.txt -r requirements/plots.txt || status=install-failed; }
    if [ "$status" = ok ]; then
      log "build marn_fast against torch $v"
      mkdir -p "$dir/src"
      git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 tar cf - 2>/dev/null) \
        | tar xf - -C "$dir/src"
      (cd "$dir/src" && MARN_FAST_CUDA=0 nice -n "$NICE" pip install -q --no-build-isolation -e .) || status=build-failed
    fi
    if [ "$status" = ok ]; then
      log "tests under torch $v"
      local selection=()
      [ "$TESTS" = all ] || read -r -a selection <<< "$TESTS"
      (cd "$dir/src" && TRITON_INTERPRET=1 MARN_FAST_REQUIRE_EXTENSION=1 nice -n "$NICE" \
        python -m pytest -q -p no:cacheprovider -o addopts="" --junitxml="$OUT/torch-$v.xml" "${selection[@]}") \
        || status=tests-failed
    fi
    python - "$v" "$status" "$(( $(date +%s) - start ))" "$OUT" "$TESTS" <<'EOF'
import json, platform, sys
import xml.etree.ElementTree as ET
from pathlib import Path
version, status, seconds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
row = {"requested": version, "status": status, "seconds": seconds, "python": platform.python_version(),
       "tests_selected": sys.argv[5]}
for name in ("torch", "triton", "numpy"):
    try:
        row[name] = __import__(name).__version__
    except Exception as exc:  # not installed: the row says so
        row[name] = f"missing ({type(exc).__name__})"
xml = out / f"torch-{version}.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total = int(suite.get("tests", 0))
    counts = {k: int(suite.get(k, 0)) for k in ("failures", "errors", "skipped")}
    row.update(tests=total, passed=total - sum(counts.values()), failed=counts["failures"],
               errors=counts["errors"], skipped=counts["skipped"],
               not_passed=sorted(f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None))
(out / f"torch-{version}.json").write_text(json.dumps(row, indent=2) + "\n")
EOF
    deactivate 2>/dev/null || true
  } > "$OUT/torch-$v.log" 2>&1
  log "torch $v: $status ($(( $(date +%s) - start )) s); log in $OUT/torch-$v.log"
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
  [ "$status" = ok ]
}

failed=0
if [ "${SUMMARY_ONLY:-0}" != 1 ]; then  # SUMMARY_ONLY=1: only rewrite the summary from OUT/torch-*.json
  for v in "${VERSIONS[@]}"; do
    run_version "$v" || failed=1
  done
fi

python3 - "$OUT" "$TESTS" "${VERSIONS[@]}" <<'EOF'
import json, sys, time
from pathlib import Path
out, tests, versions = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = [json.loads((out / f"torch-{v}.json").read_text()) for v in versions if (out / f"torch-{v}.json").is_file()]
(out / "summary.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tests": tests, "runs": rows},
                                             indent=2) + "\n")
lines = [f"# torch matrix ({time.strftime('%Y-%m-%d')}; written by scripts/torch_matrix.sh)", "",
         "CPU only, Triton kernels under TRITON_INTERPRET=1; `skipped` includes xfailed tests (JUnit counts "
         "them so).", "",
         "| torch | triton | numpy | python | status | passed | failed | errors | skipped | minutes | tests |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r['torch']} | {r['triton']} | {r['numpy']} | {r['python']} | {r['status']} | "
                 f"{r.get('passed', '-')} | {r.get('failed', '-')} | {r.get('errors', '-')} | {r.get('skipped', '-')} | "
                 f"{r['seconds'] / 60:.1f} | {r.get('tests_selected', tests)} |")
for r in rows:
    if r.get("not_passed"):
        lines += ["", f"Not passed under torch {r['torch']}:", *[f"- `{t}`" for t in r["not_passed"]]]
    elif r["status"] != "ok":  # no test ran: the last error of the log says why
        log = out / f"torch-{r['requested']}.log"
        errors = [line.strip() for line in log.read_text(errors="replace").splitlines()
                  if line.startswith("E ") or "Error:" in line] if log.is_file() else []
        lines += ["", f"torch {r['torch']}: {r['status']}: `{errors[-1][:300] if errors else 'see the log'}`"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $failed
