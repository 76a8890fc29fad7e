"""Policies: turn a table snapshot into the frozen keep-mask of one epoch.

Every choice is a pure function of (table snapshot, epoch, config): the random draws are seeded
with (seed, epoch), and ties between equal scores are broken by the same draws.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .config import TEDConfig
from .schedule import pruned_fraction
from .table import EpochMask, ScoreTable, bf16_order_key


def select(cfg: TEDConfig, table: ScoreTable, epoch: int, granule: int = 1) -> EpochMask:
    """Keep-mask for ``epoch``; the kept count is rounded up to a multiple of ``granule``
    (ranks x per-rank batch) where possible, so every rank gets the same number of full batches."""
    n = table.num_samples
    keep = np.ones(n, dtype=bool)
    fraction = pruned_fraction(cfg, epoch)
    if fraction == 0.0:
        return EpochMask.from_bools(epoch, keep)
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.policy in ("random", "random-dynamic"):
        # The static draw is one permutation for the whole run: a growing fraction prunes a
        # growing prefix of it, so what is pruned stays pruned.
        draw = np.random.default_rng([cfg.seed]) if cfg.policy == "random" else rng
        k = _rounded(round(fraction * n), n, n, granule)
        keep[draw.permutation(n)[:k]] = False
        return EpochMask.from_bools(epoch, keep)
    if cfg.policy == "infobatch":
        scored, scores = table.scored, table.score_array()
        below = np.flatnonzero(scored & (scores < scores[scored].mean())) if scored.any() else np.empty(0, np.int64)
        k = _rounded(round(fraction * len(below)), n, len(below), granule)
        return _drop_and_boost(epoch, keep, below, rng.choice(below, k, replace=False), math.inf)
    return _ted(cfg, table, epoch, keep, rng, round(fraction * n), granule)


def _ted(cfg: TEDConfig, table: ScoreTable, epoch: int, keep: np.ndarray,
         rng: np.random.Generator, k: int, granule: int) -> EpochMask:
    n = table.num_samples
    candidates = np.flatnonzero(table.scored)  # never prune a sample that was never scored
    k = _rounded(k, n, len(candidates), granule)
    forced = np.empty(0, np.int64)
    previous = _latest_mask_before(table, epoch)
    if cfg.monotone and previous is not None:
        forced = candidates[~previous.keeps(candidates)]
        forced = _lowest(table, forced, rng, min(k, len(forced)))
        candidates = np.setdiff1d(candidates, forced, assume_unique=True)
    k_new = k - len(forced)
    # Explore: the pool of lowest scores is larger than what is pruned, and a random part of
    # it is re-admitted, so a sample pruned on a stale score gets trained and re-scored.
    pool_size = min(len(candidates), math.ceil(k_new / (1.0 - cfg.explore)))
    pool = _lowest(table, candidates, rng, pool_size)
    rng.shuffle(pool)  # in place (the pool is ours): the first k_new of it go
    drop = pool[:k_new]
    if cfg.rescale:
        return _drop_and_boost(epoch, keep, pool, np.concatenate([forced, drop]), cfg.max_weight)
    keep[forced] = False
    keep[drop] = False
    return EpochMask.from_bools(epoch, keep)


def _drop_and_boost(epoch: int, keep: np.ndarray, group: np.ndarray, drop: np.ndarray,
                    max_weight: float) -> EpochMask:
    """Drop ``drop``; the kept rest of ``group`` carries its mass, weighted |group| / |kept|."""
    keep[drop] = False
    survivors = int(keep[group].sum())
    if len(drop) == 0 or survivors == 0:
        return EpochMask.from_bools(epoch, keep)
    boost = np.zeros(len(keep), dtype=bool)
    boost[group] = True
    boost &= keep
    return EpochMask.from_bools(epoch, keep, boost, min(max_weight, len(group) / survivors))


def _lowest(table: ScoreTable, ids: np.ndarray, rng: np.random.Generator, m: int) -> np.ndarray:
    """The ``m`` of ``ids`` with the lowest scores, ties broken at random; O(len(ids)).

    Keys are 32-bit (16 bits of bfloat16 order, 16 random bits) and the cut is a threshold, not
    an argpartition index array, so a 100M-sample selection stays near 20 bytes per sample."""
    if m >= len(ids):
        return ids
    if m == 0:
        return ids[:0]
    key = bf16_order_key(table.scores[ids]).astype(np.uint32)
    key <<= np.uint32(16)
    key |= rng.integers(0, 1 << 16, size=len(ids), dtype=np.uint32)
    kth = np.partition(key, m - 1)[m - 1]
    chosen = key < kth
    chosen[np.flatnonzero(key == kth)[: m - int(chosen.sum())]] = True
    del key
    return ids[chosen]


def _rounded(k: int, n: int, k_max: int, granule: int) -> int:
    """Prune count after rounding the kept count n - k up to a multiple of ``granule``."""
    kept = min(n, math.ceil((n - min(k, k_max)) / granule) * granule)
    return max(0, n - kept)


def _latest_mask_before(table: ScoreTable, epoch: int) -> Optional[EpochMask]:
    earlier = [e for e in table.masks if e < epoch]
    return table.masks[max(earlier)] if earlier else None
