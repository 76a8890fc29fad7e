"""End to end: wall time of the main job (launch/train_llm.py, 2 DeepSpeed ranks) at about 30% and
50% of sample-iterations saved against all data, same seed, runs interleaved (all, 30%, 50%, all,
...), so a busy machine slows every variant alike.

    .venv/bin/python launch/bench_e2e.py --repeats 2 --out docs/results/bench_e2e.json

The launcher's schedule prunes from epoch 1 of 4, so a target T saves about 0.75 T: targets 0.4
and 0.667 give about 30% and 50%. The figure of merit is the wall-time saving divided by the
measured sample saving (issue 14: >= 0.9). Reported for the whole launcher process (start-up, data,
evaluation and checkpoints included, checkpoints off) and for the training loop alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from provenance import ROOT, provenance

VARIANTS = {"all data": "0", "30%": "0.4", "50%": "0.667"}


def run_once(target: str, out: str, data_root: str, port: int, extra: list[str]) -> dict:
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(port), os.path.join(ROOT, "launch", "train_llm.py"), "--out", out, "--data-root", data_root,
           "--table-dir", os.path.join(out, "ted"), "--save-every", "0", "--seed", "0", "--ted", f"target={target}",
           *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    summary = next(r for r in rows if r["type"] == "summary")
    return {"wall_s": wall, "loop_s": summary["seconds"], "saved": summary["saved"],
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "final_eval_loss": summary["final_eval_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join("docs", "results", "bench_e2e.json"))
    p.add_argument("--port", type=int, default=29_650)
    args, extra = p.parse_known_args()  # anything else goes to train_llm.py
    meta = {**provenance(), "repeats": args.repeats, "train_llm_extra_args": extra}
    work = tempfile.mkdtemp(prefix="bench_e2e-")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        data_root = os.path.join(work, "data")
        # An untimed first run prepares the shards (and builds nothing else) so every timed run reads the same files.
        run_once("0", os.path.join(work, "prepare"), data_root, args.port, ["--epochs", "1", *extra])
        for r in range(args.repeats):
            for i, (name, target) in enumerate(VARIANTS.items()):
                out = os.path.join(work, f"{r}-{i}")
                res = run_once(target, out, data_root, args.port + 1 + i, extra)
                shutil.rmtree(out)
                runs[name].append(res)
                print(f"repeat {r} {name:>8}: wall {res['wall_s']:6.1f} s, loop {res['loop_s']:6.1f} s, "
                      f"cpu {res['cpu_s']:6.1f} s, saved {res['saved']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {k: statistics.median(r[k] for r in runs["all data"]) for k in ("wall_s", "loop_s", "cpu_s")}
    table = {}
    for name, rs in runs.items():
        saved = statistics.median(r["saved"] for r in rs)
        row = {"saved": round(saved, 4), "final_eval_loss": round(statistics.median(r["final_eval_loss"] for r in rs), 4)}
        for k in ("wall_s", "loop_s", "cpu_s"):
            med = statistics.median(r[k] for r in rs)
            row[k] = round(med, 1)
            row[k + "_spread"] = [round(min(r[k] for r in rs), 1), round(max(r[k] for r in rs), 1)]
            row[k.replace("_s", "_saving")] = round(1 - med / base[k], 4)
            if saved > 0:
                row[k.replace("_s", "_saving_per_sample_saving")] = round((1 - med / base[k]) / saved, 3)
        table[name] = row
    print(json.dumps(table, indent=1))
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump({"meta": meta, "variants": table, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
