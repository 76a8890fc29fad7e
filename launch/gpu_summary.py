"""The summary JSON of launch/gpu_check.sh: every step's status, seconds and results in one file.

    python launch/gpu_summary.py WORK SUMMARY T0 DRY BUDGET

Reads WORK/steps.jsonl (one record per step) and each step's result file; writes SUMMARY
atomically. Beside a SUMMARY in $OUT it also leaves the log and a tarball of the small result
files (the device tool brings back at most 8 files from $OUT). Standard library only: it must
run whatever else failed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time

# step -> its result file in WORK
RESULTS = {"manifest": "manifest.json", "versions": "versions.json", "sync": "sync.json", "loop": "loop.json",
           "scorer": "scorer.json", "lmft": "lmft.json"}
SKIP_DIRS = ("checkpoints", "data", "model", "torch_extensions", "corpus", "shards")  # large or copies
STEPS = ("manifest", "install", "versions", "gguf", "main", "sync", "loop", "scorer", "lmft", "tests")


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main_job(work: str):
    """What launch/train_llm.py's metrics say: epochs, saved fraction, held-out loss, tokens/s."""
    try:
        with open(os.path.join(work, "main", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    steps = [r for r in rows if r.get("type") == "step"]
    tps = sorted(r["tokens_per_s"] for r in steps[5:])
    run = next((r for r in rows if r.get("type") == "run"), {})
    return {"params": run.get("params"), "initial_eval_loss": run.get("initial_eval_loss"), "steps": len(steps),
            "median_tokens_per_s_after_5_steps": tps[len(tps) // 2] if tps else None,
            "epochs": [{k: r.get(k) for k in ("epoch", "kept", "num_samples", "eval_loss", "saved_so_far", "seconds")}
                       for r in rows if r.get("type") == "epoch"],
            "summary": next((r for r in rows if r.get("type") == "summary"), None)}


def tests_result(work: str):
    try:
        with open(os.path.join(work, "tests.log")) as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return None
    return {"last_line": lines[-1] if lines else None}


def bundle_out(work: str, out_dir: str) -> None:
    """The log and the small result files next to the summary (when the summary goes to $OUT)."""
    log = os.path.join(work, "gpu_check.log")
    if os.path.exists(log):
        shutil.copyfile(log, os.path.join(out_dir, "gpu_check.log"))
    with tarfile.open(os.path.join(out_dir, "gpu_check_files.tgz"), "w:gz") as tar:
        for d, dirs, files in os.walk(work):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            for f in files:
                p = os.path.join(d, f)
                if f.endswith((".json", ".jsonl", ".log", ".png")) and os.path.getsize(p) < (4 << 20):
                    tar.add(p, arcname=os.path.relpath(p, work))


def main() -> int:
    work, summary, t0, dry, budget = sys.argv[1:6]
    records = []
    try:
        with open(os.path.join(work, "steps.jsonl")) as f:
            for line in f:
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        records.append({"raw": line.strip()})
    except OSError:
        pass
    seen = {r.get("step"): r for r in records if "step" in r}
    steps = {}
    for name in STEPS:  # every step has a status, also one the run never reached
        r = dict(seen.get(name) or {"status": "not reached", "seconds": 0.0})
        r.pop("step", None)
        result = main_job(work) if name == "main" else tests_result(work) if name == "tests" else (
            load(os.path.join(work, RESULTS[name])) if name in RESULTS else None)
        if result is not None:
            r["result"] = result
        steps[name] = r
    s = {"dry": dry == "1", "budget_s": int(budget), "wall_s": round(time.time() - float(t0), 1),
         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "ok": sum(r["status"] == "ok" for r in steps.values()), "steps": steps}
    os.makedirs(os.path.dirname(os.path.abspath(summary)), exist_ok=True)
    tmp = summary + ".tmp"
    with open(tmp, "w") as f:
        json.dump(s, f, indent=1, default=str)
    os.replace(tmp, summary)
    if os.environ.get("OUT") and os.path.abspath(os.path.dirname(summary)) == os.path.abspath(os.environ["OUT"]):
        try:
            bundle_out(work, os.environ["OUT"])
        except OSError as e:
            print(f"gpu_summary: could not copy the log and files to {os.environ['OUT']}: {e}", file=sys.stderr)
    print(f"gpu_summary: {summary}: " + ", ".join(f"{k} {v['status']}" for k, v in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
