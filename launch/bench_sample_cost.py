"""Per-sample CPU cost of TEDStreamingDataset's read path against upstream StreamingDataset's.

The loader benchmark (``bench_loader.py``) times whole epochs through DataLoader workers, whose
wall and CPU times vary by tens of percent on shared cores. This one isolates what ted_stream
adds per sample, in one thread: the CPU time (``time.thread_time``, which a busy neighbour does
not inflate) of reading every sample with ``get_item`` and, for the worker path, of pickling it
in batches of 64 as a DataLoader worker does (``default_collate``, then torch's
``ForkingPickler``, which moves each tensor into a shared-memory segment of its own; TED's
``_WorkerSample`` sends its two keys as bytes instead). The main process's side of that trip
(fetching each segment) is not timed here. For

* upstream: ``StreamingDataset``;
* ted: ``TEDStreamingDataset`` in a plain loop (no ``start_epoch``: upstream's samples);
* ted+keys: a TED loop's samples (``ted_keys="always"``: ``ted_id`` and ``ted_weight`` added).

Variants are interleaved and rotated over ``--repeats``; the summary gives the median ns per
sample and the median of the per-repeat ratios to upstream. Writes JSON (``--out``).

    .venv/bin/python launch/bench_sample_cost.py --out docs/results/bench_sample_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
from multiprocessing.reduction import ForkingPickler
import statistics
import tempfile
import time
from typing import Any, Callable

from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reducers on ForkingPickler)
from torch.utils.data import default_collate
from tqdm import tqdm

from bench_loader import write_shards
from provenance import provenance
from ted_stream import TEDStreamingDataset
from ted_stream.loaders import streaming as ted_streaming

BATCH = 64
_get_worker_info = ted_streaming.get_worker_info  # restored after each simulated worker read


def read_cost(ds: StreamingDataset, n: int, as_worker: bool) -> float:
    """CPU ns per sample of reading samples 0..n-1 and pickling them in batches, as a worker would."""
    if as_worker:  # get_item wraps samples for the trip to the main process only inside a worker
        ted_streaming.get_worker_info = lambda: True  # type: ignore[assignment]
    try:
        t0 = time.thread_time_ns()
        for start in range(0, n, BATCH):
            batch = default_collate([ds.get_item(i) for i in range(start, min(start + BATCH, n))])
            if as_worker:
                ForkingPickler.dumps(batch)
        return (time.thread_time_ns() - t0) / n
    finally:
        ted_streaming.get_worker_info = _get_worker_info



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=40_000, help="128 B samples")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="docs/results/bench_sample_cost.json")
    args = p.parse_args()
    meta = provenance()
    clean_stale_shared_memory()
    with tempfile.TemporaryDirectory() as root:
        data = os.path.join(root, "data")
        write_shards(data, args.samples, 128, 0, 1 << 18)
        makers: dict[str, Callable[[], StreamingDataset]] = {
            "upstream": lambda: StreamingDataset(local=data, batch_size=BATCH),
            "ted": lambda: TEDStreamingDataset(local=data, batch_size=BATCH, table_dir=os.path.join(root, "t")),
            "ted+keys": lambda: TEDStreamingDataset(local=data, batch_size=BATCH, ted_keys="always",
                                                    table_dir=os.path.join(root, "t")),
        }
        datasets = {name: make() for name, make in makers.items()}
        for ds in datasets.values():  # decompress every shard once, outside the timed reads
            read_cost(ds, args.samples, False)
        runs: list[dict[str, Any]] = []
        names = list(datasets)
        for rep in tqdm(range(args.repeats), desc="repeats"):
            for name in names[rep % 3:] + names[:rep % 3]:
                for as_worker in (False, True):
                    ns = read_cost(datasets[name], args.samples, as_worker)
                    runs.append({"variant": name, "path": "worker" if as_worker else "main", "repeat": rep,
                                 "ns_per_sample": ns})
    rows = []
    for path in ("main", "worker"):
        base = {r["repeat"]: r["ns_per_sample"] for r in runs if (r["variant"], r["path"]) == ("upstream", path)}
        for name in names:
            mine = [r for r in runs if (r["variant"], r["path"]) == (name, path)]
            ratios = [base[r["repeat"]] / r["ns_per_sample"] for r in mine]  # speed relative to upstream
            rows.append({"path": path, "variant": name,
                         "ns_per_sample": statistics.median(r["ns_per_sample"] for r in mine),
                         "speed_ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
            print(f"{path:6s} {name:9s} {rows[-1]['ns_per_sample']:8.0f} ns/sample  "
                  f"speed vs upstream {rows[-1]['speed_ratio']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    with open(args.out, "w") as f:
        json.dump({"provenance": meta, "args": vars(args), "summary": rows, "runs": runs}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
