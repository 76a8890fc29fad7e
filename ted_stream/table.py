"""ScoreTable: the per-sample scores and keep-masks kept in one file beside the shards.

Resident cost per sample: 2 bytes of score (bfloat16: the range of float32, since squared
gradient norms overflow float16) and 1 byte holding the last epoch that scored it, plus one bit
per sample for each started epoch's keep-mask (and one more where that epoch up-weights samples).

File layout (little endian), written to a temporary file, fsynced and renamed over the old one:
    magic "TEDTABL1" | uint64 header length | JSON header | payload
    payload = scores uint16[n] | updated uint8[n] | per epoch: keep bits [, boost bits]
The header carries the dataset fingerprint and a CRC-32 of the payload. Nothing is pickled.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

MAGIC = b"TEDTABL1"
FILENAME = "table.tedt"
NEVER = 0  # value of `updated` for a sample that was never scored
_CRC_CHUNK = 1 << 24


class TableError(RuntimeError):
    """The table on disk cannot be used: mismatched dataset, truncated or corrupted file."""


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (nearest, ties to even), as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_order_key(b: np.ndarray) -> np.ndarray:
    """uint16 keys whose integer order is the float order of the bfloat16 bits."""
    key = np.array(b, dtype=np.uint16)  # a copy, flipped in place: few temporaries at 100M samples
    flip = key >> 15  # 1 for negative numbers
    flip *= 0x7FFF
    flip |= 0x8000  # negatives: every bit flips; positives: the sign bit only
    key ^= flip
    return key


@dataclass(frozen=True)
class EpochMask:
    """The frozen selection of one epoch: packed keep bits (little bit order), optional boost."""

    epoch: int
    keep: np.ndarray  # uint8[ceil(n/8)]
    boost: Optional[np.ndarray]  # uint8[ceil(n/8)] or None: kept samples whose loss is up-weighted
    boost_weight: float
    num_samples: int

    @property
    def kept(self) -> int:
        return int(np.unpackbits(self.keep, bitorder="little", count=self.num_samples).sum())

    @property
    def crc(self) -> int:
        crc = zlib.crc32(self.keep.tobytes())
        return zlib.crc32(self.boost.tobytes(), crc) if self.boost is not None else crc

    def keeps(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is kept, without unpacking the whole mask."""
        ids = np.asarray(ids, dtype=np.int64)
        return ((self.keep[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1).astype(bool)

    def weights(self, ids: np.ndarray) -> np.ndarray:
        """Loss weight of each of ``ids`` (1 unless boosted)."""
        ids = np.asarray(ids, dtype=np.int64)
        w = np.ones(len(ids), dtype=np.float32)
        if self.boost is not None:
            hit = ((self.boost[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1).astype(bool)
            w[hit] = self.boost_weight
        return w

    @classmethod
    def from_bools(cls, epoch: int, keep: np.ndarray, boost: Optional[np.ndarray] = None,
                   boost_weight: float = 1.0) -> "EpochMask":
        pack = lambda a: np.packbits(np.asarray(a, dtype=bool), bitorder="little")
        return cls(epoch, pack(keep), None if boost is None else pack(boost), float(boost_weight),
                   len(keep))


class ScoreTable:
    """Per-sample EMA scores, last-update epochs and frozen keep-masks of one dataset."""

    def __init__(self, num_samples: int, fingerprint: dict[str, Any], ema: float = 0.5,
                 scores: Optional[np.ndarray] = None, updated: Optional[np.ndarray] = None,
                 masks: Optional[dict[int, EpochMask]] = None, path: Optional[str] = None):
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

    # ---- scores -------------------------------------------------------------------------------
    def record(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Fold new per-sample values into the moving average; O(len(ids))."""
        ids, values = self.checked(ids, values)
        # Repeated ids in one call (upstream padding) are folded in order.
        for chunk_ids, chunk_vals in _unique_runs(ids, values):
            old = bf16_to_f32(self.scores[chunk_ids])
            fresh = self.updated[chunk_ids] == NEVER
            new = np.where(fresh, chunk_vals, (1.0 - self.ema) * old + self.ema * chunk_vals)
            self.scores[chunk_ids] = f32_to_bf16(new.astype(np.float32))
            self.updated[chunk_ids] = min(self.epoch + 1, 255)

    def checked(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, values) as flat int64/float32 arrays, or ValueError naming what is wrong."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if ids.shape != values.shape:
            raise ValueError(f"record: {len(ids)} ids but {len(values)} scores; expected one score per id")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"record: sample ids must lie in [0, {self.num_samples}); "
                             f"got min {ids.min()}, max {ids.max()}")
        if not np.isfinite(values).all():
            raise ValueError(f"record: scores must be finite; got {values[~np.isfinite(values)][:4]}")
        return ids, values

    def score_array(self) -> np.ndarray:
        return bf16_to_f32(self.scores)

    @property
    def scored(self) -> np.ndarray:
        return self.updated != NEVER

    # ---- persistence --------------------------------------------------------------------------
    def _header(self, payload_crc: int, payload_bytes: int) -> dict[str, Any]:
        return {
            "version": 1, "num_samples": self.num_samples, "fingerprint": self.fingerprint,
            "ema": self.ema, "epoch": self.epoch,
            "masks": [{"epoch": m.epoch, "boost": m.boost is not None,
                       "boost_weight": m.boost_weight} for m in self._sorted_masks()],
            "payload_crc": payload_crc, "payload_bytes": payload_bytes,
        }

    def _sorted_masks(self) -> list[EpochMask]:
        return [self.masks[e] for e in sorted(self.masks)]

    def _payload_parts(self) -> list[np.ndarray]:
        parts = [self.scores, self.updated]
        for m in self._sorted_masks():
            parts.append(m.keep)
            if m.boost is not None:
                parts.append(m.boost)
        return parts

    def save(self, path: Optional[str] = None) -> str:
        """Write atomically: temporary file in the same folder, fsync, rename, fsync the folder."""
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
        fd, tmp = tempfile.mkstemp(prefix=".table-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                for p in parts:
                    f.write(memoryview(np.ascontiguousarray(p)).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str, fingerprint: Optional[dict[str, Any]] = None) -> "ScoreTable":
        """Map the table at ``path`` (copy-on-write: the file changes only on ``save``).

        Raises TableError if the file is truncated, corrupted, or (when ``fingerprint`` is given)
        was made for another dataset. The file is never modified here.
        """
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise TableError(f"{path} is not a ted_stream score table (bad magic {head[:8]!r}, "
                                 f"expected {MAGIC!r}); move it aside to start a new table")
            (hlen,) = struct.unpack("<Q", head[8:])
            raw = f.read(hlen)
        if len(raw) < hlen:
            raise TableError(f"{path} is truncated: header needs {hlen} bytes, file has {size - 16}")
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise TableError(f"{path} has a corrupted header ({e})") from None
        offset = 16 + hlen
        expected = offset + header["payload_bytes"]
        if size != expected:
            raise TableError(f"{path} is truncated or has trailing bytes: {size} bytes on disk, "
                             f"header says {expected}")
        if fingerprint is not None and header["fingerprint"]["digest"] != fingerprint["digest"]:
            raise TableError(
                f"{path} belongs to another dataset: table fingerprint {header['fingerprint']['digest'][:12]} "
                f"({header['fingerprint'].get('num_samples')} samples, "
                f"{header['fingerprint'].get('num_shards')} shards) but this dataset is "
                f"{fingerprint['digest'][:12]} ({fingerprint.get('num_samples')} samples, "
                f"{fingerprint.get('num_shards')} shards); use another table_dir or delete the table")
        n = header["num_samples"]
        mm = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(header["payload_bytes"],))
        crc = _crc(mm, 0)
        if crc != header["payload_crc"]:
            raise TableError(f"{path} is corrupted: payload CRC {crc:#010x}, header says "
                             f"{header['payload_crc']:#010x}")
        scores = mm[: 2 * n].view(np.uint16)
        updated = mm[2 * n: 3 * n]
        pos, nbits = 3 * n, (n + 7) // 8
        masks = {}
        for m in header["masks"]:
            keep = np.array(mm[pos: pos + nbits])
            pos += nbits
            boost = None
            if m["boost"]:
                boost = np.array(mm[pos: pos + nbits])
                pos += nbits
            masks[m["epoch"]] = EpochMask(m["epoch"], keep, boost, m["boost_weight"], n)
        table = cls(n, header["fingerprint"], header["ema"], scores, updated, masks, path)
        table.epoch = header["epoch"]
        return table


def _crc(a: np.ndarray, crc: int) -> int:
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for start in range(0, len(flat), _CRC_CHUNK):
        crc = zlib.crc32(memoryview(flat[start:start + _CRC_CHUNK]), crc)
    return crc


def _unique_runs(ids: np.ndarray, values: np.ndarray):
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
