#!/usr/bin/env bash
# The embedded `mini` model's recipe end to end, from images to a checkpoint, each stage timed.
# Usage: bash scripts/train_recipe.sh OUT DATA_FOLDER [DATA_FOLDER ...]
#   e.g. bash scripts/train_recipe.sh runs/recipe ../shared/data/abd-mri ../shared/data/abd-ct
# No label is read. OUT gets pseudolabels/ (the cache), vae/, mini/, mini-aligned/ (each a lib.train
# --out folder; a stage whose model/ exists is resumed / skipped by lib.train) and times.tsv; the
# result is OUT/mini-aligned/model (copy it into apps/sdfsmis/model/ to serve it). THREADS (default 2)
# sets torch threads for every stage; a GPU is used when there is one. The stages and their
# settings are those of apps/sdfsmis/model/README.md ("Recipe").
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/train_recipe.sh OUT DATA_FOLDER [DATA_FOLDER ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
OUT=$1
shift
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=1 PYTHONPATH=.
export SDFSMIS_PSEUDOLABEL_CACHE="$OUT/pseudolabels"
mkdir -p "$OUT"
TIMES="$OUT/times.tsv"
echo -e "stage\tseconds" > "$TIMES"
START=$(date +%s)

stage() {  # stage NAME COMMAND...: run it, append its wall time to times.tsv
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "== $name: $*"
  "$@"
  echo -e "$name\t$(( $(date +%s) - t0 ))" | tee -a "$TIMES"
}

precompute() {  # one process per folder (pseudo-labels are one thread each)
  local pids=() f
  for f in "$@"; do
    "$PY" -m lib.data.precompute "$f" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

stage pseudolabels precompute "$@"
stage vae "$PY" -m lib.train "$@" --preset mini --stage vae --iterations 1500 --batch-size 2 \
  --threads "$THREADS" --no-progress-bar --out "$OUT/vae"
stage network "$PY" -m lib.train "$@" --init "$OUT/vae/model" --align none --iterations 5000 --stop-at 4000 \
  --merge 8 --vanish 0.2 --gap 6 --schedule cosine --threads "$THREADS" --checkpoint-every 500 \
  --no-progress-bar --out "$OUT/mini"
stage aligned "$PY" -m lib.train "$@" --init "$OUT/mini/model" --align registration --iterations 2500 --merge 8 \
  --vanish 0.1 --gap 2 --aug-strength 0.5 --schedule cosine --threads "$THREADS" --checkpoint-every 250 \
  --no-progress-bar --out "$OUT/mini-aligned"
echo -e "total\t$(( $(date +%s) - START ))" | tee -a "$TIMES"
echo "model: $OUT/mini-aligned/model"
