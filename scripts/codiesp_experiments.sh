#!/usr/bin/env bash
# The CodiEsp experiment set (issue #10): MARN on English diagnoses (three seeds) with the TF-IDF +
# logistic-regression baseline, the Spanish run with attention evidence scored against the gold
# CodiEsp-X spans, the ablations (no MTL, no RAM, BCE instead of focal; three seeds each), the
# reference-backend twin of seed 0, and the report that puts them side by side.
#
#   scripts/codiesp_experiments.sh DATA_DIR OUT_DIR [--quick] [extra marn-fast train flags...]
#
# DATA_DIR: a CodiEsp release folder (train/, dev/, test/, background/; Zenodo 10.5281/zenodo.3693570
# and the gold standard record 3837305). OUT_DIR: one folder per run and OUT_DIR/report.txt.
# --quick: a smoke version (d_r 16, one epoch, one seed) that checks the whole chain in minutes.
# Extra flags go to every `marn-fast train` (e.g. --hidden-size 128 --max-minutes 20).
#
# PARTS selects what runs (default: all of them, in this order):
#   PARTS="w2v main es ablations recipe backends report" scripts/codiesp_experiments.sh DATA OUT
#   w2v        word2vec matrices for every language and seed into OUT_DIR/w2v-cache (needs gensim);
#              every later run starts from a copy of them, so a machine without gensim (the GPU
#              machines) can train once the cache exists (run w2v where gensim is, carry OUT_DIR)
#   main       en-D: MARN, seeds 0 1 2, baseline in every run                     → OUT/en-D
#   es         es-D: the Spanish run, evidence P/R/F1 vs random tokens            → OUT/es-D
#   ablations  en-D without MTL / without RAM / with BCE, seeds 0 1 2             → OUT/en-D-{no-mtl,no-ram,bce}
#   recipe     en-D and es-D with the setting that learned best on 500 cases (issue #10: no RAM,
#              focal, lr 3e-2, weight decay 0.3, up to 50 epochs, patience 8, word2vec W2V_EPOCHS;
#              lr 1e-3 only learns the code-frequency prior here)
#                                                                  → OUT/en-D-recipe, OUT/es-D-recipe
#   backends   en-D seed 0 on the reference backend (same seed as main's seed 0) → OUT/en-D-reference
#   report     marn-fast codiesp-report over every run folder present            → OUT/report.txt
# SEEDS overrides the seeds (default "0 1 2"; --quick: "0"). W2V_EPOCHS: word2vec passes over the
# training + background text (default 100, --quick 5: the package default of 5, made for MIMIC's
# ~50k notes, leaves the vectors of this 3,251-case corpus undertrained). CUDA is used when present (the trainer
# picks it); nothing here needs network access.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
DATA=$1
OUT=$2
shift 2
QUICK=0
if [ "${1:-}" = "--quick" ]; then
    QUICK=1
    shift
fi
EXTRA=("$@")
PARTS=${PARTS:-"w2v main es ablations recipe backends report"}
PY=${PYTHON:-python}
MARN=("$PY" -m marn_fast)
if [ $QUICK = 1 ]; then
    SEEDS=${SEEDS:-"0"}
    W2V_EPOCHS=${W2V_EPOCHS:-5}
    COMMON=(--hidden-size 16 --epochs 1 --no-progress --word2vec-epochs "$W2V_EPOCHS")
else
    SEEDS=${SEEDS:-"0 1 2"}
    W2V_EPOCHS=${W2V_EPOCHS:-100}
    COMMON=(--no-progress --word2vec-epochs "$W2V_EPOCHS")
fi
read -r -a SEED_LIST <<< "$SEEDS"
mkdir -p "$OUT"
CACHE="$OUT/w2v-cache"

has() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/experiments.log"; }

seed_caches() {  # copy the shared word2vec matrices into each run folder's cache (keys are content hashes)
    local run=$1
    [ -d "$CACHE" ] || return 0
    for s in "${SEED_LIST[@]}"; do
        mkdir -p "$run/seed-$s/cache"
        cp -n "$CACHE"/*.npy "$run/seed-$s/cache/" 2>/dev/null || true
    done
}

train() {  # train NAME LANGUAGE [flags...]: one run per seed in OUT/NAME/seed-<n>/
    local name=$1 language=$2
    shift 2
    local run="$OUT/$name"
    seed_caches "$run"
    log "train $name ($language; seeds ${SEED_LIST[*]}) $*"
    local start=$SECONDS
    # --recipe official: every part states its flags against the package defaults, not the shipped recipe
    "${MARN[@]}" train --data codiesp --recipe official --data-dir "$DATA" --language "$language" --codes D \
        --seeds "${SEED_LIST[@]}" --out "$run" --resume "$@" "${COMMON[@]}" "${EXTRA[@]}" > "$run.log" 2>&1 \
        || { log "FAILED: $name (see $run.log)"; return 1; }
    log "done $name in $((SECONDS - start)) s"
}

if has w2v; then
    log "word2vec cache → $CACHE (seeds ${SEED_LIST[*]}; $W2V_EPOCHS epochs)"
    "$PY" - "$DATA" "$CACHE" "$W2V_EPOCHS" "${SEED_LIST[@]}" <<'EOF'
import sys, warnings
from marn_fast.training.experiment import DataSettings, Experiment
warnings.simplefilter("ignore")
data, cache, epochs, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(s) for s in sys.argv[4:]]
try:
    import gensim  # noqa: F401
except ImportError:
    sys.exit("w2v: gensim is not installed here; run this part where it is and carry the cache folder")
for language in ("en", "es"):
    for seed in seeds:
        exp = Experiment(DataSettings(data_dir=data, source="codiesp", language=language, codes="D", seed=seed, ccs="none",
                                      word2vec_epochs=epochs))
        exp.word2vec(cache_dir=cache)
        print(f"word2vec {language} seed {seed}: vocabulary {len(exp.vocab)}")
EOF
fi

has main && train en-D en
has es && train es-D es
if has ablations; then
    train en-D-no-mtl en --no-mtl --no-baseline
    train en-D-no-ram en --no-ram --no-baseline
    train en-D-bce en --loss bce --no-baseline
fi
if has recipe; then
    RECIPE=(--no-ram --lr 3e-2 --weight-decay 0.3 --epochs 50 --patience 8 --no-baseline)
    train en-D-recipe en "${RECIPE[@]}"
    train es-D-recipe es "${RECIPE[@]}"
fi
if has backends; then
    all_seeds=("${SEED_LIST[@]}")
    SEED_LIST=("${SEED_LIST[0]}")
    train en-D-reference en --backend reference --no-baseline
    SEED_LIST=("${all_seeds[@]}")
fi
if has report; then
    runs=()
    for name in en-D es-D en-D-no-mtl en-D-no-ram en-D-bce en-D-recipe es-D-recipe en-D-reference; do
        [ -d "$OUT/$name" ] && runs+=("$OUT/$name")
    done
    if [ ${#runs[@]} -gt 0 ]; then
        "${MARN[@]}" codiesp-report "${runs[@]}" --out "$OUT/report.json" | tee "$OUT/report.txt"
    else
        log "report: no run folders in $OUT"
    fi
fi
