"""Dataset fingerprint: which streams, which shards, how many samples each."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any


def index_fingerprint(index_dirs: Sequence[str]) -> dict[str, Any]:
    """Fingerprint of the datasets whose ``index.json`` lie in ``index_dirs``, in stream order.

    Paths are left out on purpose: the same shards cached under another folder (another node,
    another machine) are the same dataset.
    """
    streams = []
    for folder in index_dirs:
        path = os.path.join(folder, "index.json")
        try:
            with open(path) as f:
                index = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no index.json in {folder}: expected a streaming dataset folder") from None
        shards = [
            [s.get("raw_data", {}).get("basename", str(i)), int(s["samples"])] for i, s in enumerate(index["shards"])
        ]
        streams.append({"shards": shards})
    canon = json.dumps(streams, sort_keys=True, separators=(",", ":")).encode()
    return {
        "digest": hashlib.sha256(canon).hexdigest(),
        "num_streams": len(streams),
        "num_shards": sum(len(s["shards"]) for s in streams),
        "num_samples": sum(n for s in streams for _, n in s["shards"]),
    }
