"""The sharded score merge's plan: who owns which ids, how records travel, what each rank moves.

Rank r owns the contiguous ids [bounds[r], bounds[r + 1]). At a merge, every rank sends each of
its (id, score) records to the owner of the id (an all-to-all: 32-bit ids while they fit, float32
scores); the owner folds them into its slice of the table in source-rank order (the order the
former all-gather folded them in, so the EMA is bit-identical) and sends the slice's changes, a
slice delta (its touched bits, their scores and one epoch byte), to the ranks that hold the whole
table (each node's leader, which writes the node's file, and rank 0, which freezes). Pure
functions: no collective here, so a simulation of a thousand ranks runs them in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .mask import pack, unpack

if TYPE_CHECKING:
    from .table import ScoreTable


def owner_bounds(num_samples: int, owners: int) -> np.ndarray:
    """int64[owners + 1]: owner r holds ids [bounds[r], bounds[r + 1]); sizes differ by at most one."""
    if num_samples < 1 or owners < 1:
        raise ValueError(f"owner_bounds({num_samples}, {owners}) is invalid: expected num_samples >= 1, owners >= 1")
    return np.arange(owners + 1, dtype=np.int64) * num_samples // owners


def id_dtype(num_samples: int) -> np.dtype:
    """A record's id type on the wire: 32 bits while every id fits (tables of at most 2**31 samples)."""
    return np.dtype(np.int32 if num_samples <= 2**31 else np.int64)


def route(
    ids: np.ndarray, values: np.ndarray, bounds: np.ndarray, num_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, float32 scores, counts): the records grouped by owner, ``counts[r]`` of them for owner r,
    each id's records in recording order; ids in their wire type (``id_dtype``)."""
    owner = np.searchsorted(bounds, ids, side="right") - 1
    order = np.argsort(owner, kind="stable")  # keeps each id's records in the order they were made
    counts = np.bincount(owner, minlength=len(bounds) - 1)
    return ids[order].astype(id_dtype(num_samples)), values[order].astype(np.float32), counts


def encode_delta(scores: np.ndarray, updated: np.ndarray, touched: np.ndarray) -> np.ndarray:
    """A slice's changes: its touched bits (packed), the touched samples' bfloat16 scores, then their
    last-update epoch once: a merge folds every touched sample in the same epoch, so it is one value.
    2 bytes per changed sample plus one bit per sample of the slice (and one byte)."""
    epochs = np.unique(updated[touched])
    if len(epochs) > 1:
        raise ValueError(f"a slice delta's touched samples were updated in epochs {epochs.tolist()}: expected one")
    return np.concatenate([pack(touched), scores[touched].view(np.uint8), epochs.astype(np.uint8)])


def decode_delta(data: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(touched, scores, updated) of a slice of ``size`` samples from ``encode_delta``'s bytes;
    ``updated`` is the touched samples' one last-update epoch."""
    nbits = (size + 7) // 8
    touched = unpack(data[:nbits], size)
    changed = int(np.count_nonzero(touched))
    expected = nbits + 2 * changed + (1 if changed else 0)
    if len(data) != expected:
        raise ValueError(
            f"a slice delta of {len(data)} bytes does not fit {size} samples with {changed} changed: "
            f"expected {expected}"
        )
    return touched, data[nbits : nbits + 2 * changed].view(np.uint16), int(data[-1]) if changed else 0


def fold_owned(table: ScoreTable, ids: np.ndarray, values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Fold the records an owner of ids [lo, hi) received, concatenated in source-rank order;
    returns the slice's touched bits. One ``record`` call folds each id's records in that order,
    the order in which the all-gather folded them one rank at a time: the EMA is bit-identical."""
    ids = ids.astype(np.int64)
    if len(ids) and (ids.min() < lo or ids.max() >= hi):
        raise ValueError(f"records for ids [{ids.min()}, {ids.max()}] reached the owner of [{lo}, {hi})")
    table.record(ids, values)
    touched = np.zeros(hi - lo, dtype=bool)
    touched[ids - lo] = True
    return touched


def apply_delta(table: ScoreTable, lo: int, hi: int, data: np.ndarray) -> None:
    """Write another owner's slice delta (ids [lo, hi)) into ``table``."""
    changed, scores, updated = decode_delta(data, hi - lo)
    table.scores[lo:hi][changed] = scores
    table.updated[lo:hi][changed] = updated


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank receives in one epoch's merge and freeze, by kind of rank."""

    allgather: int  # today's all-gather: every record of the epoch, on every rank
    owner: int  # a rank that holds no whole table: its slice's records (the mask it reads from the node's file)
    holder: int  # a node leader (or rank 0): its slice's records, every slice delta, the mask


def traffic(num_samples: int, ranks: int, records: int, changed: int, mask_bytes: int) -> Traffic:
    """The merge's bytes received per rank, for ``records`` records of the epoch spread evenly over
    the ranks and ids, of which ``changed`` distinct samples; ``mask_bytes`` the frozen mask's size."""
    width = id_dtype(num_samples).itemsize + 4
    sizes = 2 * 8 * ranks  # every rank's byte count, exchanged before the deltas and before the mask
    own = width * -(-records // ranks) + sizes
    deltas = (num_samples + 7) // 8 + 2 * changed + ranks
    return Traffic(allgather=width * records, owner=own, holder=own + deltas + mask_bytes)
