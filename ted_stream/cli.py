"""The ``ted-stream`` command: prepare a corpus, inspect a score table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .fingerprint import index_fingerprint
from .prepare import read_corpus, write_mds
from .table import FILENAME, ScoreTable, TableError


def inspect(folder: str, table_dir: Optional[str] = None) -> dict[str, Any]:
    """Summary of the dataset in ``folder`` and its score table."""
    path = os.path.join(table_dir or os.path.join(folder, "ted"), FILENAME)
    table = ScoreTable.load(path)
    matches = _digest(folder) == table.fingerprint["digest"]
    scored = table.scored
    scores = table.score_array()[scored]
    epochs = {}
    for e, m in sorted(table.masks.items()):
        kept = m.kept
        epochs[str(e)] = {
            "kept": kept,
            "pruned": table.num_samples - kept,
            "requested": m.requested,
            "boost_weight": m.boost_weight if m.boost is not None else None,
            "base_weight": m.base_weight,
            "config": table.frozen_by.get(e),
        }
    return {
        "table": path,
        "num_samples": table.num_samples,
        "scored": int(scored.sum()),
        "fingerprint": table.fingerprint["digest"],
        "fingerprint_matches": matches,
        "score_mean": float(scores.mean()) if len(scores) else None,
        "score_min": float(scores.min()) if len(scores) else None,
        "score_max": float(scores.max()) if len(scores) else None,
        "epochs": epochs,
        "configs": {d: table.configs[d] for d in sorted(set(table.frozen_by.values()))},
    }


def _digest(folder: str) -> Optional[str]:
    """Fingerprint digest of the dataset in ``folder``: its WebDataset manifest's, else its
    ``index.json``'s; None without either, or when the shards no longer match their manifest."""
    from .loaders.wds_index import MANIFEST, ManifestError, WdsIndex  # imported here: MDS folders never need it

    try:
        if os.path.exists(os.path.join(folder, MANIFEST)):
            return WdsIndex.open(folder).fingerprint["digest"]
        return index_fingerprint([folder])["digest"]
    except (FileNotFoundError, ManifestError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ted-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write a .txt/.jsonl corpus as zstd MDS shards plus an empty table")
    p.add_argument("corpus", help="a .jsonl file (one JSON object per line) or a text file (one sample per line)")
    p.add_argument("out", help="empty output folder")
    p.add_argument("--shard-size", type=int, default=1 << 26, help="shard size limit in bytes")
    p.add_argument(
        "--format", choices=("mds", "wds"), default="mds", help="zstd MDS shards, or indexed WebDataset tar shards"
    )
    x = sub.add_parser("index", help="index WebDataset tar shards in place (writes wds-index.json beside them)")
    x.add_argument("shards", nargs="+", help="tar paths, brace patterns (data-{000000..000009}.tar) or their folder")
    i = sub.add_parser("inspect", help="summarise a dataset's score table")
    i.add_argument("folder", help="the dataset folder (holding index.json, or tar shards and wds-index.json)")
    i.add_argument("--table-dir", default=None, help="table folder if not <folder>/ted")
    i.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "index":
            from .loaders.wds_index import index_command  # imported here: the MDS commands never need it

            print(index_command(args.shards))
            return 0
        if args.command == "prepare" and args.format == "wds":
            from .loaders.wds_index import prepare_shards

            n = prepare_shards(read_corpus(args.corpus), args.out, args.shard_size)
            print(f"wrote {n} samples to {args.out} as indexed tar shards (table in {os.path.join(args.out, 'ted')})")
            return 0
        if args.command == "prepare":
            n = write_mds(read_corpus(args.corpus), args.out, args.shard_size)
            print(f"wrote {n} samples to {args.out} (table in {os.path.join(args.out, 'ted')})")
            return 0
        info = inspect(args.folder, args.table_dir)
    except (TableError, ValueError, OSError) as e:  # OSError: a missing file, a full disk
        print(f"ted-stream: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(
            f"{info['table']}: {info['num_samples']} samples, {info['scored']} scored, "
            f"fingerprint {'matches' if info['fingerprint_matches'] else 'DOES NOT match'}"
        )
        for epoch, m in info["epochs"].items():
            asked = "" if m["requested"] is None else f" (schedule asked for {m['requested']})"
            print(f"  epoch {epoch}: kept {m['kept']}, pruned {m['pruned']}{asked}, config {m['config']}")
        for digest, config in info["configs"].items():
            print(f"  config {digest}: {json.dumps(config, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
