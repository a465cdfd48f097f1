#!/usr/bin/env bash
# Equal-budget tuning on amazon-scientific's validation set (BENCHMARKS.md, "Tuning"): the same number of trials for
# each model, drawn at random from its space in hyper/equal-budget/<model>.hyper, each trained to early stopping under
# the usual protocol (seed 2020). The text models read 64-token item text; DARec adds the last item's text vector.
# Resumable: the same command started again replays the finished trials (the tuning log) and goes on.
#   OMP_NUM_THREADS=1 bash benchmarks/tune.sh MODEL [trials]     # MODEL: SASRec | TextSASRec | DARec
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=$1
TRIALS=${2:-8}
OUT=benchmarks/results/amazon-scientific-tuning
case "$MODEL" in
  SASRec) MODEL_ARGS=() ;;
  TextSASRec) MODEL_ARGS=(--item_max_tokens=64) ;;
  DARec) MODEL_ARGS=(--item_max_tokens=64 --last_item_skip=True) ;;
  *) echo "tune.sh: MODEL must be SASRec, TextSASRec or DARec, not '$MODEL'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
"$PY" run_hyper.py --model="$MODEL" --dataset=amazon-scientific --data_path=../shared/datasets \
  --params_file="hyper/equal-budget/$MODEL.hyper" --algo=random --max_evals="$TRIALS" --early_stop="$TRIALS" \
  --output_file="$OUT/$MODEL.result" --eval_batch_size=256 --show_progress=False "${MODEL_ARGS[@]}"
