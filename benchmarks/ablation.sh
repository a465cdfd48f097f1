#!/usr/bin/env bash
# The ablation table of BENCHMARKS.md (item-level DARec, 6 epochs per row, amazon-scientific): BPR first (its
# checkpoint warm-starts the DARec+BPR-warm rows), then one DARec row per setting. Finished rows are reused, so a
# cut-off run goes on from the first row it had not finished.
#   OMP_NUM_THREADS=1 bash benchmarks/ablation.sh [seed] [variants...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEED=${1:-2020}
shift || true
VARIANTS=${*:-DARec DARec-causal DARec+BPR-warm DARec+BPR DARec-no-align DARec-no-id DARec+BPR-warm-frozen}
OUT=benchmarks/results/amazon-scientific-ablation
run() { "$PY" benchmarks/run.py --dataset=amazon-scientific --profile=ablation --seeds="$SEED" --reference=DARec "$@"; }

run --models=BPR --seeds=2020
mkdir -p "$OUT/saved"
if [ ! -f "$OUT/saved/BPR-seed2020.pth" ]; then
  cp "$("$PY" -c "import json; print(json.load(open('$OUT/rows/BPR-seed2020.json'))['saved_model_file'])")" \
     "$OUT/saved/BPR-seed2020.pth"
fi
for variant in $VARIANTS; do
  run --models="$variant"
done
run --models="BPR,$(echo "$VARIANTS" | tr ' ' ',')" --report_only
