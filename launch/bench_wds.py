"""Throughput of TEDWebDataset's two paths against plain webdataset on the same tar shards.

Writes synthetic shards (random ASCII text + a class label per sample), indexes them, then times
whole epochs, in one process (num_workers=0, so the numbers compare per-core cost), repeats
interleaved round-robin, each repeat starting one variant later, so that a busy neighbour slows
every variant alike. Times are CPU seconds
of this process (``time.process_time``) as well as wall seconds: on a shared machine the wall
clock measures the neighbours too, the CPU time mostly does not.

* pruning off: samples per CPU second of plain webdataset (tarfile_to_samples -> decode -> batched), the
  streaming path (the same plus TED's shard dealing and selection stage), the streaming path with
  ``wds_read()`` in place of webdataset's tar reader, and the exact path (DataLoader over the
  map-style dataset and its sampler);
* pruning on: epoch CPU time of the TED paths at 30/50/70% pruned relative to their own time with
  nothing pruned, and the bytes each epoch read from the shards (``rchar`` of /proc/self/io: bytes
  returned by read calls, page cache included) as a fraction of the pruned samples' bytes.

The selection stage is also timed alone, over raw samples already in memory.

Prints one JSON object per line and a final summary object; ``--out`` also writes it there.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

from ted_stream import TEDConfig
from ted_stream.loaders.wds import TEDWebDataset
from ted_stream.loaders.wds_index import index_shards

from provenance import provenance


def write_shards(folder: str, shards: int, per_shard: int, text_bytes: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with wds.TarWriter(os.path.join(folder, f"bench-{s:06d}.tar")) as w:
            for j in range(per_shard):
                size = int(rng.integers(text_bytes // 2, text_bytes * 3 // 2))
                text = rng.integers(97, 123, size, dtype=np.uint8).tobytes()
                w.write({"__key__": f"{s:06d}-{j:06d}", "txt": text, "cls": str(j % 10).encode()})
    return os.path.join(folder, "bench-{000000..%06d}.tar" % (shards - 1))


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """The same decoding on every path: text to str, class to int."""
    out = {k: v for k, v in sample.items() if not isinstance(v, bytes)}
    out["txt"], out["cls"] = sample["txt"].decode(), int(sample["cls"])
    return out


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def timed(epoch: Callable[[], int]) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds of this process, samples, bytes read) of one epoch."""
    before, t0, c0 = rchar(), time.perf_counter(), time.process_time()
    samples = epoch()
    return time.perf_counter() - t0, time.process_time() - c0, samples, rchar() - before


def plain_epoch(pattern: str, batch: int) -> Callable[[], int]:
    def run() -> int:
        pipe = wds.DataPipeline(wds.SimpleShardList(pattern), wds.tarfile_to_samples(), wds.map(decode),
                                wds.batched(batch, collation_fn=list))
        return sum(len(b) for b in pipe)
    return run


def streaming_epoch(ds: TEDWebDataset, batch: int, seek: bool = False) -> Callable[[], int]:
    """The streaming path; ``seek``: ``ds.wds_read()`` in place of webdataset's tar reader."""
    def run() -> int:
        reader = ds.wds_read() if seek else wds.tarfile_to_samples()
        pipe = wds.DataPipeline(ds.wds_shards(), reader, ds.wds_select(), wds.map(decode),
                                wds.batched(batch, collation_fn=list))
        return sum(len(b) for b in pipe)
    return run


def exact_epoch(ds: TEDWebDataset, batch: int) -> Callable[[], int]:
    def run() -> int:
        return sum(len(b) for b in DataLoader(ds, batch_size=batch, sampler=ds.sampler, collate_fn=list))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=2500)
    ap.add_argument("--text-bytes", type=int, default=2048, help="mean text size per sample")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pruned", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the summary JSON here")
    args = ap.parse_args()

    made = provenance()  # the code this run imported, before anyone edits the tree
    folder = tempfile.mkdtemp(prefix="bench_wds-")
    try:
        summary = run(args, folder)
        summary.update(made)
    finally:
        shutil.rmtree(folder)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


def run(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    pattern = write_shards(folder, args.shards, args.per_shard, args.text_bytes, args.seed)
    index_shards(pattern)
    n = args.shards * args.per_shard
    datasets: dict[float, TEDWebDataset] = {}
    for fraction in [0.0] + args.pruned:
        # explore=0: the pruned fraction is exactly the target (rounded to ranks x batch)
        cfg = TEDConfig(target=fraction if fraction else 0.0, warmup_epochs=1, ramp_epochs=0, explore=0.0,
                        seed=args.seed)
        ds = TEDWebDataset(pattern, ted=cfg, batch_size=args.batch, decode=decode, seed=args.seed,
                           table_dir=os.path.join(folder, f"ted-{fraction}"))
        ds.start_epoch(0)
        ds.record(np.arange(n), np.random.default_rng(args.seed).random(n))
        ds.start_epoch(1)  # epoch 1 prunes `fraction` of the samples
        datasets[fraction] = ds
    variants: dict[str, Callable[[], int]] = {"plain webdataset": plain_epoch(pattern, args.batch)}
    for fraction, ds in datasets.items():
        variants[f"streaming {fraction:.0%}"] = streaming_epoch(ds, args.batch)
        variants[f"streaming+wds_read {fraction:.0%}"] = streaming_epoch(ds, args.batch, seek=True)
        variants[f"exact {fraction:.0%}"] = exact_epoch(ds, args.batch)
    shard_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".tar"))
    runs: dict[str, list[tuple[float, float, int, int]]] = {k: [] for k in variants}
    variants["plain webdataset"]()  # warm the page cache: every variant then reads from memory
    names = list(variants)
    for r in range(args.repeats):
        # Each repeat starts one variant later, so no variant always runs right after another's
        # garbage; a full collection before each epoch keeps it out of the next one's time.
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            wall, cpu, samples, read = timed(variants[name])
            runs[name].append((wall, cpu, samples, read))
            print(json.dumps({"repeat": r, "variant": name, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                              "samples": samples, "bytes_read": read}), flush=True)

    def median(name: str, column: int) -> float:
        return float(np.median([run[column] for run in runs[name]]))

    results: dict[str, Any] = {}
    for name in variants:
        samples, read = runs[name][0][2], runs[name][0][3]
        results[name] = {"median_wall_s": round(median(name, 0), 4), "median_cpu_s": round(median(name, 1), 4),
                         "samples": samples, "samples_per_cpu_s": round(samples / median(name, 1), 1),
                         "bytes_read": read}
    for fraction, ds in datasets.items():
        kept = ds.kept_ids(1)
        span_bytes = np.array([end - start for _, start, end in map(ds.index.span, range(n))])
        kept_bytes = int(span_bytes[kept].sum())
        pruned_bytes = int(span_bytes.sum()) - kept_bytes
        for path in ("streaming", "streaming+wds_read", "exact"):
            name = f"{path} {fraction:.0%}"
            entry = results[name]
            entry["kept_fraction"] = round(len(kept) / n, 4)
            entry["cpu_vs_unpruned"] = round(median(name, 1) / median(f"{path} 0%", 1), 3)
            entry["wall_vs_unpruned"] = round(median(name, 0) / median(f"{path} 0%", 0), 3)
            entry["bytes_read_vs_shards"] = round(entry["bytes_read"] / shard_bytes, 3)
            if pruned_bytes:  # tar padding and end blocks are read too: capped at all of the pruned bytes
                entry["pruned_bytes_read_fraction"] = round(
                    min(1.0, max(0, entry["bytes_read"] - kept_bytes) / pruned_bytes), 3)
    # The selection stage alone, over raw samples already in memory: its own cost per sample.
    raw = list(wds.DataPipeline(datasets[0.0].wds_shards(), wds.tarfile_to_samples()))
    stage = []
    for _ in range(args.repeats):
        c0 = time.process_time()
        for _ in datasets[0.0].wds_select()(iter(raw)):
            pass
        stage.append((time.process_time() - c0) / len(raw))
    results["wds_select alone"] = {"median_cpu_us_per_sample": round(float(np.median(stage)) * 1e6, 2),
                                   "plain_cpu_us_per_sample": round(median("plain webdataset", 1) / n * 1e6, 1)}
    plain = results["plain webdataset"]["samples_per_cpu_s"]
    for path in ("streaming", "streaming+wds_read", "exact"):
        results[f"{path} 0%"]["vs_plain"] = round(results[f"{path} 0%"]["samples_per_cpu_s"] / plain, 3)
    return {
        "command": "python launch/bench_wds.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and k != "out"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, webdataset "
                   f"{getattr(wds, '__version__', '?')}",
        "samples": n, "shard_bytes": shard_bytes, "results": results,
    }


if __name__ == "__main__":
    main()
