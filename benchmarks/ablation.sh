#!/usr/bin/env bash
# The ablation table of BENCHMARKS.md (item-level DARec, 6 epochs per row, amazon-scientific): BPR first (its
# checkpoint warm-starts the DARec+BPR-warm rows), then one row per DARec variant of benchmarks/profiles/ablation.yaml
# (or those named). Finished rows are reused, so a cut-off run goes on from the first row it had not finished.
#   OMP_NUM_THREADS=1 bash benchmarks/ablation.sh [seed] [variants...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEED=${1:-2020}
shift || true
PROFILE=benchmarks/profiles/ablation.yaml
VARIANTS=${*:-$("$PY" -c "import yaml; print(*(v for v in yaml.safe_load(open('$PROFILE'))['variants'] if v != 'BPR'))")}
OUT=benchmarks/results/amazon-scientific-ablation
run() { "$PY" benchmarks/run.py --dataset=amazon-scientific --profile=ablation --reference=DARec "$@"; }

# One BPR (seed 2020) warm-starts the rows of every seed.
run --models=BPR --seeds=2020
mkdir -p "$OUT/saved"
if [ ! -f "$OUT/saved/BPR-seed2020.pth" ]; then
  cp "$("$PY" -c "import json; print(json.load(open('$OUT/rows/BPR-seed2020.json'))['saved_model_file'])")" \
     "$OUT/saved/BPR-seed2020.pth"
fi
for variant in $VARIANTS; do
  run --models="$variant" --seeds="$SEED"
done
run --models="BPR,$(echo "$VARIANTS" | tr ' ' ',')" --seeds="$SEED" --report_only
