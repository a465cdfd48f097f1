#!/usr/bin/env bash
# Paper profile on one GPU (full SmolLM2 backbone, paper-like settings), aimed at under 10 minutes on one H100.
# Usage: bash benchmarks/gpu.sh OUT_DIR [more benchmarks/run.py flags, e.g. --set llm_path=/path/to/model]
# Writes memory-paper-step.json (one training step of the paper row DARec-tokens on its largest batch: the issue's
# 40 GB check, default backbone), results.md, results.csv, runs.json, speed.json and ndcg_recall.png to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [run.py flags]}
shift
PY=${PYTHON:-python3}
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1  # TF32 matmuls: the backbone runs in float32
"$PY" benchmarks/memory.py --dataset="${DATASET:-amazon-scientific}" --paper_step --settings=sdpa,sdpa+checkpointing \
  --out "$OUT/memory-paper-step.json"
"$PY" benchmarks/run.py --dataset="${DATASET:-amazon-scientific}" --profile=paper \
  --models="${MODELS:-SASRec,DARecbase,DARec}" --seeds="${SEEDS:-2020}" --out "$OUT" --speed "$@"
