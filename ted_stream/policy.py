"""Policies: turn a table snapshot into the frozen keep-mask of one epoch.

Every choice is a pure function of (table snapshot, epoch, config): the random draws are seeded
with (seed, epoch), and ties between equal scores are broken by the same draws.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from .config import TEDConfig
from .schedule import pruned_fraction
from .table import EpochMask, ScoreTable, bf16_order_key


class PruningWarning(UserWarning):
    """An epoch prunes less than its schedule asks, or its scores cannot choose what it prunes."""


def select(cfg: TEDConfig, table: ScoreTable, epoch: int, granule: int = 1,
           groups: Optional[np.ndarray] = None) -> EpochMask:
    """Keep-mask for ``epoch``; the kept count is rounded up to a multiple of ``granule``
    (ranks x per-rank batch) where possible, so every rank gets the same number of full batches.

    ``groups`` (one integer per sample, e.g. its class) makes the ``ted`` policy prune the same
    fraction of every group's candidates, so pruning the easiest samples cannot shift the mix.
    """
    n = table.num_samples
    if groups is not None and np.shape(groups) != (n,):
        raise ValueError(f"groups has shape {np.shape(groups)}: expected ({n},), one group per sample")
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
        drop = draw.permutation(n)[:k]
        # With rescale, the whole dataset is the pool: the same loss mass as the ted policy keeps.
        return _drop_and_boost(epoch, keep, None, drop, cfg.max_weight if cfg.rescale else 1.0)
    if cfg.policy == "infobatch":
        scored, scores = table.scored, table.score_array()
        below = np.flatnonzero(scored & (scores < scores[scored].mean())) if scored.any() else np.empty(0, np.int64)
        k = _rounded(round(fraction * len(below)), n, len(below), granule)
        return _drop_and_boost(epoch, keep, below, rng.choice(below, k, replace=False), math.inf)
    return _ted(cfg, table, epoch, keep, rng, round(fraction * n), granule, groups)


def _ted(cfg: TEDConfig, table: ScoreTable, epoch: int, keep: np.ndarray,
         rng: np.random.Generator, k: int, granule: int, groups: Optional[np.ndarray]) -> EpochMask:
    n = table.num_samples
    candidates = np.flatnonzero(table.scored)  # never prune a sample that was never scored
    if k > len(candidates):
        warnings.warn(f"epoch {epoch}: the schedule prunes {k} of {n} samples but only {len(candidates)} "
                      f"have a score, so only those can be pruned; record a score for every sample "
                      f"(ids from batch['ted_id']) before start_epoch", PruningWarning, stacklevel=3)
    k = _rounded(k, n, len(candidates), granule)
    if k and (k >= len(candidates) or _all_equal(table, candidates)):
        why = ("every scored sample is pruned, whatever its score" if k >= len(candidates)
               else "every score is equal, so the pruned ones are a random draw")
        warnings.warn(f"epoch {epoch}: the scores cannot choose what is pruned: {why}", PruningWarning, stacklevel=3)
    forced = np.empty(0, np.int64)
    previous = _latest_mask_before(table, epoch)
    if cfg.monotone and previous is not None:
        forced = candidates[~previous.keeps(candidates)]
        forced = _lowest(table, forced, rng, min(k, len(forced)))
        candidates = np.setdiff1d(candidates, forced, assume_unique=True)
    k_new = k - len(forced)
    top = _lowest(table, candidates, rng, round(cfg.trim_top * k_new), highest=True)
    if len(top):
        trimmed = np.zeros(n, dtype=bool)  # a scatter, not isin's sort: O(n) at 100M samples
        trimmed[top] = True
        candidates = candidates[~trimmed[candidates]]
    k_new -= len(top)
    if groups is None:
        pool, drop = _pool_and_drop(cfg, table, candidates, rng, k_new)
    else:
        # one stable sort splits the candidates by group: O(n log n), not O(n) per group
        by_group = candidates[np.argsort(groups[candidates], kind="stable")]
        counts = np.unique(groups[by_group], return_counts=True)[1]
        parts = [_pool_and_drop(cfg, table, ids, rng, int(k_g))
                 for ids, k_g in zip(np.split(by_group, np.cumsum(counts)[:-1]), _shares(k_new, counts))]
        pool = np.concatenate([p for p, _ in parts])
        drop = np.concatenate([d for _, d in parts])
    drop = np.concatenate([forced, top, drop])
    if cfg.rescale:
        return _drop_and_boost(epoch, keep, pool, drop, cfg.max_weight)
    keep[drop] = False
    return EpochMask.from_bools(epoch, keep)


def _pool_and_drop(cfg: TEDConfig, table: ScoreTable, candidates: np.ndarray, rng: np.random.Generator,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, drop): the lowest-scoring pool of ``candidates`` and the ``k`` of it pruned."""
    pool = _lowest(table, candidates, rng, pool_size(k, len(candidates), cfg.explore))
    rng.shuffle(pool)  # in place (the pool, or the candidates it may be, is ours): the first k go
    return pool, pool[:k]


def pool_size(k: int, candidates: int, explore: float) -> int:
    """Size of the low-score pool the ``k`` pruned samples are drawn from.

    k / (1 - explore) re-admits an ``explore`` share of the pool at random, so a sample pruned on
    a stale score gets trained and re-scored. The cap k + explore * (candidates - k) keeps at
    least (1 - explore) of the kept candidates above the pool, kept for their scores: without
    it, a target of 1 - explore or more would make the pool every candidate (random pruning)."""
    if k >= candidates:
        return candidates
    return min(math.ceil(k / (1.0 - explore)), k + math.floor(explore * (candidates - k)))


def _all_equal(table: ScoreTable, ids: np.ndarray) -> bool:
    scores = table.scores[ids]
    return bool(len(scores)) and bool((scores == scores[0]).all())


def _shares(total: int, counts: np.ndarray) -> np.ndarray:
    """``total`` split in proportion to ``counts`` (largest remainders; each share <= its count
    when total <= counts.sum())."""
    exact = total * counts / counts.sum()
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(shares - exact, kind="stable")[: total - int(shares.sum())]] += 1
    return shares


def _drop_and_boost(epoch: int, keep: np.ndarray, group: Optional[np.ndarray], drop: np.ndarray,
                    max_weight: float) -> EpochMask:
    """Drop ``drop``; the kept rest of ``group`` (None: every sample) carries its mass, weighted
    |group| / |kept| up to ``max_weight``."""
    keep[drop] = False
    size = len(keep) if group is None else len(group)
    survivors = int(keep.sum()) if group is None else int(keep[group].sum())
    if len(drop) == 0 or survivors == 0 or max_weight == 1.0:
        return EpochMask.from_bools(epoch, keep)
    if group is None:
        boost = keep
    else:
        boost = np.zeros(len(keep), dtype=bool)
        boost[group] = True
        boost &= keep
    return EpochMask.from_bools(epoch, keep, boost, min(max_weight, size / survivors))


def _lowest(table: ScoreTable, ids: np.ndarray, rng: np.random.Generator, m: int,
            highest: bool = False) -> np.ndarray:
    """The ``m`` of ``ids`` with the lowest (or highest) scores, ties broken at random; O(len(ids)).

    Keys are 32-bit (16 bits of bfloat16 order, 16 random bits) and the cut is a threshold, not
    an argpartition index array, so a 100M-sample selection stays near 20 bytes per sample."""
    if m >= len(ids):
        return ids
    if m == 0:
        return ids[:0]
    key = bf16_order_key(table.scores[ids])
    if highest:
        np.invert(key, out=key)
    key = key.astype(np.uint32)
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
