"""Scaling model and simulation of the sharded score merge: N samples x R ranks x W workers, in one
process, through the package's own code (ted_stream.shard's routing, folding and deltas, the real
ScoreTable, policy.select and EpochMask) and streaming's own partitioning (get_partitions).

Per configuration it reports the bytes each rank receives per epoch (the all-gather it replaced,
a rank that owns a slice, a node leader that holds the whole table), the freeze's time and
transient peak, the resident table per node, and checks: the holders' table is the all-gather's
bit for bit, the mask is the one the all-gather's table gives, every rank gets the same number of
batches and every kept sample is read exactly once. Each simulated row also records the wall time
and peak resident memory of its phases. At 1,024 ranks the peak is about 11.6 bytes per sample
(12.5 GB at 1e9, with the interpreter's 0.9 GB): streaming's partition, whose copies peak at 16
bytes per kept sample, beside the table; or the merge's two whole tables (the holders' and the
all-gather's) beside the epoch's records (8 bytes each). With few ranks, route's whole-array
temporaries over one rank's records and record's over 2**21 of an owner's add to it: 1e9 samples
x 8 ranks peaked at 14.1 GB (docs/scale.md).

    .venv/bin/python launch/bench_scale.py --simulate 10000000 100000000 --freeze 1000000000 \
        --out docs/results/scale.json --plot docs/results/scale.png
    .venv/bin/python launch/bench_scale.py --simulate 100000000 1000000000 --ranks 1024 --no-resident \
        --out docs/results/scale_1e9.json --plot ''
    .venv/bin/python launch/bench_scale.py --simulate 1000000000 --ranks 8 --no-resident \
        --out docs/results/scale_1e9_r8.json --plot ''
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import tracemalloc

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the freeze target is one core
import numpy as np
from provenance import provenance
from streaming.base.partition import get_partitions

from ted_stream import TEDConfig, shard
from ted_stream.mask import EpochMask, unpack
from ted_stream.policy import select
from ted_stream.table import ScoreTable, f32_to_bf16

CFG = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0)  # the default policy at 50% pruned
RANKS_PER_NODE, WORKERS, BATCH = 8, 8, 4
FP = {"digest": "0" * 64}


def scored_table(n: int, seed: int = 0) -> ScoreTable:
    table = ScoreTable(n, dict(FP, num_samples=n))
    rng = np.random.default_rng(seed)
    for s in range(0, n, 1 << 24):
        e = min(n, s + (1 << 24))
        table.scores[s:e] = f32_to_bf16(rng.standard_normal(e - s, dtype=np.float32))
    table.updated[:] = 1
    return table


def timed_select(table: ScoreTable, epoch: int, granule: int):
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: the freeze's transient peak
    wall, cpu = time.perf_counter(), time.process_time()
    mask = select(CFG, table, epoch, granule=granule)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return mask, {"freeze_wall_s": round(wall, 2), "freeze_cpu_s": round(cpu, 2),
                  "freeze_peak_bytes_per_sample": round(peak / table.num_samples, 2)}


def partition(kept: int, ranks: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """streaming's partition of ``kept`` samples over ranks x workers (positions in the kept ids,
    -1 for padding), the samples each rank reads, and the check: the batches per rank and whether
    every kept sample is read exactly once."""
    nodes = ranks // RANKS_PER_NODE
    order = get_partitions("relaxed", kept, nodes, nodes, RANKS_PER_NODE, WORKERS, BATCH)
    read = np.zeros(kept, bool)  # one byte per kept sample, where counting reads would take eight
    counts = np.zeros(ranks, np.int64)
    for r, positions in enumerate(rank_positions(order)):
        counts[r] = len(positions)
        read[positions] = True
    # As many reads as kept samples, and every kept sample read: so each is read exactly once.
    once = bool(counts.sum() == kept and read.all())
    return {"batches_per_rank": sorted({int(c) // BATCH for c in counts}),
            "equal_batches": bool((counts == counts[0]).all() and counts[0] % BATCH == 0),
            "every_kept_sample_once": once}, order, counts


def rank_positions(order: np.ndarray):
    """Each rank's positions in the kept ids, in the order it reads them, rank after rank.
    ``order`` is a strided view whose (node, rank) axes cannot merge: reshaping it to one row
    per rank would copy the whole partition, indexing it copies one rank's row at a time."""
    for node in order:
        for rank in node:
            positions = rank.ravel()
            yield positions[positions >= 0]


def kept_ids(mask: EpochMask) -> np.ndarray:
    """The kept ids, ascending, in their wire type (int32 up to 2**31 samples), unpacked 2**24
    samples at a time: int64 ids from the whole boolean array would take 4 B/kept sample more."""
    step, n = 1 << 24, mask.num_samples
    ids = np.empty(mask.kept, shard.id_dtype(n))
    at = 0
    for s in range(0, n, step):
        got = np.flatnonzero(unpack(mask.keep[s // 8 : (s + step) // 8], min(step, n - s))) + s
        ids[at : at + len(got)] = got
        at += len(got)
    return ids


@contextlib.contextmanager
def phase(row: dict, name: str):
    """Time a phase of ``simulate`` and record its peak resident memory (VmHWM, reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS: the peak is this phase's
    t = time.perf_counter()
    yield
    row["phases"][name] = {"wall_s": round(time.perf_counter() - t, 2), "peak_rss_bytes": _status()["VmHWM"]}


def simulate(n: int, ranks: int) -> dict:
    """One pruned epoch of ``ranks`` ranks: each scores the samples streaming gives it, the scores
    merge through the owners, rank 0 freezes the next epoch's mask.

    Memory: the epoch's records exist once, rank after rank in one array of ids (4 bytes each)
    and one of scores (drawn as each rank sends), every rank's routed in place: thousands of
    per-rank arrays would each fall below glibc's mmap threshold and stay on the heap once freed.
    The all-gather folds them, rank after rank, into a copy of the table as they are routed; each
    owner folds its slice's records into a copy of its slice only, and the holders' table applies
    the owners' deltas."""
    row: dict = {"num_samples": n, "ranks": ranks, "workers": WORKERS, "phases": {}}
    with phase(row, "table_and_first_freeze"):
        table = scored_table(n)  # the state every holder starts the epoch with (the node's file)
        first, _ = timed_select(table, 1, ranks * BATCH)
        table.masks[1] = first
    with phase(row, "partition_and_records"):
        check, order, counts = partition(first.kept, ranks)
        row.update(check)
        kept = kept_ids(first)  # built after streaming's partition, whose copies peak at 16 B/kept sample
        at = np.zeros(ranks + 1, np.int64)  # rank r's records are ids[at[r]:at[r + 1]]
        np.cumsum(counts, out=at[1:])
        ids = np.empty(at[-1], kept.dtype)
        for r, positions in enumerate(rank_positions(order)):
            ids[at[r] : at[r + 1]] = kept[positions]
        del order, kept
    bounds = shard.owner_bounds(n, ranks)
    rng = np.random.default_rng(1)
    table.epoch = old_epoch = 1
    with phase(row, "merge"):
        old = ScoreTable(n, table.fingerprint, scores=table.scores.copy(), updated=table.updated.copy())
        old.epoch = old_epoch
        vals = np.empty(len(ids), np.float32)
        sent = np.zeros((ranks, ranks), np.int64)  # sent[source, owner]
        fold_s = route_s = 0.0
        for r in range(ranks):  # each rank scores what it read, then sends it
            mine = slice(at[r], at[r + 1])
            vals[mine] = rng.standard_normal(at[r + 1] - at[r])
            t = time.perf_counter()
            old.record(ids[mine], vals[mine])  # the all-gather: every rank folds every rank's records, in rank order
            fold_s += time.perf_counter() - t
            t = time.perf_counter()
            ids[mine], vals[mine], sent[r] = shard.route(ids[mine], vals[mine], bounds, n)
            route_s += time.perf_counter() - t
        row["allgather_fold_s"] = round(fold_s, 2)
        got = sent.sum(axis=0)
        starts = np.zeros((ranks, ranks + 1), np.int64)  # owner o's records from rank r: starts[r, o:o + 2]
        np.cumsum(sent, axis=1, out=starts[:, 1:])
        starts += at[:-1, None]
        t = time.perf_counter()
        delta_bytes = 0
        for o in range(ranks):  # each owner folds its slice; the holder (table) applies its delta
            lo, hi = int(bounds[o]), int(bounds[o + 1])
            # What owner o receives from the all-to-all: its records, source rank after source rank.
            parts = [slice(starts[r, o], starts[r, o + 1]) for r in range(ranks)]
            got_ids = np.concatenate([ids[p] for p in parts])
            got_vals = np.concatenate([vals[p] for p in parts])
            # The owner's slice as a table of its own (ids shifted by lo): the slice is all it folds.
            owned = ScoreTable(hi - lo, table.fingerprint, scores=table.scores[lo:hi].copy(),
                               updated=table.updated[lo:hi].copy())
            owned.epoch = old_epoch
            touched = shard.fold_owned(owned, got_ids - lo, got_vals, 0, hi - lo)
            delta = shard.encode_delta(owned.scores, owned.updated, touched)
            delta_bytes += len(delta)
            shard.apply_delta(table, lo, hi, delta)
        row["sharded_fold_s"] = round(route_s + time.perf_counter() - t, 2)
        total = len(ids)
        del ids, vals, owned, got_ids, got_vals
    row["table_equals_allgather"] = bool(np.array_equal(table.scores, old.scores)
                                         and np.array_equal(table.updated, old.updated))
    with phase(row, "freeze_and_reference_freeze"):
        mask, row["freeze"] = timed_select(table, 2, ranks * BATCH)
        reference = select(CFG, old, 2, granule=ranks * BATCH)
        row["mask_equals_allgather"] = mask.to_bytes().tobytes() == reference.to_bytes().tobytes()
        del old, reference
    width = shard.id_dtype(n).itemsize + 4
    mask_bytes = len(mask.to_bytes())
    row["bytes_per_rank"] = {
        "allgather": width * total,
        "owner_max": int(width * got.max() + 16 * ranks),  # the mask: from the node's file
        "holder_max": int(width * got.max() + 16 * ranks + delta_bytes + mask_bytes),
        "target": int(8 * n / ranks + n / 8),
    }
    with phase(row, "next_partition"):
        row["next_epoch"] = partition(mask.kept, ranks)[0]
    row["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in row["phases"].values())
    return row


def resident(n: int, folder: str) -> dict:
    """The table a node holds: the file, mapped by every rank; private (anonymous) memory a rank
    adds by mapping it, against the shared file pages."""
    table = scored_table(n)
    path = os.path.join(folder, "table.tedt")
    table.save(path)
    del table
    before = _status()
    mapped = ScoreTable.load(path)  # reads every page (its CRC): all of them resident
    after = _status()
    row = {"file_bytes_per_sample": round(os.path.getsize(path) / n, 3),
           "rank_private_bytes_per_sample": round((after["RssAnon"] - before["RssAnon"]) / n, 3),
           "shared_file_bytes_per_sample": round((after["RssFile"] - before["RssFile"]) / n, 3)}
    del mapped
    os.unlink(path)
    return row


def _status() -> dict:
    """This process's resident memory in bytes: anonymous, file pages, and the peak (VmHWM)."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("RssAnon", "RssFile", "VmHWM")}


def model(n: int, ranks: int) -> dict:
    """Bytes received per rank per epoch, every sample scored once (records = changed = n)."""
    t = shard.traffic(n, ranks, records=n, changed=n, mask_bytes=2 * ((n + 7) // 8) + 24)
    return {"num_samples": n, "ranks": ranks, "allgather": t.allgather, "owner": t.owner, "holder": t.holder,
            "target": int(8 * n / ranks + n / 8)}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [m for m in result["model"] if m["ranks"] == 1024]
    ns = [m["num_samples"] for m in rows]
    for key, label in [("allgather", "all-gather (before)"), ("holder", "node leader / rank 0"),
                       ("owner", "other ranks"), ("target", "target 8N/R + N/8")]:
        a.loglog(ns, [m[key] / 2**20 for m in rows], marker="o", label=label)
    a.set(xlabel="samples N", ylabel="MiB received per rank per epoch", title="merge traffic, 1,024 ranks")
    a.legend()
    sizes = [r["num_samples"] for r in result["freeze"]]
    b.loglog(sizes, [r["freeze_wall_s"] for r in result["freeze"]], marker="o", label="freeze wall s (one core)")
    b.loglog(sizes, [r["freeze_peak_bytes_per_sample"] * r["num_samples"] / 2**30 for r in result["freeze"]],
             marker="s", label="freeze transient GiB")
    b.axhline(20, color="grey", ls="--", lw=0.8)
    b.set(xlabel="samples N", title="mask freeze (default ted, 50% pruned)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--simulate", type=int, nargs="*", default=[10_000_000])
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 64, 1024])
    ap.add_argument("--freeze", type=int, nargs="*", default=[], help="sizes measured by freeze and table map only")
    ap.add_argument("--freeze-repeats", type=int, default=1, help="freezes of each --freeze table, in one process")
    ap.add_argument("--out", default="docs/results/scale.json")
    ap.add_argument("--plot", default="docs/results/scale.png", help="'' for none")
    ap.add_argument("--resident", action=argparse.BooleanOptionalAction, default=True,
                    help="map the table of the largest simulated and the --freeze sizes (writes it to disk)")
    args = ap.parse_args()
    result = {"provenance": provenance(), "ranks_per_node": RANKS_PER_NODE, "workers": WORKERS, "batch": BATCH,
              "simulated": [], "freeze": [], "resident": []}
    result["model"] = [model(n, r) for n in (10**6, 10**7, 10**8, 10**9) for r in (8, 64, 1024)]
    for n in args.simulate:
        for r in args.ranks:
            row = simulate(n, r)
            print(json.dumps(row), flush=True)
            result["simulated"].append(row)
        result["freeze"].append({"num_samples": n, **row["freeze"]})
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as folder:
        for n in args.freeze:
            table = scored_table(n)
            # The first freeze of a process pays for fresh pages; later ones reuse them.
            rows = [timed_select(table, 1, 1024 * BATCH)[1] for _ in range(args.freeze_repeats)]
            del table
            row = {"num_samples": n, **rows[0]}
            if len(rows) > 1:
                row["later_freeze_wall_s"] = [r["freeze_wall_s"] for r in rows[1:]]
            print(json.dumps(row), flush=True)
            result["freeze"].append(row)
        for n in (args.simulate[-1:] + args.freeze if args.resident else []):
            result["resident"].append({"num_samples": n, **resident(n, folder)})
            print(json.dumps(result["resident"][-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
