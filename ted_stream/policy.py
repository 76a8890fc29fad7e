"""Policies: turn a table snapshot into the frozen keep-mask of one epoch.

Every choice is a pure function of (table snapshot, epoch, config): the random draws are seeded
with (seed, epoch), and ties between equal scores are broken by the same draws.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Optional

import numpy as np

from .config import TEDConfig
from .mask import EpochMask
from .schedule import pruned_fraction
from .table import ScoreTable, bf16_order_key, bf16_to_f32, f32_to_bf16


class PruningWarning(UserWarning):
    """An epoch prunes less than its schedule asks, or its scores cannot choose what it prunes."""


def select(
    cfg: TEDConfig,
    table: ScoreTable,
    epoch: int,
    granule: int = 1,
    groups: Optional[np.ndarray] = None,
    shards: Optional[np.ndarray] = None,
) -> EpochMask:
    """Keep-mask for ``epoch``; the kept count is rounded up to a multiple of ``granule``
    (ranks x per-rank batch) where possible, so every rank gets the same number of full batches.

    ``groups`` (one integer per sample, e.g. its class) makes the ``ted`` policy prune the same
    fraction of every group's candidates, so pruning the easiest samples cannot shift the mix.
    ``shards``: each shard's first sample id, the blocks of ``TEDConfig.block="shard"`` (the
    loaders pass them; an empty shard's repeated id is allowed).

    Every step works on dense per-sample arrays in slices (no id lists, no sort, no shuffle), so
    a mask takes a few passes over memory and a transient of about 3.25 bytes per sample with the
    default ``ted`` policy (docs/scale.md).
    """
    n = table.num_samples
    if groups is not None and np.shape(groups) != (n,):
        raise ValueError(f"groups has shape {np.shape(groups)}: expected ({n},), one group per sample")
    fraction = pruned_fraction(cfg, epoch)
    if fraction == 0.0:
        return EpochMask.everything(epoch, n)
    starts = _block_starts(cfg, n, shards)
    if starts is not None:
        return _by_block(cfg, table, epoch, granule, groups, starts)
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


def _block_starts(cfg: TEDConfig, n: int, shards: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The first sample id of every block of ``cfg.block`` (None: per-sample selection)."""
    if cfg.block != "shard":
        return np.arange(0, n, int(cfg.block)) if int(cfg.block) > 1 else None
    if shards is None:
        raise ValueError(
            'TEDConfig.block="shard" needs the shards\' first sample ids: expected select(..., shards=...), '
            "which TEDStreamingDataset and TEDWebDataset pass from their shard index"
        )
    starts = np.unique(np.append(np.asarray(shards, dtype=np.int64), 0))
    if starts[0] < 0 or starts[-1] > n:
        raise ValueError(f"shards holds first sample ids {starts[0]}..{starts[-1]}: expected ids in [0, {n}]")
    return starts[starts < n]  # a trailing empty shard starts at n


def _by_block(
    cfg: TEDConfig, table: ScoreTable, epoch: int, granule: int, groups: Optional[np.ndarray], starts: np.ndarray
) -> EpochMask:
    """``select`` over blocks of contiguous ids starting at ``starts`` (``cfg.block`` ids each, the
    last one shorter, or one per shard), so that whole shard regions are kept or pruned. Each
    block is one sample of a table whose score is the mean of its samples' and which counts as
    scored only when every one of them is (no unscored sample is pruned); the block mask then
    covers its samples."""
    if groups is not None:
        raise ValueError(
            f"TEDConfig.block={cfg.block!r} cannot balance groups: a block of contiguous ids mixes them; "
            "expected block=0 with groups, or no groups"
        )
    n = table.num_samples
    sizes = np.diff(np.append(starts, n))
    sums = np.empty(len(starts), dtype=np.float64)
    updated = np.empty(len(starts), dtype=np.uint8)
    # Whole blocks per slice of about _CHUNK samples: no float copy of every score.
    cuts = np.unique(np.append(np.searchsorted(starts, np.arange(0, n, _CHUNK)), len(starts)))
    for i, j in zip(cuts[:-1], cuts[1:]):
        s, e = int(starts[i]), int(starts[j]) if j < len(starts) else n
        at = starts[i:j] - s
        sums[i:j] = np.add.reduceat(bf16_to_f32(table.scores[s:e]), at, dtype=np.float64)
        updated[i:j] = np.minimum.reduceat(table.updated[s:e], at)
    previous = _latest_mask_before(table, epoch)
    masks = {}
    if previous is not None:  # a block was pruned when none of its samples was kept (monotone)
        masks[previous.epoch] = EpochMask.from_bools(previous.epoch, np.add.reduceat(previous.bools(), starts) > 0)
    blocks = ScoreTable(len(starts), table.fingerprint, table.ema, f32_to_bf16(sums / sizes), updated, masks)
    blocks.epoch = table.epoch
    part = select(dataclasses.replace(cfg, block=0), blocks, epoch)
    keep = np.repeat(part.bools(), sizes)
    boost = part.boost_bools()
    # Every rank needs the same number of full batches: the kept count is rounded up to the
    # granule by keeping the first samples of pruned blocks, fewer than a granule in all.
    need = min(n, math.ceil(_count(keep) / granule) * granule) - _count(keep)
    for i in np.flatnonzero(~part.bools()):
        if need <= 0:
            break
        take = min(need, int(sizes[i]))
        keep[starts[i] : starts[i] + take] = True
        need -= take
    return EpochMask.from_bools(
        epoch,
        keep,
        None if boost is None else np.repeat(boost, sizes),
        part.boost_weight,
        base_weight=part.base_weight,
    )


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
    keys = _score_keys(table.scores)
    if k and (k >= count or _all_equal(keys, candidates)):
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
        drop = _lowest(keys, was_pruned, min(k, _count(was_pruned)), rng)
        candidates = candidates & ~drop
    k_new = k - _count(drop)
    n_top = round(cfg.trim_top * k_new)
    if n_top:
        top = _lowest(_score_keys(table.scores, invert=True), candidates, n_top, rng)
        drop |= top
        candidates &= ~top
        k_new -= _count(top)
    pool: Optional[np.ndarray] = None
    parts: list[tuple[np.ndarray, int]]
    if groups is None:
        parts = [(candidates, k_new)]
    else:
        labels = np.unique(groups[candidates])
        in_group = [candidates & (groups == g) for g in labels]  # O(n) per group: meant for classes
        parts = list(zip(in_group, (int(k) for k in _shares(k_new, np.array([_count(m) for m in in_group])))))
    rest, rest_drops = 0, 0  # candidates outside the pool, and how many alpha < 1 pruned there
    for members, k_part in parts:
        size = _count(members)
        part_pool = _lowest(keys, members, pool_size(int(k_part), size, cfg.explore), rng)
        k_pool = pool_share(int(k_part), _count(part_pool), size, cfg.alpha)
        _uniform_draw(part_pool, k_pool, rng, out=drop)
        if k_pool < k_part:  # alpha < 1: the rest of the part loses the remainder, at random
            _uniform_draw(members, int(k_part) - k_pool, rng, out=drop, exclude=part_pool)
        rest += size - _count(part_pool)
        rest_drops += int(k_part) - k_pool
        if pool is None:
            pool = part_pool
        else:
            pool |= part_pool
    assert pool is not None  # one part at least: the candidates, or one per group present
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


def _all_equal(keys: Keys, members: np.ndarray) -> bool:
    first = int(np.argmax(members))
    if not members[first]:
        return False
    key = keys(first, first + 1)[0]
    for s, e in _chunks(len(members)):
        other = keys(s, e) != key
        other &= members[s:e]
        if other.any():
            return False
    return True


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
    |group| / |kept| up to ``max_weight``; the other kept samples weigh ``base_weight``. Both
    arrays are overwritten."""
    dropped = bool(drop.any())
    keep = np.logical_not(drop, out=drop)  # drop and group are ours: no further 1e9-sample array
    size = _count(group)
    survivors = np.logical_and(group, keep, out=group)
    kept = _count(survivors)
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
    shards: Optional[np.ndarray] = None,
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
    # A shard's first id among ``ids`` (a shard the filter empties leaves a repeat, dropped).
    sub_shards = None if shards is None else np.searchsorted(ids, shards)
    part = select(cfg, sub, epoch, granule, None if groups is None else groups[ids], sub_shards)
    return part.expand(ids, table.num_samples)


Keys = Callable[[int, int], np.ndarray]
"""The 16-bit keys of samples [s, e), asked for in order, one whole pass at a time: no array of
every sample's key is held (2 bytes per sample, 2 GB at 1e9 samples)."""

_CHUNK = 1 << 18  # samples per step of a pass: its temporaries stay in cache; even (see _random_keys)
_WINDOW_SIGMAS = 8  # half-width of _uniform_draw's window around the expected cut, in standard deviations


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    return ((s, min(n, s + _CHUNK)) for s in range(0, n, _CHUNK))


def _score_keys(scores: np.ndarray, invert: bool = False) -> Keys:
    """Order keys of the bfloat16 ``scores`` (inverted: highest first)."""

    def keys(s: int, e: int) -> np.ndarray:
        key = bf16_order_key(scores[s:e])
        return np.invert(key, out=key) if invert else key

    return keys


def _random_keys(rng: np.random.Generator) -> Keys:
    """One draw of uniform 16-bit keys, drawn again at each pass from the generator's state now;
    every pass leaves the generator where the one draw would. Equal to one ``integers`` call over
    all samples because numpy draws 16-bit numbers two per 32-bit word and _CHUNK is even."""
    start = rng.bit_generator.state

    def keys(s: int, e: int) -> np.ndarray:
        if s == 0:
            rng.bit_generator.state = start
        return rng.integers(0, 1 << 16, size=e - s, dtype=np.uint16)

    return keys


def _inside(members: np.ndarray, exclude: Optional[np.ndarray], s: int, e: int) -> np.ndarray:
    return members[s:e] if exclude is None else members[s:e] & ~exclude[s:e]


def _add(out: Optional[np.ndarray], chosen: np.ndarray) -> np.ndarray:
    if out is None:
        return chosen
    out |= chosen
    return out


def _lowest(
    keys: Keys,
    members: np.ndarray,
    m: int,
    rng: np.random.Generator,
    out: Optional[np.ndarray] = None,
    exclude: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Boolean mask of the ``m`` samples in ``members`` but not ``exclude`` with the lowest keys,
    ties at the cut broken at random (or-ed into ``out`` if given). A histogram of the keys finds
    the cut, so the cost is two passes.

    Tie-breaking is a prefix of one permutation of the tied samples, so with the same keys and
    generator state a larger ``m`` chooses a superset of a smaller one."""
    n = len(members)
    if m <= 0:
        return _add(out, np.zeros(n, dtype=bool))
    everyone = exclude is None and bool(members.all())  # the common case: no masked gather before counting
    hist = np.zeros(1 << 16, dtype=np.int64)
    for s, e in _chunks(n):  # bincount widens its input to int64: count in slices that stay in cache
        part = keys(s, e)
        hist += np.bincount(part if everyone else part[_inside(members, exclude, s, e)], minlength=1 << 16)
    if m >= hist.sum():
        return _add(out, members.copy() if exclude is None else members & ~exclude)
    cut = int(np.searchsorted(np.cumsum(hist), m))  # the first key whose running count reaches m
    return _cut(keys, members, exclude, cut, m - int(hist[:cut].sum()), rng, out)


def _cut(
    keys: Keys,
    members: np.ndarray,
    exclude: Optional[np.ndarray],
    cut: int,
    ties: int,
    rng: np.random.Generator,
    out: Optional[np.ndarray],
) -> np.ndarray:
    """Members with key < cut, and ``ties`` of those with key == cut chosen at random."""
    chosen = np.zeros(len(members), dtype=bool) if out is None else out
    tied = []
    for s, e in _chunks(len(members)):
        key, inside = keys(s, e), _inside(members, exclude, s, e)
        below = key < cut
        below &= inside
        chosen[s:e] |= below
        at = key == cut
        at &= inside
        tied.append(np.flatnonzero(at) + s)
    chosen[rng.permutation(np.concatenate(tied))[:ties]] = True
    return chosen


def _uniform_draw(
    members: np.ndarray,
    m: int,
    rng: np.random.Generator,
    out: Optional[np.ndarray] = None,
    exclude: Optional[np.ndarray] = None,
) -> np.ndarray:
    """``m`` of ``members`` (but not ``exclude``) drawn uniformly, or-ed into ``out`` if given
    (which must hold none of them): the ``m`` lowest of uniform random keys (exactly what
    ``_lowest`` would choose from the same keys).

    Uniform keys put the cut near m / |members| of the key range, so one pass chooses every
    member below a window of ``_WINDOW_SIGMAS`` standard deviations around it and keeps the
    window's few members aside; the cut among those needs no second pass over the keys."""
    n = len(members)
    keys = _random_keys(rng)
    size = _count(members) if exclude is None else sum(_count(_inside(members, exclude, s, e)) for s, e in _chunks(n))
    if m <= 0:
        for s, e in _chunks(n):  # the generator moves past the draw all the same
            keys(s, e)
    if m <= 0 or m >= size:
        return _lowest(keys, members, m, rng, out, exclude)  # nothing or everything: no histogram is needed
    q = m / size
    width = _WINDOW_SIGMAS * math.sqrt(size * q * (1 - q)) / size * (1 << 16) + 2  # in keys
    lo, hi = max(0, int(q * (1 << 16) - width)), min(1 << 16, int(q * (1 << 16) + width) + 1)
    chosen = np.zeros(n, dtype=bool) if out is None else out
    below, at, near = 0, [], []  # members below the window; the window's members and their keys
    for s, e in _chunks(n):
        key, inside = keys(s, e), _inside(members, exclude, s, e)
        sure = key < lo
        sure &= inside
        below += int(np.count_nonzero(sure))
        chosen[s:e] |= sure
        window = np.greater_equal(key, lo, out=sure)
        window &= key < hi
        window &= inside
        where = np.flatnonzero(window)
        at.append(where + s)
        near.append(key[where])
    positions, window_keys = np.concatenate(at), np.concatenate(near)
    if not below < m <= below + len(positions):  # outside the window (1e-15 at 8 deviations)
        for s, e in _chunks(n):  # take back what the pass chose: out held none of these members
            key, inside = keys(s, e), _inside(members, exclude, s, e)
            sure = key < lo
            sure &= inside
            chosen[s:e] &= ~sure
        return _lowest(keys, members, m, rng, chosen, exclude)
    hist = np.bincount(window_keys - lo, minlength=hi - lo)
    cut = lo + int(np.searchsorted(np.cumsum(hist), m - below))
    chosen[positions[window_keys < cut]] = True
    # The generator now stands where a pass over every key leaves it, as for _cut's tie-break.
    tied = positions[window_keys == cut]
    chosen[rng.permutation(tied)[: m - below - int(hist[: cut - lo].sum())]] = True
    return chosen


def _rounded(k: int, n: int, k_max: int, granule: int) -> int:
    """Prune count after rounding the kept count n - k up to a multiple of ``granule``."""
    kept = min(n, math.ceil((n - min(k, k_max)) / granule) * granule)
    return max(0, n - kept)


def _latest_mask_before(table: ScoreTable, epoch: int) -> Optional[EpochMask]:
    earlier = [e for e in table.masks if e < epoch]
    return table.masks[max(earlier)] if earlier else None
