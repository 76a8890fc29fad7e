"""Benchmark: ScoreTable memory per sample and the time to freeze a keep-mask, at 10M and 100M.

    .venv/bin/python launch/bench_table.py --sizes 10000000 100000000 --out docs/bench_table.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import psutil
import tracemalloc

from ted_stream import TEDConfig
from ted_stream.policy import select
from ted_stream.table import ScoreTable

POLICIES = {
    "ted": TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, explore=0.1),
    "ted+rescale": TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, explore=0.1, rescale=True),
    "random-dynamic": TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, policy="random-dynamic"),
    "infobatch": TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, policy="infobatch"),
}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench(n: int, folder: str) -> dict:
    table = ScoreTable(n, {"digest": "0" * 64, "num_samples": n})
    resident = table.scores.nbytes + table.updated.nbytes
    rng = np.random.default_rng(0)
    chunk = 1 << 22
    _, t_record = timed(lambda: [table.record(np.arange(s, min(n, s + chunk)),
                                              rng.standard_normal(min(chunk, n - s), dtype=np.float32))
                                 for s in range(0, n, chunk)])
    row = {"num_samples": n, "resident_bytes_per_sample": resident / n,
           "record_ns_per_sample": 1e9 * t_record / n}
    for epoch, (name, cfg) in enumerate(POLICIES.items()):  # one epoch each: a table holds one mask per epoch
        tracemalloc.start()  # numpy reports its buffers to tracemalloc: this is the transient peak
        mask, secs = timed(lambda: select(cfg, table, epoch, granule=64))
        row[f"select_{name}_peak_bytes_per_sample"] = round(tracemalloc.get_traced_memory()[1] / n, 1)
        tracemalloc.stop()
        row[f"select_{name}_s"] = round(secs, 2)
        row[f"select_{name}_kept"] = mask.kept
        table.masks[epoch] = mask
    row["mask_bytes_per_sample"] = table.masks[0].keep.nbytes / n
    path = os.path.join(folder, f"t{n}.tedt")
    _, row["save_s"] = timed(lambda: table.save(path))
    row["file_bytes_per_sample"] = os.path.getsize(path) / n
    _, row["load_s"] = timed(lambda: ScoreTable.load(path))
    os.unlink(path)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--out", default="docs/bench_table.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            rows.append(bench(n, folder))
            print(json.dumps(rows[-1]))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "command": "python launch/bench_table.py --sizes "
            + " ".join(map(str, args.sizes)), "seed": 0}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
