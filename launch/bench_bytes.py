"""Bytes an epoch downloads and decompresses from a remote, per-sample pruning against block
(shard-aware) pruning (``TEDConfig.block`` = samples per shard, or ``"shard"``), at 0 / 30 / 50 /
70% pruned.

The shards of ``bench_loader.py`` (seeded synthetic zstd MDS, written in sample order: a block of
contiguous ids is a shard) serve as streaming's ``remote``: 128 B and 32 KiB samples (shards of
equal counts: ``block`` = samples per shard), and samples of log-uniform sizes in 256 B-64 KiB
("mixed": shards of different counts, where ``block`` = the mean count straddles shard
boundaries and ``block="shard"`` follows them); every epoch gets a fresh empty
``local`` cache, so it copies ("downloads") and decompresses exactly the shards it reads. The
mask is the ``ted`` policy's (default explore, alpha, rescale) over seeded random scores, frozen
by ``start_epoch(0)``. Bytes are deterministic for a mask, so one epoch per cell suffices.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from bench_loader import BATCH, SEED_SHUFFLE, epoch, fetched, log, write_shards
from provenance import provenance
from streaming.base.util import clean_stale_shared_memory

from ted_stream import TEDConfig, TEDStreamingDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=40_000, help="samples of the 128 B dataset")
    p.add_argument("--large", type=int, default=4_000, help="samples of the 32 KiB dataset")
    p.add_argument("--mixed", type=int, default=6_000, help="samples of the 256 B-64 KiB dataset")
    p.add_argument("--shard-bytes", type=int, nargs=3, default=[1 << 18, 1 << 22, 1 << 22],
                   help="MDS shard size limits (raw bytes) of the small, the large and the mixed dataset")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_bytes.json")
    args = p.parse_args()
    prov = provenance()
    root = tempfile.mkdtemp(prefix="bench-bytes-")
    clean_stale_shared_memory()
    runs: list[dict[str, Any]] = []
    try:
        sizes: list[tuple[str, int, int | tuple[int, int], int]] = [
            ("128B", args.small, 128, args.shard_bytes[0]), ("32KiB", args.large, 32 * 1024, args.shard_bytes[1]),
            ("mixed", args.mixed, (256, 64 * 1024), args.shard_bytes[2])]
        for name, count, size, shard_bytes in sizes:
            remote = os.path.join(root, name)
            data = write_shards(remote, count, size, args.seed, shard_bytes)
            per_shard = data["samples_per_shard"]
            log(f"wrote {name}: {count} samples, {data['shards']} shards of {min(per_shard)}-{max(per_shard)} "
                f"samples, {data['zstd_bytes'] / 2**20:.1f} MiB zstd")
            blocks: list[int | str] = [0, per_shard[0]]  # fixed-size samples: every shard but the last
            if name == "mixed":
                blocks = [0, round(count / data["shards"]), "shard"]
            for block in blocks:
                for frac in args.fractions:
                    cfg = TEDConfig(target=frac, warmup_epochs=0, ramp_epochs=0, seed=args.seed, block=block)
                    table_dir = os.path.join(root, "tables", f"{name}-{block}-{frac}")
                    local = tempfile.mkdtemp(prefix=f"cold-{name}-", dir=root)
                    kept: list[int] = []

                    def make(cfg: TEDConfig = cfg, table_dir: str = table_dir, local: str = local,
                             remote: str = remote, kept: list[int] = kept) -> Any:
                        ds = TEDStreamingDataset(local=local, remote=remote, batch_size=BATCH, shuffle=True,
                                                 shuffle_seed=SEED_SHUFFLE, ted=cfg, table_dir=table_dir)
                        rng = np.random.default_rng(args.seed + 1)
                        ds.record(np.arange(ds.num_samples), rng.random(ds.num_samples, dtype=np.float32))
                        kept.append(ds.start_epoch(0).kept)
                        return ds

                    run = epoch(make, args.workers)
                    shards, zstd_read, raw = fetched(local, remote)
                    shutil.rmtree(local)
                    run.update(data=name, block=block, fraction=frac, kept=kept[0] / count, shards_fetched=shards,
                               shards=data["shards"], zstd_read=zstd_read / data["zstd_bytes"],
                               decompressed=raw / data["raw_bytes"], zstd_bytes=zstd_read, raw_bytes=raw)
                    runs.append(run)
                    log(f"{name} block={block!s:>5} pruned {frac:.0%}: kept {run['kept']:.3f}, "
                        f"{shards}/{data['shards']} shards, zstd read {run['zstd_read']:.3f}, "
                        f"decompressed {run['decompressed']:.3f}, {run['samples']} samples in {run['wall_s']:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        clean_stale_shared_memory()
    lines = ["| data | block | pruned | kept | shards fetched | zstd read / all | decompressed / all | "
             "target (kept + 0.1) |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        target = f"{r['kept'] + 0.1:.3f} {'met' if r['zstd_read'] <= r['kept'] + 0.1 else 'missed'}"
        lines.append(f"| {r['data']} | {r['block'] or 'per sample'} | {r['fraction']:.0%} | {r['kept']:.3f} | "
                     f"{r['shards_fetched']} / {r['shards']} | {r['zstd_read']:.3f} | {r['decompressed']:.3f} | "
                     f"{target} |")
    print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump({**prov, "args": vars(args), "runs": runs, "table": lines},
                  f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
