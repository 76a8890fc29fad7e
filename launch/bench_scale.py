"""Scaling model and simulation of the sharded score merge: N samples x R ranks x W workers, in one
process, through the package's own code (ted_stream.shard's routing, folding and deltas, the real
ScoreTable, policy.select and EpochMask) and streaming's own partitioning (get_partitions).

Per configuration it reports the bytes each rank receives per epoch (the all-gather it replaced,
a rank that owns a slice, a node leader that holds the whole table), the freeze's time and
transient peak, the resident table per node, and checks: the holders' table is the all-gather's
bit for bit, the mask is the one the all-gather's table gives, every rank gets the same number of
batches and every kept sample is read exactly once. Sizes too large to simulate (1e9) get the
model plus one measured freeze and one measured table map.

    .venv/bin/python launch/bench_scale.py --simulate 10000000 100000000 --freeze 1000000000 \
        --out docs/results/scale.json --plot docs/results/scale.png
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the freeze target is one core
import numpy as np
from streaming.base.partition import get_partitions

from provenance import provenance
from ted_stream import TEDConfig, shard
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


def partition(kept: np.ndarray, ranks: int) -> dict:
    """streaming's partition of the kept samples over ranks x workers: batches per rank, and
    whether every kept sample is read exactly once."""
    nodes = ranks // RANKS_PER_NODE
    ids = get_partitions("relaxed", len(kept), nodes, nodes, RANKS_PER_NODE, WORKERS, BATCH)
    per_rank = ids.reshape(ranks, -1)
    real = per_rank >= 0
    counts = real.sum(axis=1)
    read = np.bincount(per_rank[real], minlength=len(kept))
    return {"batches_per_rank": sorted({int(c) // BATCH for c in counts}), "equal_batches": bool((counts == counts[0]).all()
            and counts[0] % BATCH == 0), "every_kept_sample_once": bool((read == 1).all())}


def simulate(n: int, ranks: int) -> dict:
    """One pruned epoch of ``ranks`` ranks: each scores the samples streaming gives it, the scores
    merge through the owners, rank 0 freezes the next epoch's mask."""
    table = scored_table(n)  # the state every holder starts the epoch with (the node's file)
    first, _ = timed_select(table, 1, ranks * BATCH)
    table.masks[1] = first
    kept = np.flatnonzero(first.bools())
    row = {"num_samples": n, "ranks": ranks, "workers": WORKERS, **partition(kept, ranks)}
    rng = np.random.default_rng(1)
    nodes = ranks // RANKS_PER_NODE
    order = get_partitions("relaxed", len(kept), nodes, nodes, RANKS_PER_NODE, WORKERS, BATCH).reshape(ranks, -1)
    records = [(kept[o[o >= 0]], rng.standard_normal(int((o >= 0).sum())).astype(np.float32)) for o in order]
    del order
    table.epoch = old_epoch = 1
    old = ScoreTable(n, table.fingerprint, scores=table.scores.copy(), updated=table.updated.copy())
    old.epoch = old_epoch
    t = time.perf_counter()
    for ids, vals in records:  # the all-gather: every rank folds every rank's records, in rank order
        old.record(ids, vals)
    row["allgather_fold_s"] = round(time.perf_counter() - t, 2)
    bounds = shard.owner_bounds(n, ranks)
    t = time.perf_counter()
    routed = [shard.route(ids, vals, bounds, n) for ids, vals in records]
    total = sum(len(ids) for ids, _ in records)
    del records
    got = np.zeros(ranks, np.int64)
    for _, _, counts in routed:
        got += counts
    # What each owner receives from the all-to-all: its records, source rank after source rank.
    all_ids = np.concatenate([r[0] for r in routed]).astype(np.int64)
    all_vals = np.concatenate([r[1] for r in routed])
    del routed
    by_owner = np.argsort(np.searchsorted(bounds, all_ids, side="right") - 1, kind="stable")
    all_ids, all_vals = all_ids[by_owner], all_vals[by_owner]
    del by_owner
    starts = np.r_[0, np.cumsum(got)]
    owned = ScoreTable(n, table.fingerprint, scores=table.scores.copy(), updated=table.updated.copy())
    owned.epoch = old_epoch
    delta_bytes = 0
    for r in range(ranks):  # each owner folds its slice; the holder (table) applies its delta
        lo, hi, part = int(bounds[r]), int(bounds[r + 1]), slice(starts[r], starts[r + 1])
        touched = shard.fold_owned(owned, all_ids[part], all_vals[part], lo, hi)
        delta = shard.encode_delta(owned.scores[lo:hi], owned.updated[lo:hi], touched)
        delta_bytes += len(delta)
        shard.apply_delta(table, lo, hi, delta)
    row["sharded_fold_s"] = round(time.perf_counter() - t, 2)
    del owned, all_ids, all_vals
    row["table_equals_allgather"] = bool(np.array_equal(table.scores, old.scores)
                                         and np.array_equal(table.updated, old.updated))
    mask, row["freeze"] = timed_select(table, 2, ranks * BATCH)
    row["mask_equals_allgather"] = mask.to_bytes().tobytes() == select(CFG, old, 2, granule=ranks * BATCH).to_bytes().tobytes()
    del old
    width = shard.id_dtype(n).itemsize + 4
    mask_bytes = len(mask.to_bytes())
    row["bytes_per_rank"] = {
        "allgather": width * total,
        "owner_max": int(width * got.max() + 16 * ranks),  # the mask: from the node's file
        "holder_max": int(width * got.max() + 16 * ranks + delta_bytes + mask_bytes),
        "target": int(8 * n / ranks + n / 8),
    }
    row["next_epoch"] = partition(np.flatnonzero(mask.bools()), ranks)
    return row


def resident(n: int, folder: str) -> dict:
    """The table a node holds: the file, mapped by every rank; private (anonymous) memory a rank
    adds by mapping it, against the shared file pages."""
    table = scored_table(n)
    path = os.path.join(folder, "table.tedt")
    table.save(path)
    del table
    before = _rss()
    mapped = ScoreTable.load(path)  # reads every page (its CRC): all of them resident
    after = _rss()
    row = {"file_bytes_per_sample": round(os.path.getsize(path) / n, 3),
           "rank_private_bytes_per_sample": round((after["RssAnon"] - before["RssAnon"]) / n, 3),
           "shared_file_bytes_per_sample": round((after["RssFile"] - before["RssFile"]) / n, 3)}
    del mapped
    os.unlink(path)
    return row


def _rss() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}


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
    ap.add_argument("--out", default="docs/results/scale.json")
    ap.add_argument("--plot", default="docs/results/scale.png")
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
            _, row = timed_select(table, 1, 1024 * BATCH)
            del table, _
            row = {"num_samples": n, **row}
            print(json.dumps(row), flush=True)
            result["freeze"].append(row)
        for n in args.simulate[-1:] + args.freeze:
            result["resident"].append({"num_samples": n, **resident(n, folder)})
            print(json.dumps(result["resident"][-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.plot)


if __name__ == "__main__":
    main()
