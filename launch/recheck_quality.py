"""Re-run recorded cells of a quality grid at this checkout and compare them with the record.

A quality results file (docs/results/quality_<name>_results.jsonl, written by bench_quality.py) names the
commit each cell ran at. This re-runs the named cells with the recorded arguments and reports
whether accuracy, saved fraction and every epoch's kept count and accuracy are equal, and the
largest gap in held-out loss, so a grid can be tied to a later commit without re-running it all.

    .venv/bin/python launch/recheck_quality.py --name rotten-dense \
        --cells "ted (d, explore 0.5)|0.5|0" --data-dir /tmp/qverify --out /tmp/recheck.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

from provenance import provenance

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="grid name: docs/results/quality_<name>_results.jsonl")
    p.add_argument("--cells", nargs="+", required=True, help="cell names as recorded ('variant|level|seed')")
    p.add_argument("--data-dir", default="runs/data", help="where the task's shards are (re)built")
    p.add_argument("--out", default=None, help="also write the report (JSON) here")
    args = p.parse_args()
    made = provenance()
    with open(os.path.join(HERE, "..", "docs", "results", f"quality_{args.name}_results.jsonl")) as f:
        recorded = {row["cell"]: row for row in map(json.loads, f)}
    missing = [c for c in args.cells if c not in recorded]
    if missing:
        raise SystemExit(f"no recorded cell {missing} in quality_{args.name}_results.jsonl; recorded: {sorted(recorded)}")
    report = []
    with tempfile.TemporaryDirectory() as work:
        for i, cell in enumerate(args.cells):
            old = recorded[cell]
            argv = shlex.split(old["command"])[1:]
            if "--data-dir" in argv:  # the recorded run's own folder: rebuild the data where asked
                argv[argv.index("--data-dir") + 1] = args.data_dir
            out = os.path.join(work, f"{i}.jsonl")
            subprocess.run([sys.executable, os.path.join(HERE, "train_classifier.py"), *argv,
                            "--work-dir", os.path.join(work, "runs"), "--out", out], check=True)
            with open(out) as f:
                new = json.loads(f.read().splitlines()[-1])
            line = {"cell": cell, "recorded_commit": old["commit"], "rerun_commit": made["commit"],
                    "rerun_dirty": made["dirty"], "test_acc": [old["test_acc"], new["test_acc"]],
                    "saved": [old["saved"], new["saved"]],
                    "kept_per_epoch_equal": [e["kept"] for e in new["epochs"]] == [e["kept"] for e in old["epochs"]],
                    "acc_per_epoch_equal": [e["test_acc"] for e in new["epochs"]] == [e["test_acc"] for e in old["epochs"]],
                    "max_test_loss_gap": max(abs(a["test_loss"] - b["test_loss"])
                                             for a, b in zip(new["epochs"], old["epochs"])),
                    "args": " ".join(argv)}
            print(json.dumps(line), flush=True)
            report.append(line)
    same = all(r["test_acc"][0] == r["test_acc"][1] and r["saved"][0] == r["saved"][1]
               and r["kept_per_epoch_equal"] and r["acc_per_epoch_equal"] for r in report)
    print(f"{len(report)} cell(s): {'the same' if same else 'DIFFERENT'} accuracy, saving and kept counts; "
          f"largest held-out loss gap {max(r['max_test_loss_gap'] for r in report):.2g} nats")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**made, "grid": args.name, "cells": report}, f, indent=1)


if __name__ == "__main__":
    main()
