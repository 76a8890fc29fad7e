"""Turn a text or JSONL corpus into zstd MDS shards with an empty score table beside them."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

from streaming import MDSWriter
from tqdm import tqdm

from .fingerprint import index_fingerprint
from .table import FILENAME, ScoreTable, current_umask

_TYPES = {str: "str", bytes: "bytes", int: "int64", float: "float64", bool: "int64"}


def read_corpus(path: str) -> Iterator[dict[str, Any]]:
    """Samples of a ``.jsonl`` file (one object per line) or a text file (one per non-empty line)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                    yield record
        else:
            for line in f:
                if line.strip():
                    yield {"text": line.rstrip("\n")}


def columns_of(sample: dict[str, Any]) -> dict[str, str]:
    """MDS column types from the first sample; nested values are stored as JSON."""
    return {k: _TYPES.get(type(v), "json") for k, v in sample.items()}


def write_mds(samples: Iterable[dict[str, Any]], out: str, size_limit: int = 1 << 26,
              total: int | None = None) -> int:
    """Write ``samples`` as zstd MDS shards into ``out`` and an empty table in ``out/ted``.

    Everything is written into a temporary folder beside ``out`` and renamed into place at the
    end, so a failure (bad sample, full disk, kill) never leaves a half-written dataset.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        what = "a dataset (index.json)" if os.path.exists(os.path.join(out, "index.json")) else "files"
        raise FileExistsError(f"{out} already holds {what}; choose an empty folder")
    it = iter(samples)
    first = next(it, None)
    if first is None:
        raise ValueError("the corpus has no samples")
    columns = columns_of(first)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared dataset
        count = 0
        with MDSWriter(out=tmp, columns=columns, compression="zstd", size_limit=size_limit) as writer:
            for sample in tqdm(_chain(first, it), total=total, desc=f"writing {out}", unit="sample"):
                if set(sample) != set(columns):
                    raise ValueError(f"sample {count} has keys {sorted(sample)}; expected {sorted(columns)} "
                                     "like the first sample")
                writer.write(sample)
                count += 1
        ScoreTable(count, index_fingerprint([tmp])).save(os.path.join(tmp, "ted", FILENAME))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest
