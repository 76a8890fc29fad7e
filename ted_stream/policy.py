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
from .mask import EpochMask
from .schedule import pruned_fraction
from .table import ScoreTable, bf16_order_key


class PruningWarning(UserWarning):
    """An epoch prunes less than its schedule asks, or its scores cannot choose what it prunes."""


def select(
    cfg: TEDConfig, table: ScoreTable, epoch: int, granule: int = 1, groups: Optional[np.ndarray] = None
) -> EpochMask:
    """Keep-mask for ``epoch``; the kept count is rounded up to a multiple of ``granule``
    (ranks x per-rank batch) where possible, so every rank gets the same number of full batches.

    ``groups`` (one integer per sample, e.g. its class) makes the ``ted`` policy prune the same
    fraction of every group's candidates, so pruning the easiest samples cannot shift the mix.

    Every step works on dense per-sample arrays (no id lists, no sort, no shuffle), so a mask of
    1e8 samples takes a few passes over memory and about a dozen bytes per sample.
    """
    n = table.num_samples
    if groups is not None and np.shape(groups) != (n,):
        raise ValueError(f"groups has shape {np.shape(groups)}: expected ({n},), one group per sample")
    fraction = pruned_fraction(cfg, epoch)
    if fraction == 0.0:
        return EpochMask.everything(epoch, n)
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.policy in ("random", "random-dynamic"):
        # The static draw is the same random keys in every epoch: a growing fraction prunes a
        # superset of what a smaller one pruned, so what is pruned stays pruned.
        draw = np.random.default_rng([cfg.seed]) if cfg.policy == "random" else rng
        k = _rounded(round(fraction * n), n, n, granule)
        drop = _uniform_draw(np.ones(n, dtype=bool), k, draw)
        # With rescale, the whole dataset is the pool: the same loss mass as the ted policy keeps.
        return _drop_and_boost(epoch, drop, np.ones(n, dtype=bool), cfg.max_weight if cfg.rescale else 1.0)
    if cfg.policy == "infobatch":
        scored = table.scored
        scores = table.score_array()
        below = scored & (scores < scores[scored].mean()) if scored.any() else np.zeros(n, dtype=bool)
        count = _count(below)
        k = _rounded(round(fraction * count), n, count, granule)
        return _drop_and_boost(epoch, _uniform_draw(below, k, rng), below, math.inf)
    return _ted(cfg, table, epoch, rng, round(fraction * n), granule, groups)


def _ted(
    cfg: TEDConfig,
    table: ScoreTable,
    epoch: int,
    rng: np.random.Generator,
    k: int,
    granule: int,
    groups: Optional[np.ndarray],
) -> EpochMask:
    n = table.num_samples
    candidates = table.scored  # never prune a sample that was never scored
    count = _count(candidates)
    if k > count:
        warnings.warn(
            f"epoch {epoch}: the schedule prunes {k} of {n} samples but only {count} "
            f"have a score, so only those can be pruned; record a score for every sample "
            f"(ids from batch['ted_id']) before start_epoch",
            PruningWarning,
            stacklevel=3,
        )
    k = _rounded(k, n, count, granule)
    key = bf16_order_key(table.scores)
    if k and (k >= count or _all_equal(key, candidates)):
        why = (
            "every scored sample is pruned, whatever its score"
            if k >= count
            else "every score is equal, so the pruned ones are a random draw"
        )
        warnings.warn(f"epoch {epoch}: the scores cannot choose what is pruned: {why}", PruningWarning, stacklevel=3)
    drop = np.zeros(n, dtype=bool)
    previous = _latest_mask_before(table, epoch)
    if cfg.monotone and previous is not None:
        was_pruned = candidates & ~previous.bools()
        drop = _lowest(key, was_pruned, min(k, _count(was_pruned)), rng)
        candidates = candidates & ~drop
    k_new = k - _count(drop)
    n_top = round(cfg.trim_top * k_new)
    if n_top:  # ~key is a full pass: only when trimming
        top = _lowest(~key, candidates, n_top, rng)
        drop |= top
        candidates &= ~top
        k_new -= _count(top)
    pool = None
    if groups is None:
        parts = [(candidates, k_new)]
    else:
        labels = np.unique(groups[candidates])
        members = [candidates & (groups == g) for g in labels]  # O(n) per group: meant for classes
        parts = list(zip(members, _shares(k_new, np.array([_count(m) for m in members]))))
    rest, rest_drops = 0, 0  # candidates outside the pool, and how many alpha < 1 pruned there
    for members, k_part in parts:
        size = _count(members)
        part_pool = _lowest(key, members, pool_size(int(k_part), size, cfg.explore), rng)
        k_pool = pool_share(int(k_part), _count(part_pool), size, cfg.alpha)
        drop |= _uniform_draw(part_pool, k_pool, rng)
        if k_pool < k_part:  # alpha < 1: the rest of the part loses the remainder, at random
            drop |= _uniform_draw(members & ~part_pool, int(k_part) - k_pool, rng)
        rest += size - _count(part_pool)
        rest_drops += int(k_part) - k_pool
        if pool is None:
            pool = part_pool
        else:
            pool |= part_pool
    if cfg.rescale:
        # Inverse inclusion probabilities per side: the pool's survivors carry the pool's mass,
        # the rest's survivors the rest's (unscored samples, never pruned, weigh as the rest).
        base = min(cfg.max_weight, rest / (rest - rest_drops)) if rest_drops else 1.0
        return _drop_and_boost(epoch, drop, pool, cfg.max_weight, base)
    return EpochMask.from_bools(epoch, np.logical_not(drop, out=drop))


def pool_share(k: int, pool: int, candidates: int, alpha: float) -> int:
    """How many of the ``k`` pruned samples come from the low-score pool of size ``pool``.

    alpha = 1 takes all of them from the pool; alpha = 0 takes the pool's proportional share
    (pool / candidates of them), so every candidate is pruned with the same probability: random
    pruning. In between, the pool is pruned alpha of the way from one to the other."""
    if alpha >= 1.0 or candidates == 0:
        return min(k, pool)
    share = round(k * (alpha + (1.0 - alpha) * pool / candidates))
    return max(k - (candidates - pool), min(share, pool, k))


def pool_size(k: int, candidates: int, explore: float) -> int:
    """Size of the low-score pool the ``k`` pruned samples are drawn from.

    k / (1 - explore) re-admits an ``explore`` share of the pool at random, so a sample pruned on
    a stale score gets trained and re-scored. The cap k + explore * (candidates - k) keeps at
    least (1 - explore) of the kept candidates above the pool, kept for their scores: without
    it, a target of 1 - explore or more would make the pool every candidate (random pruning)."""
    if k >= candidates:
        return candidates
    return min(math.ceil(k / (1.0 - explore)), k + math.floor(explore * (candidates - k)))


def _count(flags: np.ndarray) -> int:
    """True entries of a boolean array (a quarter of the time of ``sum``, which widens to int64)."""
    return int(np.count_nonzero(flags))


def _all_equal(key: np.ndarray, members: np.ndarray) -> bool:
    first = np.argmax(members)
    other = key != key[first]
    other &= members
    return bool(members[first]) and not other.any()


def _shares(total: int, counts: np.ndarray) -> np.ndarray:
    """``total`` split in proportion to ``counts`` (largest remainders; each share <= its count
    when total <= counts.sum())."""
    exact = total * counts / counts.sum()
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(shares - exact, kind="stable")[: total - int(shares.sum())]] += 1
    return shares


def _drop_and_boost(
    epoch: int, drop: np.ndarray, group: np.ndarray, max_weight: float, base_weight: float = 1.0
) -> EpochMask:
    """Drop ``drop``; the kept rest of ``group`` carries the group's mass, weighted
    |group| / |kept| up to ``max_weight``; the other kept samples weigh ``base_weight``."""
    dropped = bool(drop.any())
    keep = np.logical_not(drop, out=drop)  # drop is ours: no second 1e8-sample array
    survivors = group & keep
    size, kept = _count(group), _count(survivors)
    if not dropped or max_weight == 1.0:
        return EpochMask.from_bools(epoch, keep)
    if kept == 0:
        return EpochMask.from_bools(epoch, keep, base_weight=base_weight)
    return EpochMask.from_bools(epoch, keep, survivors, min(max_weight, size / kept), base_weight=base_weight)


def select_within(
    cfg: TEDConfig,
    table: ScoreTable,
    epoch: int,
    ids: np.ndarray,
    granule: int = 1,
    groups: Optional[np.ndarray] = None,
) -> EpochMask:
    """``select`` over the samples ``ids`` only (a static filter's survivors): the policy sees a
    table of those samples, renumbered, and the mask drops every sample outside them."""
    sub = ScoreTable(
        len(ids),
        table.fingerprint,
        table.ema,
        table.scores[ids],
        table.updated[ids],
        {e: m.restrict(ids) for e, m in table.masks.items() if e < epoch},
    )
    sub.epoch = table.epoch
    part = select(cfg, sub, epoch, granule, None if groups is None else groups[ids])
    return part.expand(ids, table.num_samples)


def _random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1 << 16, size=n, dtype=np.uint16)


_CHUNK = 1 << 18  # bincount widens its input to int64: count in slices that stay in cache


def _lowest(key: np.ndarray, members: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the ``m`` ``members`` with the lowest 16-bit ``key``, ties at the cut
    broken at random. A histogram of the keys finds the cut, so the cost is two passes.

    Tie-breaking is a prefix of one permutation of the tied samples, so with the same keys and
    generator state a larger ``m`` chooses a superset of a smaller one."""
    n = len(key)
    if m <= 0:
        return np.zeros(n, dtype=bool)
    everyone = bool(members.all())  # the common case: no masked gather before counting
    hist = np.zeros(1 << 16, dtype=np.int64)
    for s in range(0, n, _CHUNK):
        part = key[s : s + _CHUNK] if everyone else key[s : s + _CHUNK][members[s : s + _CHUNK]]
        hist += np.bincount(part, minlength=1 << 16)
    if m >= hist.sum():
        return members.copy()
    cut = int(np.searchsorted(np.cumsum(hist), m))  # the first key whose running count reaches m
    return _cut(key, members, cut, m - int(hist[:cut].sum()), rng)


def _cut(key: np.ndarray, members: np.ndarray, cut: int, ties: int, rng: np.random.Generator) -> np.ndarray:
    """Members with key < cut, and ``ties`` of those with key == cut chosen at random."""
    chosen = key < cut
    chosen &= members  # in place: every fresh 1e8-sample temporary costs page faults
    tied = key == cut
    tied &= members
    chosen[rng.permutation(np.flatnonzero(tied))[:ties]] = True
    return chosen


def _uniform_draw(members: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` of ``members`` drawn uniformly: the ``m`` lowest of uniform random keys (exactly what
    ``_lowest`` would choose from the same keys). Uniform keys put the cut near m / |members| of
    the key range, so only a window around it is counted, not the whole histogram."""
    key = _random_keys(rng, len(members))
    size = _count(members)
    if m <= 0 or m >= size:
        return _lowest(key, members, m, rng)  # nothing or everything: no histogram is needed
    q = m / size
    width = 8 * math.sqrt(size * q * (1 - q)) / size * (1 << 16) + 2  # 8 standard deviations, in keys
    lo, hi = max(0, int(q * (1 << 16) - width)), min(1 << 16, int(q * (1 << 16) + width) + 1)
    window = key < lo
    window &= members
    below = int(np.count_nonzero(window))
    np.greater_equal(key, lo, out=window)
    window &= key < hi
    window &= members
    hist = np.bincount(key[window] - lo, minlength=hi - lo)
    del window
    if not below < m <= below + hist.sum():  # outside 8 deviations: count everything
        return _lowest(key, members, m, rng)
    cut = lo + int(np.searchsorted(np.cumsum(hist), m - below))
    return _cut(key, members, cut, m - below - int(hist[: cut - lo].sum()), rng)


def _rounded(k: int, n: int, k_max: int, granule: int) -> int:
    """Prune count after rounding the kept count n - k up to a multiple of ``granule``."""
    kept = min(n, math.ceil((n - min(k, k_max)) / granule) * granule)
    return max(0, n - kept)


def _latest_mask_before(table: ScoreTable, epoch: int) -> Optional[EpochMask]:
    earlier = [e for e in table.masks if e < epoch]
    return table.masks[max(earlier)] if earlier else None
