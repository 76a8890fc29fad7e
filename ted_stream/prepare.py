"""Turn a text or JSONL corpus into zstd MDS shards with an empty score table beside them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from streaming import MDSWriter
from tqdm import tqdm

from .fingerprint import index_fingerprint
from .table import FILENAME, ScoreTable, current_umask

_TYPES = {str: "str", bytes: "bytes", int: "int64", float: "float64", bool: "int64"}


def read_corpus(path: str) -> Iterator[dict[str, Any]]:
    """Samples of a ``.jsonl`` file (one object per line) or a text file (one per non-empty line).

    Every problem is reported as ``path:line: what``: invalid UTF-8, a line that is not a JSON
    object, or a value that does not fit the column the first sample gave it."""
    columns: dict[str, str] | None = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            if not path.endswith((".jsonl", ".json")):
                yield {"text": line.rstrip("\r\n")}
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            try:
                columns = columns or columns_of(record)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            problem = sample_problem(record, columns)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            yield record


def columns_of(sample: dict[str, Any]) -> dict[str, str]:
    """MDS column types from the first sample; nested values are stored as JSON."""
    nulls = sorted(k for k, v in sample.items() if v is None)
    if nulls:
        raise ValueError(
            f"column(s) {nulls} are null in the first sample, so their type cannot be "
            "inferred; give the first sample a value of each column's type"
        )
    return {k: _TYPES.get(type(v), "json") for k, v in sample.items()}


_INT64 = (-(1 << 63), (1 << 63) - 1)


def sample_problem(sample: dict[str, Any], columns: dict[str, str]) -> str | None:
    """What keeps ``sample`` out of MDS ``columns`` (as the first sample typed them), or None.

    Nothing is converted silently: 3.5 in an integer column is refused, not stored as 3; the
    one conversion is an integer in a float column (stored exactly as a float64)."""
    if set(sample) != set(columns):
        return f"keys {sorted(sample)}; expected {sorted(columns)} like the first sample"
    for key, kind in columns.items():
        v = sample[key]
        if v is None:
            return f"column {key!r} is null; MDS columns cannot hold null: drop the sample or fill it in"
        if kind == "int64" and not isinstance(v, int):
            return (
                f"column {key!r} holds {v!r} ({type(v).__name__}) but the first sample made it an "
                "integer column; store floats by giving the first sample a float (e.g. 3.0)"
            )
        if kind == "int64" and not _INT64[0] <= v <= _INT64[1]:
            return f"column {key!r} holds {v}, outside the 64-bit integer range of an MDS int64 column"
        if kind == "float64" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"column {key!r} holds {v!r} ({type(v).__name__}); expected a number like the first sample"
        if kind in ("str", "bytes") and not isinstance(v, str if kind == "str" else bytes):
            return f"column {key!r} holds {v!r:.60} ({type(v).__name__}); expected {kind} like the first sample"
    return None


def write_mds(samples: Iterable[dict[str, Any]], out: str, size_limit: int = 1 << 26, total: int | None = None) -> int:
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
        # xxh64 of every shard in index.json: a loader given validate_hash="xxh64" (upstream's
        # argument) refuses a damaged shard instead of reading wrong samples.
        with MDSWriter(out=tmp, columns=columns, compression="zstd", hashes=["xxh64"], size_limit=size_limit) as writer:
            for sample in tqdm(_chain(first, it), total=total, desc=f"writing {out}", unit="sample"):
                problem = sample_problem(sample, columns)
                if problem:
                    raise ValueError(f"sample {count}: {problem}")
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
