"""Throughput of TEDStreamingDataset against mosaicml-streaming's StreamingDataset, and the cost
of the samples it skips.

Writes seeded synthetic zstd MDS shards (random lowercase text of a fixed size + an integer label
per sample) into a temporary folder, once with small (128 B) and once with large (32 KiB)
samples, then times whole epochs through ``StreamingDataLoader`` (batch 64, shuffled), repeated
round-robin (the order rotates every repeat) so that a busy neighbour slows every variant alike:

* loader: samples/s of ``StreamingDataset`` and of ``TEDStreamingDataset`` with pruning off (an
  empty score table: every sample kept, weight 1), 0 and 2 DataLoader workers. The shards are
  decompressed once beforehand (``remote=None``: streaming decompresses beside the zstd files and
  keeps both), so every epoch reads a warm local cache.
* skip (warm): epoch wall time of ``TEDStreamingDataset`` at 30/50/70% pruned (a ``ted`` policy
  mask frozen by ``start_epoch(0)`` over seeded random scores; default ``explore`` and
  ``rescale``) divided by its time with nothing pruned, same shards and loader settings.
* fixed: the per-epoch cost that pruning cannot shrink, split between TED and upstream: a
  near-empty epoch of ``TEDStreamingDataset`` (99% pruned, ``--fixed-fraction``) against
  upstream ``StreamingDataset`` with ``epoch_size`` = the same number of samples, same loader
  settings as the skip phases; each divided by the unpruned TED epoch of the same repeat (the skip
  phase's, run here too if skip is not selected). The TED - upstream difference is what TED adds
  to an epoch's start (mask resolution, filtering upstream's sample ids); the rest (starting and
  joining the workers, streaming's barriers, shared memory and work partition, its
  download/ready threads) is upstream's and torch's.
* skip (cold): the same with ``remote=<the shards>`` and a fresh empty ``local`` cache per
  epoch, so that every epoch copies ("downloads") and decompresses the shards it needs; counts
  the zstd bytes downloaded and the bytes decompressed against the whole dataset's.

Times are wall seconds; CPU seconds of this process and its (joined) DataLoader workers are
recorded too (``cpu_s``), since on a shared machine the wall clock measures the neighbours as
well. ``cpu_s`` excludes the harness's forced ``gc.collect()`` after each epoch (``gc_cpu_s``,
about 0.2 s whatever the epoch), which versions before 2026-12-02 counted in it; the summary
gives the ratios with it added back too (``ratio_cpu_with_gc``), comparable with those versions.
Longer epochs (``--small``/``--large``) shrink the fixed cost's share. Prints one line per epoch,
a table, and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import streaming
import torch
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset
from streaming.base.util import clean_stale_shared_memory

from ted_stream import TEDConfig, TEDStreamingDataset

from provenance import provenance

BATCH = 64
SEED_SHUFFLE = 17


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_shards(folder: str, count: int, size: int | tuple[int, int], seed: int, shard_bytes: int
                 ) -> dict[str, Any]:
    """``count`` samples of ``size`` bytes, or of log-uniform sizes in [lo, hi) for a (lo, hi) pair
    (shards then hold different sample counts)."""
    rng = np.random.default_rng(seed)
    with MDSWriter(out=folder, columns={"x": "bytes", "y": "int"}, compression="zstd",
                   size_limit=shard_bytes) as w:
        for i in range(count):
            n = size if isinstance(size, int) else int(np.exp(rng.uniform(np.log(size[0]), np.log(size[1]))))
            w.write({"x": rng.integers(97, 123, n, dtype=np.uint8).tobytes(), "y": int(i % 10)})
    with open(os.path.join(folder, "index.json")) as f:
        shards = json.load(f)["shards"]
    return {"samples": count, "sample_bytes": size, "shards": len(shards),
            "zstd_bytes": sum(s["zip_data"]["bytes"] for s in shards),
            "raw_bytes": sum(s["raw_data"]["bytes"] for s in shards),
            "samples_per_shard": [s["samples"] for s in shards]}


def children_cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def cpu_seconds() -> float:
    return time.process_time() + children_cpu_seconds()


def epoch(make: Callable[[], StreamingDataset], workers: int) -> dict[str, Any]:
    """One epoch through a fresh dataset and loader: wall and CPU seconds, samples seen.

    ``cpu_s`` is the epoch's CPU: this process and its DataLoader workers, which the exhausted
    loader has joined (torch shuts non-persistent workers down on the last batch), from the first
    ``next`` to the last. ``gc_cpu_s`` is the harness's own full ``gc.collect()`` after the epoch:
    about 0.2 s here whatever the epoch (it walks every live object of the process, torch's
    included), which versions before 2026-12-02 counted inside ``cpu_s``."""
    ds = make()
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers)
    gc.collect()  # the previous epoch's garbage, outside the window
    samples, batch = 0, None
    w0, c0, t0 = children_cpu_seconds(), cpu_seconds(), time.perf_counter()
    it = iter(loader)
    for batch in it:
        samples += len(batch["y"])
    wall = time.perf_counter() - t0
    cpu, workers_cpu = cpu_seconds() - c0, children_cpu_seconds() - w0
    del batch, it, loader
    g0 = cpu_seconds()
    gc.collect()
    gc_cpu = cpu_seconds() - g0
    del ds
    gc.collect()
    return {"wall_s": wall, "cpu_s": cpu, "workers_cpu_s": workers_cpu, "gc_cpu_s": gc_cpu, "samples": samples}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / statistics.median(values)}


def fetched(local: str, source: str) -> tuple[int, int, int]:
    """(shards, zstd bytes, raw bytes) that an epoch copied into ``local`` and decompressed: the
    shards whose decompressed file is there (streaming drops the zstd copy once decompressed)."""
    with open(os.path.join(source, "index.json")) as f:
        shards = json.load(f)["shards"]
    got = [s for s in shards if os.path.exists(os.path.join(local, s["raw_data"]["basename"]))]
    return len(got), sum(s["zip_data"]["bytes"] for s in got), sum(s["raw_data"]["bytes"] for s in got)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=40_000, help="samples of the 128 B dataset")
    p.add_argument("--large", type=int, default=4_000, help="samples of the 32 KiB dataset")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--skip-workers", type=int, default=2, help="DataLoader workers of the skip phases")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-bytes", type=int, nargs=2, default=[1 << 18, 1 << 22],
                   help="MDS shard size limits (raw bytes) of the small and the large dataset")
    p.add_argument("--phases", nargs="+", default=["loader", "skip", "fixed", "cold"],
                   choices=["loader", "skip", "fixed", "cold"])
    p.add_argument("--fixed-fraction", type=float, default=0.99, help="pruned fraction of the fixed phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_loader.json")
    args = p.parse_args()
    prov = provenance()
    t_start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="bench-loader-")
    clean_stale_shared_memory()
    runs: list[dict[str, Any]] = []
    try:
        data = {}
        for name, count, size, shard_bytes in (("128B", args.small, 128, args.shard_bytes[0]),
                                               ("32KiB", args.large, 32 * 1024, args.shard_bytes[1])):
            folder = os.path.join(root, name)
            t = time.perf_counter()
            data[name] = write_shards(folder, count, size, args.seed, shard_bytes)
            log(f"wrote {name}: {count} samples, {data[name]['shards']} shards, "
                f"{data[name]['zstd_bytes'] / 2**20:.1f} MiB zstd in {time.perf_counter() - t:.1f} s")
            # Decompress every shard once (streaming keeps the zstd files when remote is None).
            epoch(lambda: StreamingDataset(local=folder, batch_size=BATCH), 0)

        kept_counts: dict[tuple[str, float], int] = {}

        def plain(name: str, **kw: Any) -> Callable[[], StreamingDataset]:
            return lambda: StreamingDataset(local=os.path.join(root, name), batch_size=BATCH, shuffle=True,
                                            shuffle_seed=SEED_SHUFFLE, **kw)

        def ted(name: str, frac: float, local: str | None = None, remote: str | None = None, keys: str = "auto"
                ) -> Callable[[], StreamingDataset]:
            table_dir = os.path.join(root, "tables", f"{name}-{frac}")
            cfg = TEDConfig(target=frac, warmup_epochs=0, ramp_epochs=0, seed=args.seed) if frac else TEDConfig()

            def make() -> StreamingDataset:
                kw: dict[str, Any] = {"local": local or os.path.join(root, name)}
                if remote is not None:
                    kw["remote"] = remote
                ds = TEDStreamingDataset(**kw, batch_size=BATCH, shuffle=True, shuffle_seed=SEED_SHUFFLE,
                                         ted=cfg, table_dir=table_dir, ted_keys=keys)
                if frac:
                    if not ds.table.scored.any():  # first use: seeded random scores for every sample
                        rng = np.random.default_rng(args.seed + 1)
                        ds.record(np.arange(ds.num_samples), rng.random(ds.num_samples, dtype=np.float32))
                    mask = ds.start_epoch(0)  # freezes the mask once; later runs find it frozen
                    kept_counts[(name, frac)] = mask.kept
                return ds
            return make

        def record(run: dict[str, Any]) -> None:
            run["cpu_gc_s"] = run["cpu_s"] + run["gc_cpu_s"]  # the pre-2026-12-02 definition of cpu_s
            runs.append(run)
            log(f"[{time.perf_counter() - t_start:6.0f} s] {run['phase']:6s} {run['data']:5s} "
                f"w={run['workers']} {run['variant']:10s} rep {run['repeat']}: {run['samples']:6d} samples "
                f"{run['wall_s']:6.2f} s wall ({run['samples'] / run['wall_s']:8.0f}/s), "
                f"{run['cpu_s']:6.2f} s CPU" + (f", {run['shards_fetched']} shards, {run['zstd_read'] / 2**20:.1f} MiB "
                                                  "downloaded"
                                                  if "zstd_read" in run else ""))

        for rep in range(args.repeats):
            if "loader" in args.phases:
                variants = [("upstream", plain), ("ted", lambda n: ted(n, 0.0)),
                            ("ted+keys", lambda n: ted(n, 0.0, keys="always"))]
                for name in data:
                    for workers in args.workers:
                        for variant, factory in variants[rep % 3:] + variants[:rep % 3]:
                            record({"phase": "loader", "data": name, "workers": workers, "variant": variant,
                                    "repeat": rep, **epoch(factory(name), workers)})
            fracs = [0.0, *args.fractions]
            order = fracs[rep % len(fracs):] + fracs[:rep % len(fracs)]
            if "skip" in args.phases:
                for name in data:
                    for frac in order:
                        record({"phase": "skip", "data": name, "workers": args.skip_workers,
                                "variant": f"pruned{frac:.0%}", "fraction": frac, "repeat": rep,
                                **epoch(ted(name, frac), args.skip_workers)})
            if "fixed" in args.phases:
                for name in data:
                    if "skip" not in args.phases:
                        record({"phase": "skip", "data": name, "workers": args.skip_workers,
                                "variant": "pruned0%", "fraction": 0.0, "repeat": rep,
                                **epoch(ted(name, 0.0), args.skip_workers)})
                    frac = args.fixed_fraction
                    if (name, frac) not in kept_counts:
                        ds = ted(name, frac)()  # freezes the mask: its kept count sizes upstream's epoch
                        del ds
                        gc.collect()
                    n = kept_counts[(name, frac)]
                    pair = [("ted", ted(name, frac)), ("upstream", plain(name, epoch_size=n))]
                    for variant, make in (pair if rep % 2 == 0 else pair[::-1]):
                        record({"phase": "fixed", "data": name, "workers": args.skip_workers,
                                "variant": variant, "fraction": frac, "repeat": rep,
                                **epoch(make, args.skip_workers)})
            if "cold" in args.phases:
                for name in data:
                    for frac in order:
                        local = tempfile.mkdtemp(prefix=f"cold-{name}-", dir=root)
                        run = epoch(ted(name, frac, local=local, remote=os.path.join(root, name)),
                                    args.skip_workers)
                        n, zstd_read, raw = fetched(local, os.path.join(root, name))
                        run.update(shards_fetched=n, zstd_read=zstd_read, decompressed=raw)
                        shutil.rmtree(local)
                        record({"phase": "cold", "data": name, "workers": args.skip_workers,
                                "variant": f"pruned{frac:.0%}", "fraction": frac, "repeat": rep, **run})
    finally:
        shutil.rmtree(root, ignore_errors=True)
        clean_stale_shared_memory()

    # ---- summary ------------------------------------------------------------------------------
    def group(phase: str, name: str, workers: int, variant: str) -> list[dict[str, Any]]:
        return [r for r in runs if (r["phase"], r["data"], r["workers"], r["variant"]) == (phase, name, workers, variant)]

    def ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
        """Per-repeat ratio a/b (each repeat ran its variants back to back)."""
        by_rep = {r["repeat"]: r[key] for r in b}
        return [r[key] / by_rep[r["repeat"]] for r in a]

    table: dict[str, Any] = {"loader": [], "skip": [], "cold": []}
    lines = []
    if "loader" in args.phases:
        lines += ["", "loader (pruning off): samples/s, medians of %d; ted: a plain loop (no start_epoch, so "
                  "upstream's samples), ted+keys: a TED loop's samples (ted_id, ted_weight added)" % args.repeats,
                  f"{'data':6s} {'workers':>7s} {'variant':>8s} {'upstream/s':>11s} {'ted/s':>9s} {'ratio':>6s} "
                  f"{'ratio range':>13s} {'CPU ratio':>9s}"]
        for name, workers, variant in [(n, w, v) for n in data for w in args.workers for v in ("ted", "ted+keys")]:
            up, td = group("loader", name, workers, "upstream"), group("loader", name, workers, variant)
            # samples/s ratio = upstream wall / ted wall
            r_wall = ratios(up, td, "wall_s")
            r_cpu = ratios(up, td, "cpu_s")
            row = {"data": name, "workers": workers, "variant": variant,
                   "upstream_samples_per_s": summary([r["samples"] / r["wall_s"] for r in up]),
                   "ted_samples_per_s": summary([r["samples"] / r["wall_s"] for r in td]),
                   "ratio": summary(r_wall), "ratio_cpu": summary(r_cpu),
                   "extra_us_per_sample": statistics.median(
                       (t["wall_s"] - u["wall_s"]) / u["samples"] * 1e6 for u, t in zip(up, td))}
            table["loader"].append(row)
            lines.append(f"{name:6s} {workers:7d} {variant:>8s} {row['upstream_samples_per_s']['median']:11.0f} "
                         f"{row['ted_samples_per_s']['median']:9.0f} {row['ratio']['median']:6.3f} "
                         f"{row['ratio']['min']:6.3f}-{row['ratio']['max']:.3f} {row['ratio_cpu']['median']:9.3f}")
    for phase in ("skip", "cold"):
        if phase not in args.phases:
            continue
        lines += ["", f"{phase}: epoch time / unpruned epoch time, {args.skip_workers} workers, medians of "
                  f"{args.repeats}" + (" (fresh cache every epoch)" if phase == "cold" else ""),
                  f"{'data':6s} {'pruned':>6s} {'kept':>6s} {'wall ratio':>10s} {'range':>13s} {'CPU ratio':>9s} "
                  f"{'range':>11s} {'+gc':>6s} {'target':>6s}" + (f" {'zstd read':>9s} {'decomp.':>8s}" if phase == "cold" else "")]
        for name in data:
            base = group(phase, name, args.skip_workers, "pruned0%")
            for frac in args.fractions:
                g = group(phase, name, args.skip_workers, f"pruned{frac:.0%}")
                kept = g[0]["samples"] / base[0]["samples"]
                r_wall, r_cpu = ratios(g, base, "wall_s"), ratios(g, base, "cpu_s")
                r_gc = ratios(g, base, "cpu_gc_s")
                row = {"data": name, "fraction": frac, "kept_fraction": kept, "target": kept + 0.03,
                       "ratio": summary(r_wall), "ratio_cpu": summary(r_cpu), "ratio_cpu_with_gc": summary(r_gc),
                       "wall_s": summary([r["wall_s"] for r in g]),
                       "unpruned_wall_s": summary([r["wall_s"] for r in base])}
                extra = ""
                if phase == "cold":
                    row["shards_fetched"] = g[0]["shards_fetched"]
                    row["zstd_read_fraction"] = g[0]["zstd_read"] / data[name]["zstd_bytes"]
                    row["decompressed_fraction"] = g[0]["decompressed"] / data[name]["raw_bytes"]
                    row["pruned_bytes_still_read"] = ((row["zstd_read_fraction"] - kept) / (1 - kept)
                                                      if kept < 1 else 0.0)
                    extra = f" {row['zstd_read_fraction']:9.3f} {row['decompressed_fraction']:8.3f}"
                table[phase].append(row)
                lines.append(f"{name:6s} {frac:6.0%} {kept:6.3f} {row['ratio']['median']:10.3f} "
                             f"{row['ratio']['min']:6.3f}-{row['ratio']['max']:.3f} {row['ratio_cpu']['median']:9.3f} "
                             f"{row['ratio_cpu']['min']:5.3f}-{row['ratio_cpu']['max']:.3f} "
                             f"{row['ratio_cpu_with_gc']['median']:6.3f} {kept + 0.03:6.3f}" + extra)
    if "fixed" in args.phases:
        table["fixed"] = []
        lines += ["", f"fixed: near-empty epoch ({args.fixed_fraction:.0%} pruned) / unpruned TED epoch, "
                  f"{args.skip_workers} workers, medians of {args.repeats}; CPU ms per epoch",
                  f"{'data':6s} {'samples':>7s} {'TED ms':>7s} {'up ms':>7s} {'TED-up ms':>9s} {'f TED':>6s} "
                  f"{'f up':>6s} {'unpruned ms':>11s}"]
        for name in data:
            base = group("skip", name, args.skip_workers, "pruned0%")
            td, up = group("fixed", name, args.skip_workers, "ted"), group("fixed", name, args.skip_workers, "upstream")
            diff = [t["cpu_s"] - u["cpu_s"] for t, u in zip(sorted(td, key=lambda r: r["repeat"]),
                                                            sorted(up, key=lambda r: r["repeat"]))]
            row = {"data": name, "fraction": args.fixed_fraction, "samples": td[0]["samples"],
                   "upstream_samples": up[0]["samples"],
                   "ted_cpu_s": summary([r["cpu_s"] for r in td]), "upstream_cpu_s": summary([r["cpu_s"] for r in up]),
                   "ted_minus_upstream_cpu_s": {"median": statistics.median(diff), "min": min(diff), "max": max(diff)},
                   "f_ted": summary(ratios(td, base, "cpu_s")), "f_upstream": summary(ratios(up, base, "cpu_s")),
                   "unpruned_cpu_s": summary([r["cpu_s"] for r in base]),
                   "gc_cpu_s": summary([r["gc_cpu_s"] for r in td + up + base])}
            table["fixed"].append(row)
            lines.append(f"{name:6s} {row['samples']:7d} {row['ted_cpu_s']['median'] * 1e3:7.1f} "
                         f"{row['upstream_cpu_s']['median'] * 1e3:7.1f} {row['ted_minus_upstream_cpu_s']['median'] * 1e3:9.1f} "
                         f"{row['f_ted']['median']:6.3f} {row['f_upstream']['median']:6.3f} "
                         f"{row['unpruned_cpu_s']['median'] * 1e3:11.0f}")
    print("\n".join(lines))
    out = {"benchmark": "bench_loader", **prov, "python": platform.python_version(),
           "torch": torch.__version__, "streaming": streaming.__version__,
           "load_average": os.getloadavg(), "wall_s_total": time.perf_counter() - t_start,
           "args": vars(args), "batch": BATCH,
           "data": {k: {kk: vv for kk, vv in v.items() if kk != "samples_per_shard"} for k, v in data.items()},
           "summary": table, "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
