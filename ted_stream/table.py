"""ScoreTable: the per-sample scores and keep-masks kept in one file beside the shards.

Resident cost per sample: 2 bytes of score (bfloat16: the range of float32, since squared
gradient norms overflow float16) and 1 byte holding the last epoch that scored it, plus one bit
per sample for each started epoch's keep-mask (and one more where that epoch up-weights samples).

File layout (little endian, format version 2), written to a temporary file, fsynced and renamed
over the old one:
    magic "TEDTABLE" | uint32 version | uint32 header length | uint32 header CRC | JSON header | payload
    payload = scores uint16[n] | updated uint8[n] | per epoch: keep bits [, boost bits]
The header CRC covers version, length and JSON; the JSON carries the payload's CRC, so every byte
of the file is under a checksum. The header also names the configuration that froze each mask
(run identity) and the dataset fingerprint. Nothing is pickled. See docs/table.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import numpy as np

from .mask import EpochMask

MAGIC = b"TEDTABLE"
MAGIC_V1 = b"TEDTABL1"
VERSION = 2
FILENAME = "table.tedt"
NEVER = 0  # value of `updated` for a sample that was never scored
_RECORD_SLICE = 1 << 21  # records folded at a time by ScoreTable.record
_PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header CRC
_CRC_CHUNK = 1 << 24
_WRITE_CHUNK = 1 << 24
MOVE_ASIDE = "move it aside to start a new table"


class TableError(RuntimeError):
    """The table on disk cannot be used: mismatched dataset or run, truncated or corrupted file,
    or another process rewrote it."""


BF16_MAX = 3.3895313892515355e38  # the largest finite bfloat16


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (nearest, ties to even), as uint16. Finite values beyond
    the largest finite bfloat16 (float32's top 0.4%) saturate to it instead of rounding to inf."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    big = np.isfinite(x) & (np.abs(x) > BF16_MAX)  # inf stays inf, nan stays nan
    if big.any():
        x = np.where(big, np.copysign(np.float32(BF16_MAX), x), x)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_order_key(b: np.ndarray) -> np.ndarray:
    """uint16 keys whose integer order is the float order of the bfloat16 bits (a new array).

    Negatives flip every bit, positives the sign bit only: four in-place passes over 16-bit
    values, twice as fast at 1e8 samples as a 65,536-entry lookup table (whose indices numpy
    widens to 64 bits)."""
    bits = np.asarray(b, dtype=np.uint16)
    key = bits >> 15  # 1 for negative numbers
    key *= 0x7FFF
    key |= 0x8000
    key ^= bits
    return key


def config_digest(config: Mapping[str, Any]) -> str:
    """Short stable digest of a run configuration (the key under which the header stores it)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canon).hexdigest()[:16]


class ScoreTable:
    """Per-sample EMA scores, last-update epochs and frozen keep-masks of one dataset."""

    def __init__(
        self,
        num_samples: int,
        fingerprint: dict[str, Any],
        ema: float = 0.5,
        scores: Optional[np.ndarray] = None,
        updated: Optional[np.ndarray] = None,
        masks: Optional[dict[int, EpochMask]] = None,
        path: Optional[str] = None,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} is invalid: expected >= 1")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema={ema} is invalid: expected a weight in (0, 1]")
        self.num_samples = int(num_samples)
        self.fingerprint = dict(fingerprint)
        self.ema = float(ema)
        self.scores = np.zeros(num_samples, np.uint16) if scores is None else scores
        self.updated = np.zeros(num_samples, np.uint8) if updated is None else updated
        self.masks: dict[int, EpochMask] = dict(masks or {})
        self.path = path
        self.epoch = 0  # the epoch new scores are attributed to
        # Run identity: which configuration froze each mask (epoch -> digest; digest -> config).
        self.frozen_by: dict[int, str] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.config: Optional[dict[str, Any]] = None  # the run bound by `bind`; stamps new masks
        # Header CRC of the file as this object last read or wrote it (None: no file then), so
        # that `save` can tell when another process has rewritten it in between.
        self._seen: Optional[int] = None

    # ---- scores -------------------------------------------------------------------------------
    def record(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Fold new per-sample values into the moving average; O(len(ids))."""
        ids, values = self.checked(ids, values)
        # Folding in order is the same in consecutive slices as in one call, and a slice bounds
        # the fold's temporaries (~80 bytes per record): a merge's owner may fold 1e8 at once.
        for s in range(0, len(ids), _RECORD_SLICE):
            # Repeated ids in one call (upstream padding) are folded in order.
            for run_ids, run_vals in _unique_runs(ids[s : s + _RECORD_SLICE], values[s : s + _RECORD_SLICE]):
                old = bf16_to_f32(self.scores[run_ids])
                fresh = self.updated[run_ids] == NEVER
                new = np.where(fresh, run_vals, (1.0 - self.ema) * old + self.ema * run_vals)
                self.scores[run_ids] = f32_to_bf16(new.astype(np.float32))
                self.updated[run_ids] = min(self.epoch + 1, 255)

    def checked(self, ids: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids, values) as 1-D int64/float32 arrays, or ValueError naming what is wrong.

        Nothing is coerced silently: float ids (1.7 would become 1) and [B, 1] score arrays
        (a per-token or keepdim reduction left in) are refused rather than reshaped.
        """
        ids, values = np.asarray(ids), np.asarray(values)
        if ids.ndim != 1 or values.ndim != 1:
            raise ValueError(
                f"record: ids and scores must be 1-D arrays (one score per sample); got "
                f"shapes {ids.shape} and {values.shape}"
            )
        if len(ids) != len(values):
            raise ValueError(f"record: {len(ids)} ids but {len(values)} scores; expected one score per id")
        if len(ids) and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"record: sample ids must be integers (the batch's ted_id); got dtype "
                f"{ids.dtype}, e.g. {ids[:3].tolist()}"
            )
        if len(values) and values.dtype.kind not in "iuf":
            raise ValueError(f"record: scores must be real numbers; got dtype {values.dtype}")
        given = values
        with np.errstate(over="ignore"):  # a float64 beyond float32's range: reported below
            ids, values = ids.astype(np.int64), values.astype(np.float32)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(
                f"record: sample ids must lie in [0, {self.num_samples}); got min {ids.min()}, max {ids.max()}"
            )
        if not np.isfinite(values).all():
            bad = ~np.isfinite(values)
            raise ValueError(
                f"record: scores must be finite float32 values (|score| <= 3.4e38); got {given[bad][:4].tolist()}"
            )
        return ids, values

    def score_array(self) -> np.ndarray:
        return bf16_to_f32(self.scores)

    @property
    def scored(self) -> np.ndarray:
        return self.updated != NEVER

    # ---- run identity -------------------------------------------------------------------------
    def bind(self, config: Mapping[str, Any]) -> None:
        """Declare the configuration of the run using this table; new masks are stamped with it.

        Raises TableError when a frozen mask was made under another configuration: a run reuses
        frozen masks only to resume itself. Masks frozen without a recorded configuration (built
        through this class directly) are adopted.
        """
        config = dict(config)
        digest = config_digest(config)
        clash = sorted(e for e in self.masks if self.frozen_by.get(e, digest) != digest)
        if clash:
            old = self.configs.get(self.frozen_by[clash[0]], {})
            diff = ", ".join(
                f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
                for k in sorted(set(old) | set(config))
                if old.get(k) != config.get(k)
            )
            raise TableError(
                f"{self.path}: the keep-masks of epoch(s) {clash} were frozen by another configuration "
                f"({old}) than this run's ({config}); they differ in {diff}. Frozen masks are reused only "
                f"to resume the same run: to start a new run, give it another table_dir (or move "
                f"{self.path} aside for a fresh table); to resume, use the same configuration"
            )
        self.config = config
        self.configs[digest] = config
        self.frozen_by.update({e: digest for e in self.masks})

    # ---- persistence --------------------------------------------------------------------------
    def _sorted_masks(self) -> list[EpochMask]:
        return [self.masks[e] for e in sorted(self.masks)]

    def _header(self, payload_crc: int, payload_bytes: int) -> dict[str, Any]:
        if self.config is not None:  # masks added since `bind` were frozen by the bound run
            digest = config_digest(self.config)
            self.frozen_by.update({e: digest for e in self.masks if e not in self.frozen_by})
        stamps = {e: self.frozen_by.get(e) for e in self.masks}
        return {
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            "ema": self.ema,
            "epoch": self.epoch,
            "masks": [_mask_entry(m, stamps[m.epoch]) for m in self._sorted_masks()],
            "configs": {d: self.configs[d] for d in sorted({s for s in stamps.values() if s is not None})},
            "payload_crc": payload_crc,
            "payload_bytes": payload_bytes,
        }

    def _payload_parts(self) -> list[np.ndarray]:
        parts = [self.scores, self.updated]
        for m in self._sorted_masks():
            parts.append(m.keep)
            if m.boost is not None:
                parts.append(m.boost)
        return parts

    def save(self, path: Optional[str] = None) -> str:
        """Write atomically: temporary file in the same folder, fsync, rename, fsync the folder.

        Refuses (TableError) to replace a file another process wrote since this table last read or
        wrote it, so two jobs sharing a table never lose each other's scores silently. A failed
        write (disk full) raises OSError and leaves the old table in place.
        """
        path = path or self.path
        if path is None:
            raise ValueError("ScoreTable.save: no path given and the table was not loaded from one")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        parts = self._payload_parts()
        crc, size = 0, 0
        for p in parts:
            crc = _crc(p, crc)
            size += p.nbytes
        header = json.dumps(self._header(crc, size), sort_keys=True).encode()
        sized = struct.pack("<II", VERSION, len(header))
        header_crc = zlib.crc32(header, zlib.crc32(sized))
        seen = self._seen if self.path and os.path.abspath(path) == os.path.abspath(self.path) else None
        with _locked(folder):  # check-then-rename must not interleave with another writer's
            on_disk = _disk_header_crc(path)
            if on_disk is not None and on_disk not in (seen, header_crc):
                raise TableError(
                    f"{path} was written by another process after this one "
                    f"{'loaded it' if seen is not None else 'found no table there'}: saving now would "
                    "drop that process's scores. Two runs cannot share one table: give each its own table_dir"
                )
            fd, tmp = tempfile.mkstemp(prefix=".table-", suffix=".tmp", dir=folder)
            try:
                os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would lock out a shared group
                _write_all(fd, MAGIC + sized + struct.pack("<I", header_crc) + header)
                for p in parts:
                    _write_all(fd, np.ascontiguousarray(p).data.cast("B"))
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
            except BaseException as e:
                if fd >= 0:
                    os.close(fd)
                if os.path.exists(tmp):
                    os.unlink(tmp)
                if isinstance(e, OSError):
                    msg = f"cannot save the score table {path}: {e.strerror or e}; the previous table is unchanged"
                    raise OSError(*((e.errno, msg) if e.errno else (msg,))) from e
                raise
            _fsync_dir(folder)
        self.path, self._seen = path, header_crc
        return path

    @classmethod
    def load(cls, path: str, fingerprint: Optional[dict[str, Any]] = None) -> ScoreTable:
        """Map the table at ``path`` (copy-on-write: the file changes only on ``save``).

        Raises TableError naming the file and the problem if it is not a version-2 table, is
        truncated or corrupted anywhere (header included), or (when ``fingerprint`` is given)
        was made for another dataset. The file is never modified here.
        """
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            magic = prefix[:8]
            if magic == MAGIC_V1:
                raise TableError(
                    f"{path} is a version-1 table (its header has no checksum); this "
                    f"ted_stream reads version {VERSION} only: {MOVE_ASIDE}"
                )
            if magic != MAGIC[: len(magic)] or not magic:
                raise TableError(
                    f"{path} is not a ted_stream score table (starts with {magic!r}, expected {MAGIC!r}); {MOVE_ASIDE}"
                )
            if len(prefix) < _PREFIX.size:
                raise TableError(
                    f"{path} is truncated: {size} bytes, shorter than the {_PREFIX.size}-byte prefix; {MOVE_ASIDE}"
                )
            _, version, hlen, header_crc = _PREFIX.unpack(prefix)
            if version != VERSION:
                raise TableError(
                    f"{path} has table format version {version}; this ted_stream reads "
                    f"version {VERSION} only (a newer ted_stream, or a damaged file)"
                )
            if hlen > size - _PREFIX.size:  # checked before reading: a damaged length is no allocation
                raise TableError(
                    f"{path} is truncated or its header length is damaged: header needs "
                    f"{hlen} bytes, the file has {size - _PREFIX.size} after the prefix"
                )
            raw = f.read(hlen)
        if zlib.crc32(raw, zlib.crc32(prefix[8:16])) != header_crc:
            raise TableError(f"{path} is corrupted: header CRC mismatch; {MOVE_ASIDE}")
        header = _parse_header(path, raw)
        offset = _PREFIX.size + hlen
        expected = offset + header["payload_bytes"]
        if size != expected:
            raise TableError(f"{path} is truncated or has trailing bytes: {size} bytes on disk, header says {expected}")
        fp = header["fingerprint"]
        if fingerprint is not None and fp["digest"] != fingerprint["digest"]:
            raise TableError(
                f"{path} belongs to another dataset: table fingerprint {fp['digest'][:12]} "
                f"({fp.get('num_samples')} samples, {fp.get('num_shards')} shards) but this dataset is "
                f"{fingerprint['digest'][:12]} ({fingerprint.get('num_samples')} samples, "
                f"{fingerprint.get('num_shards')} shards); use another table_dir or delete the table"
            )
        n = header["num_samples"]
        mm = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(header["payload_bytes"],))
        crc = _crc(mm, 0)
        if crc != header["payload_crc"]:
            raise TableError(f"{path} is corrupted: payload CRC {crc:#010x}, header says {header['payload_crc']:#010x}")
        scores = mm[: 2 * n].view(np.uint16)
        updated = mm[2 * n : 3 * n]
        pos, nbits = 3 * n, (n + 7) // 8
        masks = {}
        for m in header["masks"]:
            keep = np.array(mm[pos : pos + nbits])
            pos += nbits
            boost = None
            if m["boost"]:
                boost = np.array(mm[pos : pos + nbits])
                pos += nbits
            masks[m["epoch"]] = EpochMask(
                m["epoch"], keep, boost, float(m["boost_weight"]), n, m["requested"], float(m.get("base_weight", 1.0))
            )
        table = cls(n, fp, header["ema"], scores, updated, masks, path)
        table.epoch = header["epoch"]
        table.frozen_by = {m["epoch"]: m["config"] for m in header["masks"] if m["config"] is not None}
        table.configs = header["configs"]
        table._seen = header_crc
        return table


def _mask_entry(m: EpochMask, config: Optional[str]) -> dict[str, Any]:
    entry = {
        "epoch": m.epoch,
        "boost": m.boost is not None,
        "boost_weight": m.boost_weight,
        "requested": m.requested,
        "config": config,
    }
    if m.base_weight != 1.0:  # written only when used: tables of earlier versions read unchanged
        entry["base_weight"] = m.base_weight
    return entry


def _parse_header(path: str, raw: bytes) -> dict[str, Any]:
    """The JSON header, every field type- and range-checked, or TableError naming the first problem."""

    def bad(problem: str) -> TableError:
        return TableError(f"{path} has a malformed header: {problem}; {MOVE_ASIDE}")

    def need(obj: Mapping[str, Any], key: str, kind: str, where: str = "") -> Any:
        if key not in obj:
            raise bad(f"{where}{key!r} is missing")
        v = obj[key]
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "bool": isinstance(v, bool),
            "str": isinstance(v, str),
            "dict": isinstance(v, dict),
            "list": isinstance(v, list),
            "int?": v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            "str?": v is None or isinstance(v, str),
        }[kind]
        if not ok:
            raise bad(f"{where}{key!r} = {v!r:.80} is not {_KINDS[kind]}")
        return v

    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise bad(f"expected a JSON object, got {type(header).__name__}")
    n = need(header, "num_samples", "int")
    if n < 1:
        raise bad(f"'num_samples' = {n} is not >= 1")
    if not isinstance(need(header, "fingerprint", "dict").get("digest"), str):
        raise bad("'fingerprint' has no string 'digest'")
    if not 0.0 < need(header, "ema", "number") <= 1.0:
        raise bad(f"'ema' = {header['ema']} is not in (0, 1]")
    need(header, "epoch", "int")
    configs = need(header, "configs", "dict")
    if not all(isinstance(c, dict) for c in configs.values()):
        raise bad("'configs' holds a non-object")
    nbits, payload, seen = (n + 7) // 8, 3 * n, set()
    for i, m in enumerate(need(header, "masks", "list")):
        where = f"masks[{i}]."
        if not isinstance(m, dict):
            raise bad(f"masks[{i}] is not an object")
        epoch = need(m, "epoch", "int", where)
        if epoch in seen:
            raise bad(f"epoch {epoch} has two masks")
        seen.add(epoch)
        payload += nbits * (2 if need(m, "boost", "bool", where) else 1)
        if need(m, "boost_weight", "number", where) <= 0:
            raise bad(f"{where}'boost_weight' = {m['boost_weight']} is not > 0")
        if "base_weight" in m and need(m, "base_weight", "number", where) <= 0:
            raise bad(f"{where}'base_weight' = {m['base_weight']} is not > 0")
        need(m, "requested", "int?", where)
        if need(m, "config", "str?", where) not in configs and m["config"] is not None:
            raise bad(f"{where}'config' = {m['config']!r} is not in 'configs'")
    crc = need(header, "payload_crc", "int")
    if crc >= 1 << 32:
        raise bad(f"'payload_crc' = {crc} is not a CRC-32")
    if need(header, "payload_bytes", "int") != payload:
        raise bad(f"'payload_bytes' = {header['payload_bytes']} but {n} samples and {len(seen)} masks take {payload}")
    return header


_KINDS = {
    "int": "an integer >= 0",
    "number": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "dict": "an object",
    "list": "a list",
    "int?": "null or an integer >= 0",
    "str?": "null or a string",
}


def _disk_header_crc(path: str) -> Optional[int]:
    """The header CRC of the table at ``path`` (a changed file has a changed one), None if absent."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
    except FileNotFoundError:
        return None
    return _PREFIX.unpack(prefix)[3] if len(prefix) == _PREFIX.size and prefix[:8] == MAGIC else -1


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """An exclusive flock on a folder: serialises writers on one host (NFS may not honour it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def current_umask() -> int:
    """The process umask (new files get 0o666 & ~umask, folders 0o777 & ~umask)."""
    try:  # read, not set: os.umask would change it for every thread for a moment
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def copy_atomic(src: str, dst: str) -> None:
    """Copy a table file to ``dst`` through a temporary file and a rename: a reader of ``dst``
    sees the old file or the new one, never a part."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp-{uuid.uuid4().hex}"  # not the pid: pids repeat across containers
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a full disk must not leave a partial copy behind
        raise


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view[:_WRITE_CHUNK])
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fsync_dir(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _crc(a: np.ndarray, crc: int) -> int:
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for start in range(0, len(flat), _CRC_CHUNK):
        crc = zlib.crc32(flat[start : start + _CRC_CHUNK].data, crc)
    return crc


def _unique_runs(ids: np.ndarray, values: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Split (ids, values) into rounds in which each id appears at most once, keeping order."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    occurrence = np.empty(len(ids), dtype=np.int64)
    occurrence[order] = np.arange(len(ids)) - group_start
    for r in range(int(occurrence.max(initial=0)) + 1):
        sel = occurrence == r
        yield ids[sel], values[sel]
