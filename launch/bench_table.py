"""Benchmark: ScoreTable memory per sample, the time to freeze a keep-mask (wall and CPU, median
of repeats, on one thread), and the cost of merging one epoch's scores from every rank.

    .venv/bin/python launch/bench_table.py --sizes 10000000 100000000 --out docs/results/bench_table.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import tracemalloc

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the target is one core
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from provenance import provenance
from ted_stream import TEDConfig
from ted_stream.dist import all_gather_records, record_bytes
from ted_stream.policy import select
from ted_stream.table import ScoreTable

RAMP = dict(target=0.5, warmup_epochs=0, ramp_epochs=0)
POLICIES = {  # "ted" is the default configuration: explore 0.5 on the capped pool, rescale
    "ted": TEDConfig(**RAMP),
    "ted (trim-top 0.1, no rescale)": TEDConfig(**RAMP, trim_top=0.1, rescale=False),
    "random-dynamic": TEDConfig(**RAMP, policy="random-dynamic"),
    "infobatch": TEDConfig(**RAMP, policy="infobatch"),
}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench(n: int, folder: str, repeats: int) -> dict:
    table = ScoreTable(n, {"digest": "0" * 64, "num_samples": n})
    resident = table.scores.nbytes + table.updated.nbytes
    rng = np.random.default_rng(0)
    chunk = 1 << 22
    _, t_record, _ = timed(lambda: [table.record(np.arange(s, min(n, s + chunk)),
                                                 rng.standard_normal(min(chunk, n - s), dtype=np.float32))
                                    for s in range(0, n, chunk)])
    row = {"num_samples": n, "resident_bytes_per_sample": resident / n,
           "record_ns_per_sample": round(1e9 * t_record / n, 1)}
    for epoch, (name, cfg) in enumerate(POLICIES.items()):  # one epoch each: a table holds one mask per epoch
        walls, cpus = [], []
        for _ in range(repeats):
            tracemalloc.start()  # numpy reports its buffers to tracemalloc: this is the transient peak
            mask, wall, cpu = timed(lambda: select(cfg, table, epoch, granule=64))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            walls.append(wall)
            cpus.append(cpu)
        row[name] = {"wall_s_median": round(statistics.median(walls), 2), "wall_s_min": round(min(walls), 2),
                     "wall_s_max": round(max(walls), 2), "cpu_s_median": round(statistics.median(cpus), 2),
                     "peak_bytes_per_sample": round(peak / n, 1), "kept": mask.kept}
        print(f"{n:>11,} {name:<32} wall {row[name]['wall_s_median']:6.2f} s (min {row[name]['wall_s_min']:.2f}) "
              f"cpu {row[name]['cpu_s_median']:6.2f} s  peak {row[name]['peak_bytes_per_sample']:5.1f} B/sample", flush=True)
        table.masks[epoch] = mask
    row["mask_bytes_per_sample"] = table.masks[0].keep.nbytes / n
    path = os.path.join(folder, f"t{n}.tedt")
    _, row["save_s"], _ = timed(lambda: table.save(path))
    row["file_bytes_per_sample"] = os.path.getsize(path) / n
    _, row["load_s"], _ = timed(lambda: ScoreTable.load(path))
    os.unlink(path)
    return row


def _merge_rank(rank: int, world: int, n: int, port: int, out: str) -> None:
    """One rank of the merge benchmark: it scored n / world samples this epoch; gather every
    rank's records and fold them into its own table, as Pruner.sync does."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ids = np.arange(rank, n, world, dtype=np.int64)
    vals = np.random.default_rng(rank).standard_normal(len(ids), dtype=np.float32)
    table = ScoreTable(n, {"digest": "0" * 64, "num_samples": n})
    dist.barrier()
    gathered, t_gather, _ = timed(lambda: all_gather_records(ids, vals, n))
    _, t_fold, _ = timed(lambda: [table.record(i, v) for i, v in gathered])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"gather_s": t_gather, "fold_s": t_fold}, f)
    dist.destroy_process_group()


def bench_merge(n: int, world: int, folder: str) -> dict:
    out = os.path.join(folder, "merge.json")
    mp.spawn(_merge_rank, args=(world, n, 29_000 + os.getpid() % 1000, out), nprocs=world)
    with open(out) as f:
        t = json.load(f)
    # Each rank sends its records (record_bytes each) and receives all n of them.
    return {"num_samples": n, "world": world, "gloo_on_cpu": True, "gather_s": round(t["gather_s"], 2),
            "fold_s": round(t["fold_s"], 2), "ns_per_sample": round(1e9 * (t["gather_s"] + t["fold_s"]) / n, 1),
            "bytes_received_per_sample": record_bytes(n), "bytes_sent_per_sample_per_rank": record_bytes(n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--merge-size", type=int, default=10_000_000, help="samples scored in the merged epoch")
    p.add_argument("--merge-world", type=int, default=2)
    p.add_argument("--out", default="docs/results/bench_table.json")
    args = p.parse_args()
    meta = {**provenance(), "seed": 0, "threads": os.environ["OMP_NUM_THREADS"], "repeats": args.repeats}
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            rows.append(bench(n, folder, args.repeats))
        merge = bench_merge(args.merge_size, args.merge_world, folder)
    print("merge:", json.dumps(merge))
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "merge": merge}, f, indent=2)


if __name__ == "__main__":
    main()
