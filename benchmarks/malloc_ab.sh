#!/bin/bash
# A/B of glibc malloc settings on DARec's speed rows (amazon-scientific, cpu profile): two rounds of
# (default malloc, tuned malloc), each a full `run.py --speed_only` in its own process, then a table of the
# step ratios. The ratio is what compares across runs: DARec and the plain backbone run in turns within a run.
# tuned: a fixed 32 MB mmap threshold (glibc's largest), no trimming of the heap top, 256 MB top pad, so freed
# blocks stay in the process instead of going back to the OS and faulting pages in again on the next step.
# The runs share one item text cache (computed by the first, gitignored under OUT/saved).
# Usage: bash benchmarks/malloc_ab.sh [OUT]   (default benchmarks/results/malloc-ab-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/malloc-ab-cpu}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=2
for round in 1 2; do
  for variant in base tuned; do
    out=$OUT/$variant-$round
    rm -rf "$out"; mkdir -p "$out"
    malloc_env=()
    if [ "$variant" = tuned ]; then
      malloc_env=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456)
    fi
    env "${malloc_env[@]}" "$PY" benchmarks/run.py --dataset=amazon-scientific --profile=cpu \
      --models=DARec-tokens,DARec --speed_only --out="$out" --set item_text_cache_dir="$OUT/saved/item_text_cache" \
      > "$out.log" 2>&1
  done
done
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | model | DARec step s | plain step s (every token) | step ratio [quartiles] | eval ratio to SASRec |")
print("|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if (p / "rows").is_dir()):
    for model in ("DARec-tokens", "DARec"):
        r = json.loads((run / "rows" / f"{model}.speed.json").read_text())
        key = "step_ratio_plain_all" if "step_ratio_plain_all" in r else "step_ratio"
        plain = r.get("plain_all_step_s", r["plain_step_s"])
        q1, q3 = r[f"{key}_iqr"]
        print(f"| {run.name} | {model} | {r['darec_step_s']:.3f} | {plain:.3f} | {r[key]:.3f} [{q1:.3f}-{q3:.3f}] "
              f"| {r['eval_ratio_to_sasrec']:.2f} |")
PYEOF
