"""Block selection (TEDConfig.block): whole blocks of contiguous ids are kept or pruned, so a
shard-ordered dataset reads about the kept fraction of its shards."""

import numpy as np
import pytest

from ted_stream import TEDConfig
from ted_stream.policy import select
from ted_stream.table import ScoreTable, bf16_to_f32, f32_to_bf16

FP = {"digest": "b" * 64}


def table(n=10_000, scored=None, seed=0):
    t = ScoreTable(n, FP, ema=1.0)
    ids = np.arange(n) if scored is None else scored
    t.record(ids, np.random.default_rng(seed).normal(size=len(ids)))
    return t


def cfg(**kw):
    return TEDConfig(**{"target": 0.5, "warmup_epochs": 0, "ramp_epochs": 0, **kw})


def per_block(flags, b):
    """Whether every block is all kept or all pruned, and the blocks' kept flags."""
    pad = np.concatenate([flags, np.repeat(flags[-1:], -len(flags) % b)]).reshape(-1, b)
    return bool((pad.all(axis=1) | ~pad.any(axis=1)).all()), pad[:, 0]


@pytest.mark.parametrize("policy", ["ted", "random", "random-dynamic", "infobatch"])
def test_every_block_is_kept_or_pruned_whole(policy):
    m = select(cfg(policy=policy, block=100), table(), 0)
    whole, kept = per_block(m.bools(), 100)
    assert whole and 0 < kept.sum() < 100
    if policy != "infobatch":  # infobatch prunes a share of the below-mean blocks only
        assert kept.sum() == 50


def test_ted_prunes_the_lowest_block_means_without_exploration():
    t = table(n=10_050)  # a short last block
    m = select(cfg(block=100, explore=0.0, alpha=1.0, rescale=False), t, 0)
    whole, kept = per_block(m.bools(), 100)
    means = np.add.reduceat(bf16_to_f32(t.scores).astype(np.float64), np.arange(0, 10_050, 100))
    means /= np.diff(np.append(np.arange(0, 10_050, 100), 10_050))
    means = bf16_to_f32(f32_to_bf16(means))  # the precision blocks are ranked at, as scores are
    assert whole and kept.sum() == 51  # round(0.5 * 101) = 50 of the 101 blocks pruned
    assert means[~kept].max() <= means[kept].min()


def test_block_weights_follow_the_block_pool():
    m = select(cfg(block=100), table(), 0)
    w = m.weights(np.flatnonzero(m.bools()))
    assert set(np.unique(w)) <= {1.0, np.float32(m.boost_weight), np.float32(m.base_weight)}
    assert m.reweights and (w > 1.0).any()


def test_the_kept_count_is_rounded_up_to_the_granule_with_few_samples_restored():
    m = select(cfg(block=100), table(), 0, granule=64)
    keep = m.bools()
    assert m.kept % 64 == 0 and m.kept - 5000 < 64
    counts = keep.reshape(-1, 100).sum(axis=1)
    assert ((counts > 0) & (counts < 100)).sum() == 1  # one block, partly read


def test_a_block_with_an_unscored_sample_is_never_pruned():
    scored = np.delete(np.arange(10_000), np.arange(5, 10_000, 200))  # every other block has a hole
    m = select(cfg(block=100, target=0.4), table(scored=scored), 0)
    _, kept = per_block(m.bools(), 100)
    assert kept[::2].all() and kept.sum() == 60


def test_monotone_blocks_stay_pruned():
    t = table()
    c = cfg(block=100, target=0.3, ramp_epochs=3, monotone=True)
    for e in range(4):
        t.masks[e] = select(c, t, e)
        t.record(np.arange(10_000), np.random.default_rng(e + 5).normal(size=10_000))
    for e in range(1, 4):
        assert not (t.masks[e].bools() & ~t.masks[e - 1].bools()).any()


def test_groups_cannot_be_balanced_by_block():
    with pytest.raises(ValueError, match="block=100 cannot balance groups"):
        select(cfg(block=100), table(), 0, groups=np.zeros(10_000, dtype=np.int64))


def test_block_is_validated_and_joins_the_run_identity_only_when_set():
    with pytest.raises(ValueError, match=r"TEDConfig.block=-1 is invalid: expected an integer >= 0"):
        TEDConfig(block=-1)
    assert "block" not in TEDConfig().run_identity()
    assert TEDConfig(block=256).run_identity()["block"] == 256


def test_selection_is_a_pure_function():
    a, b = (select(cfg(block=64), table(), 3) for _ in range(2))
    assert a.crc == b.crc


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_simulated_shards_read_fall_with_the_pruned_fraction(fraction):
    """Shards of 250 samples in id order (a shard is read when any of its samples is kept): per
    sample, every shard is read; with block = samples per shard, the kept fraction (+ the granule's
    partly read shard)."""
    n, shard = 100_000, 250
    t = table(n=n)
    for block, most in ((0, 1.0), (shard, 1 - fraction + 0.1)):
        m = select(cfg(target=fraction, block=block), t, 0, granule=128)
        read = m.bools().reshape(-1, shard).any(axis=1).mean()
        assert read >= 0.99 if block == 0 else read <= most


def shard_starts(sizes):
    return np.cumsum(sizes) - sizes


def test_shard_blocks_follow_shards_of_any_size():
    """block="shard": one block per shard as the loader's index lays them out, whatever their
    sample counts; an empty shard (a repeated first id) is no block."""
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 400, 60)
    sizes[[7, 59]] = 0  # an empty shard inside and one at the end
    n = int(sizes.sum())
    starts = shard_starts(sizes)
    m = select(cfg(block="shard"), table(n=n), 0, shards=starts)
    keep = m.bools()
    real = sizes > 0
    per_shard = np.add.reduceat(keep.astype(np.int64), starts[real])
    assert ((per_shard == 0) | (per_shard == sizes[real])).all()  # every shard whole
    assert 0.3 < 1 - m.kept / n < 0.7 and 20 < (per_shard == 0).sum() < 40  # about half the shards
    # Shards of equal counts: the masks of block = samples per shard.
    equal = select(cfg(block="shard"), table(), 0, granule=64, shards=np.arange(0, 10_000, 250))
    assert equal.to_bytes().tobytes() == select(cfg(block=250), table(), 0, granule=64).to_bytes().tobytes()


def test_shard_blocks_need_the_shards_and_check_them():
    with pytest.raises(ValueError, match=r'block="shard" needs the shards\' first sample ids'):
        select(cfg(block="shard"), table(), 0)
    with pytest.raises(ValueError, match=r"first sample ids -5\.\.100: expected ids in \[0, 10000\]"):
        select(cfg(block="shard"), table(), 0, shards=np.array([-5, 100]))
    with pytest.raises(ValueError, match=r'TEDConfig.block=\'shards\' is invalid: expected an integer >= 0 .* or "shard"'):
        TEDConfig(block="shards")
    assert TEDConfig.from_dict({"block": "shard"}).run_identity()["block"] == "shard"


def test_shard_blocks_within_a_filter_keep_what_the_filter_kept_of_a_shard_whole():
    from ted_stream.policy import select_within

    sizes = np.full(40, 250)
    ids = np.flatnonzero(np.arange(10_000) % 3 != 0)  # a static filter's survivors
    ids = ids[(ids < 2_000) | (ids >= 2_500)]  # shards 8 and 9 filtered out whole
    m = select_within(cfg(block="shard"), table(), 0, ids, shards=shard_starts(sizes))
    keep = m.bools()
    assert not keep[np.setdiff1d(np.arange(10_000), ids)].any()
    kept_of_shard = keep.reshape(40, 250).sum(axis=1)
    survivors = np.isin(np.arange(10_000), ids).reshape(40, 250).sum(axis=1)
    assert ((kept_of_shard == 0) | (kept_of_shard == survivors)).all() and 10 < (kept_of_shard == 0).sum() < 30
