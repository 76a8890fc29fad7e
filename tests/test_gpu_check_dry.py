"""launch/gpu_check.sh cannot rot: its DRY=1 rehearsal runs every step on the CPU with tiny sizes and
must end with a summary in which every step has a status; the bundle's manifest and the GGUF
reassembly are rehearsed on a small stand-in file (launch/gpu_bundle.sh with NO_WHEELS=1)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("manifest", "install", "versions", "gguf", "main", "sync", "loop", "scorer", "lmft", "tests")


def build_bundle(tmp_path, part_mib: int = 1):
    """A data-only bundle (no network): a 2.5 MiB stand-in GGUF in 1 MiB parts, the news corpus."""
    gguf = tmp_path / "standin.gguf"
    gguf.write_bytes(np.random.default_rng(0).integers(0, 16, 5 << 19, dtype=np.uint8).tobytes())
    out = tmp_path / "bundle"
    env = {**os.environ, "OUT": str(out), "GGUF": str(gguf), "NO_WHEELS": "1", "PART_MIB": str(part_mib),
           "XFER_MIB": "6", "PY": sys.executable}
    done = subprocess.run(["bash", "launch/gpu_bundle.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return gguf, out


def test_the_bundle_is_cut_into_transfers_under_their_cap_with_one_manifest(tmp_path):
    gguf, out = build_bundle(tmp_path)
    manifest = json.loads((out / "main" / "MANIFEST.json").read_text())
    assert manifest["gguf"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    for row in manifest["files"]:
        path = out / row["path"]
        assert path.stat().st_size == row["bytes"] < 64 << 20
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
    assert all(v <= 6 << 20 for v in manifest["transfers"].values())
    assert any(name.startswith("pre") for name in manifest["transfers"])  # the corpus fills main
    # every transfer folder carries the same manifest and checks its own files
    for name in manifest["transfers"]:
        assert json.loads((out / name / "MANIFEST.json").read_text()) == manifest
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out / name).returncode == 0
    # what the first device call runs on the folders it carried
    got = subprocess.run(["bash", "launch/gpu_check.sh", "receive"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "BUNDLE": str(out)}, timeout=60)
    assert got.returncode == 0 and got.stdout.count(" ok: ") == len(manifest["transfers"]), got.stdout + got.stderr


def test_filter_cache_temporaries_are_not_named_by_pid(tmp_path, monkeypatch):
    """pids repeat across containers writing one shared folder: the temporary is uuid-named."""
    from ted_stream import filter as sample_filter

    seen = []
    real = os.replace
    monkeypatch.setattr(sample_filter.os, "replace", lambda a, b: (seen.append(a), real(a, b)))
    path = str(tmp_path / "f.bits")
    sample_filter.save_cached(path, np.ones(10, bool))
    assert str(os.getpid()) not in os.path.basename(seen[0]) and len(os.path.basename(seen[0])) > 32
    assert sample_filter.load_cached(path, 10).all()


@pytest.mark.slow
def test_dry_rehearsal_writes_a_summary_with_every_step(tmp_path):
    _, bundle = build_bundle(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "DRY": "1", "OUT": str(out), "BUNDLE": str(bundle), "WORK": str(tmp_path / "work"),
           "PY": sys.executable, "HOSTPY": sys.executable}
    done = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    summary = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else done.stdout
    assert done.returncode == 0, log[-3000:]
    assert summary["dry"] is True and set(summary["steps"]) == set(STEPS)
    failed = {k: v for k, v in summary["steps"].items() if v["status"] not in ("ok", "skipped")}
    assert not failed, (failed, log[-4000:])
    steps = summary["steps"]
    assert steps["install"]["status"] == "skipped"  # DRY uses this venv
    for name in ("manifest", "gguf", "main", "sync", "loop", "scorer", "lmft", "tests"):
        assert steps[name]["status"] == "ok", (name, log[-4000:])
    assert steps["manifest"]["result"]["missing"] == [] and steps["manifest"]["result"]["damaged"] == []
    assert steps["main"]["result"]["epochs"], "train_llm.py wrote no epoch"
    assert set(steps["loop"]["result"]["median_tokens_per_s"]) == {"plain", "ted_off", "ted_default"}
    assert steps["scorer"]["result"]["exactness"]["default (every linear layer, 16 rows)"]["pass_1e-4"]
    assert len(steps["lmft"]["result"]["cells"]) + len(steps["lmft"]["result"]["skipped"]) == 7
    assert (out / "gpu_check_files.tgz").exists()
