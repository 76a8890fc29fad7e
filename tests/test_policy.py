import functools
import warnings

import numpy as np
import pytest

from ted_stream import TEDConfig as _TEDConfig
from ted_stream.policy import PruningWarning, pool_size, select
from ted_stream.table import ScoreTable, f32_to_bf16

FP = {"digest": "c" * 64}
# These tests pin the pool rule (alpha = 1) and the draws the quality grids made with it; the
# default alpha and the family between random and the pool are tested on their own below.
TEDConfig = functools.partial(_TEDConfig, alpha=1.0)


def table(n=1000, scored=None, seed=0):
    t = ScoreTable(n, FP, ema=1.0)
    ids = np.arange(n) if scored is None else scored
    t.record(ids, np.random.default_rng(seed).normal(size=len(ids)))
    return t


def unpack(mask):
    return np.unpackbits(mask.keep, bitorder="little", count=mask.num_samples).astype(bool)


def test_warmup_keeps_everything():
    m = select(TEDConfig(target=0.5, warmup_epochs=2), table(), 1)
    assert m.kept == 1000 and m.boost is None


def test_ted_prunes_exactly_the_lowest_scores_without_exploration():
    t = table()
    m = select(TEDConfig(target=0.3, warmup_epochs=1, ramp_epochs=0, explore=0.0), t, 1)
    keep = unpack(m)
    assert m.kept == 700
    assert t.score_array()[~keep].max() <= t.score_array()[keep].min()


def test_ties_are_cut_exactly_and_broken_at_random():
    """Many equal scores straddle the cut: exactly the wanted count goes, the lower scores all
    go, and which of the tied samples go changes with the epoch and is spread over the ids."""
    t = ScoreTable(4000, FP, ema=1.0)
    scores = np.ones(4000)
    scores[:500] = -1.0  # clearly lowest: always pruned
    t.record(np.arange(4000), scores)
    cfg = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, explore=0.0)
    pruned = [~unpack(select(cfg, t, e)) for e in (0, 1)]
    for p in pruned:
        assert p.sum() == 2000 and p[:500].all()
        tied = np.flatnonzero(p[500:]) + 500  # 1500 of the 3500 tied samples
        assert abs(np.mean(tied < 2250) - 0.5) < 0.05  # not the lowest ids first
    assert (pruned[0] != pruned[1]).any()


def test_ted_never_prunes_unscored_samples():
    t = table(scored=np.arange(0, 1000, 2))
    with pytest.warns(PruningWarning, match="only 500 have a score"):
        m = select(TEDConfig(target=0.6, warmup_epochs=0, ramp_epochs=0), t, 0)
    keep = unpack(m)
    assert keep[1::2].all()
    assert m.kept == 500  # only 500 scored samples can be pruned


def test_exploration_readmits_some_low_scores():
    t = table()
    m = select(TEDConfig(target=0.3, warmup_epochs=0, ramp_epochs=0, explore=0.25), t, 0)
    keep = unpack(m)
    order = np.argsort(t.score_array())
    assert m.kept == 700
    assert keep[order[:300]].sum() > 0  # some of the 300 lowest come back
    scores = t.score_array()  # bfloat16 values: equal scores at the pool's edge are a random pick
    assert keep[scores > scores[order[399]]].all()  # pool is 300 / 0.75 = 400 lowest


def test_mask_is_a_pure_function_of_snapshot_epoch_seed():
    cfg = TEDConfig(target=0.4, warmup_epochs=0, ramp_epochs=0, explore=0.2)
    a, b = select(cfg, table(), 3), select(cfg, table(), 3)
    assert a.crc == b.crc
    assert select(cfg, table(), 4).crc != a.crc
    assert select(TEDConfig(**{**cfg.to_dict(), "seed": 1}), table(), 3).crc != a.crc


def test_kept_count_rounded_up_to_granule():
    m = select(TEDConfig(target=0.33, warmup_epochs=0, ramp_epochs=0), table(1000), 0, granule=64)
    assert m.kept % 64 == 0 and m.kept >= 670


def test_monotone_keeps_pruned_samples_out():
    cfg = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=3, ramp="linear", monotone=True, explore=0.0)
    t = table()
    t.masks[0] = select(cfg, t, 0)
    t.record(np.arange(1000), np.random.default_rng(9).normal(size=1000))  # scores reshuffle
    m1 = select(cfg, t, 1)
    assert not (unpack(m1) & ~unpack(t.masks[0])).any()
    assert m1.kept < t.masks[0].kept


def test_random_static_is_nested_and_dynamic_redraws():
    t = table()
    static = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=2, ramp="linear", policy="random")
    e0, e1 = unpack(select(static, t, 0)), unpack(select(static, t, 1))
    assert e0.sum() == 750 and e1.sum() == 500 and not (e1 & ~e0).any()
    # 300k samples on 2^16 random keys: every cut falls inside a bucket of tied keys
    n = 300_000
    big = ScoreTable(n, FP)
    ramp = TEDConfig(target=0.6, warmup_epochs=0, ramp_epochs=4, ramp="linear", policy="random")
    masks = [unpack(select(ramp, big, e)) for e in range(4)]
    assert [int(m.sum()) for m in masks] == [n - round(n * 0.6 * (e + 1) / 4) for e in range(4)]
    assert all(not (later & ~earlier).any() for earlier, later in zip(masks, masks[1:]))
    dyn = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, policy="random-dynamic")
    d1, d2 = unpack(select(dyn, t, 1)), unpack(select(dyn, t, 2))
    assert d1.sum() == d2.sum() == 500 and (d1 != d2).any()


def test_infobatch_prunes_below_mean_and_reweights():
    t = table()
    m = select(TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, policy="infobatch"), t, 0)
    keep, s = unpack(m), t.score_array()
    below = s < s.mean()
    assert keep[~below].all()
    assert (~keep).sum() == round(0.5 * below.sum())
    boosted = np.unpackbits(m.boost, bitorder="little", count=1000).astype(bool)
    assert (boosted == (below & keep)).all()
    assert m.boost_weight == pytest.approx(below.sum() / (below & keep).sum())


def test_ted_rescale_weight_is_capped():
    cfg = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, explore=0.5, rescale=True, max_weight=1.5)
    m = select(cfg, table(), 0)
    assert m.boost is not None and m.boost_weight == 1.5


def test_groups_prune_the_same_fraction_of_each_group_and_its_lowest_scores():
    """Group 0's scores are all lower than group 1's: ungrouped selection prunes group 0 only,
    grouped selection prunes 40% of each (to the sample), and inside a group the lowest go."""
    n = 1000
    groups = np.repeat([0, 1, 2], [500, 300, 200])
    t = ScoreTable(n, FP, ema=1.0)
    scores = np.random.default_rng(0).random(n) + groups  # group g scores in [g, g + 1)
    t.record(np.arange(n), scores)
    cfg = TEDConfig(target=0.4, warmup_epochs=0, ramp_epochs=0, explore=0.0, rescale=False)
    plain = ~unpack(select(cfg, t, 0))
    assert plain.sum() == 400 and not plain[groups != 0].any()
    pruned = ~unpack(select(cfg, t, 0, groups=groups))
    assert [int(pruned[groups == g].sum()) for g in (0, 1, 2)] == [200, 120, 80]
    stored = t.score_array()  # bfloat16: ties at the cut go either way
    for g in (0, 1, 2):
        inside = groups == g
        assert stored[inside & pruned].max() <= stored[inside & ~pruned].min()


def test_groups_with_exploration_and_rescaling_keep_the_counts_exact():
    n = 997  # shares that do not divide evenly
    groups = np.random.default_rng(1).integers(0, 7, n)
    cfg = TEDConfig(target=0.35, warmup_epochs=0, ramp_epochs=0, explore=0.5)
    m = select(cfg, table(n), 0, granule=8, groups=groups)
    assert m.kept % 8 == 0 and m.boost is not None
    pruned = ~unpack(m)
    for g in range(7):
        expected = (n - m.kept) * (groups == g).sum() / n
        assert abs(pruned[groups == g].sum() - expected) < 1.0


def test_groups_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"groups has shape \(10,\): expected \(1000,\)"):
        select(TEDConfig(target=0.3, warmup_epochs=0), table(), 0, groups=np.zeros(10, int))


def test_pool_is_capped_so_scores_always_decide():
    assert pool_size(10, 100, 0.5) == 20  # below the cap: pruned / (1 - explore)
    assert pool_size(50, 100, 0.5) == 75  # capped: 50 + 0.5 * 50, not all 100
    assert pool_size(70, 100, 0.5) == 85
    assert pool_size(100, 100, 0.5) == 100


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_default_explore_keeps_the_scores_in_charge_at_high_targets(target):
    """The default (explore 0.5) used to make the pool every sample at target >= 0.5, which is
    random pruning. Now at least half of the kept samples are the highest scores."""
    t = table(4000)
    cfg = TEDConfig(target=target, warmup_epochs=0, ramp_epochs=0)
    ted = unpack(select(cfg, t, 0))
    rand = unpack(select(TEDConfig(**{**cfg.to_dict(), "policy": "random-dynamic"}), t, 0))
    assert ted.sum() == rand.sum() == 4000 - round(target * 4000)
    assert (ted != rand).mean() > 0.2
    kept = ted.sum()
    top = np.argsort(t.score_array())[-int(0.45 * kept):]  # (1 - explore) of the kept, less bf16 ties
    assert ted[top].all()
    assert not rand[top].all()


def test_trim_top_prunes_that_share_from_the_highest_scores():
    t = table()
    m = select(TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, explore=0.0, trim_top=0.2), t, 0)
    keep, scores = unpack(m), t.score_array()
    high = scores > np.median(scores)
    assert m.kept == 500
    assert (~keep & high).sum() == 100  # 20% of the 500 pruned: the 100 highest (bf16 ties either way)
    assert scores[~keep & high].min() >= scores[keep].max()
    assert scores[~keep & ~high].max() <= scores[keep].min()  # the other 400: the lowest


@pytest.mark.parametrize("policy", ["random", "random-dynamic"])
def test_random_policies_rescale_like_ted_when_asked(policy):
    cfg = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, policy=policy, max_weight=3.0)
    m = select(cfg, table(), 0)
    keep = unpack(m)
    assert (m.weights(np.flatnonzero(keep)) == 2.0).all()  # n / kept: the loss mass of all data
    plain = select(TEDConfig(**{**cfg.to_dict(), "rescale": False}), table(), 0)
    assert plain.boost is None and (unpack(plain) == keep).all()  # same draw, weight 1


def test_warns_when_too_few_samples_are_scored_and_not_otherwise():
    cfg = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0)
    with pytest.warns(PruningWarning, match="only 300 have a score"):
        select(cfg, table(scored=np.arange(300)), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(cfg, table(), 0)


@pytest.mark.parametrize("size,m", [(50_000, 1), (50_000, 17_000), (300_000, 299_999), (1_000, 500)])
def test_uniform_draw_is_the_lowest_random_keys_found_through_a_window(size, m):
    """The windowed count chooses exactly what a full histogram of the same keys chooses."""
    from ted_stream.policy import _lowest, _random_keys, _uniform_draw

    members = np.random.default_rng(size).random(size + 1000) < 0.9
    size = int(members.sum())
    m = min(m, size - 1)
    fast = _uniform_draw(members, m, np.random.default_rng(7))
    slow_rng = np.random.default_rng(7)
    slow = _lowest(_random_keys(slow_rng), members, m, slow_rng)
    assert fast.sum() == m and not (fast & ~members).any()
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("chunk, sigmas", [(None, None), (1 << 10, None), (None, 0)])
def test_masks_are_the_draws_the_quality_evidence_used(chunk, sigmas, monkeypatch):
    """The quality grids in docs/quality.md were trained with exactly these masks: a change to the
    selection that draws different ones (even from the same distribution) fails here, and must
    come with re-run grids and a new digest. A pass in slices of 1,024 samples (98 of them, where
    the default slice holds every sample) draws the same: the masks of 1e9 samples, made in
    slices, are the ones the whole-array code drew. So does a uniform draw whose window misses
    the cut (0 deviations wide: it takes back what its pass chose and counts every key)."""
    from ted_stream import policy

    if chunk is not None:
        monkeypatch.setattr(policy, "_CHUNK", chunk)
    if sigmas is not None:
        monkeypatch.setattr(policy, "_WINDOW_SIGMAS", sigmas)
        missed = []
        real_lowest = policy._lowest
        monkeypatch.setattr(policy, "_lowest", lambda *a, **kw: missed.append(1) or real_lowest(*a, **kw))
    import hashlib
    import itertools
    import warnings

    n = 100_003
    rng = np.random.default_rng(11)
    t = ScoreTable(n, {"digest": "0" * 64, "num_samples": n})
    t.scores[:] = f32_to_bf16(np.round(rng.standard_normal(n) * 40).astype(np.float32))  # many ties
    t.updated[:] = 1
    t.updated[::37] = 0  # never scored: never pruned by ted
    groups = rng.integers(0, 5, n)
    digest = hashlib.sha256()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        for policy, target, explore, trim in itertools.product(("ted", "random", "random-dynamic", "infobatch"),
                                                              (0.3, 0.7), (0.1, 0.5), (0.0, 0.2)):
            cfg = TEDConfig(policy=policy, target=target, explore=explore, trim_top=trim, warmup_epochs=0,
                            ramp_epochs=0, seed=4)
            for g in (None, groups) if policy == "ted" else (None,):
                m = select(cfg, t, 2, granule=8, groups=g)
                digest.update(m.keep.tobytes() + (b"" if m.boost is None else m.boost.tobytes())
                              + repr(m.boost_weight).encode())
    assert digest.hexdigest() == "fc9ef4925e72726db69653a90349c6050730b05002e00fa09bf825d14580ca7b"
    if sigmas is not None:
        assert len(missed) > 100  # 56 calls (pools, trims) at 8 deviations: here some 70 windows missed


# ---- alpha: a family from random pruning at the same loss scale (0) to pool-only pruning (1) ----
def _alpha_masks(alpha, epochs, n=2000, target=0.5):
    t = table(n, seed=3)
    cfg = TEDConfig(target=target, warmup_epochs=0, ramp_epochs=0, alpha=alpha, seed=9)
    return t, [select(cfg, t, e) for e in range(epochs)]


def test_alpha_zero_is_random_pruning_at_the_same_loss_scale():
    """alpha = 0: every sample is pruned with the same probability, whatever its score, and every
    kept sample weighs n / kept, as random-dynamic with rescale does."""
    n, epochs = 2000, 300
    t, masks = _alpha_masks(0.0, epochs, n)
    kept = np.array([m.bools() for m in masks])
    assert (kept.sum(1) == n // 2).all()
    order = np.argsort(t.score_array())
    low, high = kept[:, order[: n // 4]].mean(), kept[:, order[-n // 4:]].mean()
    se = np.sqrt(0.25 / (epochs * n / 4))
    assert abs(low - high) < 5 * se * np.sqrt(2)  # the score does not change who is kept
    random = select(TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0, policy="random-dynamic", seed=9), t, 0)
    for m in masks[:5]:
        w = m.weights(np.flatnonzero(m.bools()))
        np.testing.assert_allclose(w, random.weights(np.flatnonzero(random.bools())).mean(), rtol=2e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_alpha_weights_keep_the_loss_mass(alpha):
    """Inverse inclusion probabilities per side: the kept weights sum to n in every epoch, and the
    weighted loss of the kept samples is an unbiased estimate of the full loss."""
    n, epochs = 2000, 200
    t, masks = _alpha_masks(alpha, epochs, n)
    losses = np.random.default_rng(1).gamma(2.0, size=n) + (t.score_array() > 0)  # loss tied to score
    totals = []
    for m in masks:
        ids = np.flatnonzero(m.bools())
        w = m.weights(ids).astype(np.float64)
        assert w.sum() == pytest.approx(n, rel=1e-6)
        totals.append((w * losses[ids]).sum())
    se = np.std(totals) / np.sqrt(epochs)
    assert abs(np.mean(totals) - losses.sum()) < 5 * se + 1e-9 * losses.sum()


def test_alpha_moves_the_pruned_set_towards_low_scores():
    """The score decides how far a mask departs from random: the mean score of the pruned samples
    falls as alpha grows, from the dataset mean (alpha 0) to the pool's (alpha 1)."""
    means = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        t, masks = _alpha_masks(alpha, 40)
        s = t.score_array()
        means.append(np.mean([s[~m.bools()].mean() for m in masks]))
    assert all(a > b for a, b in zip(means, means[1:]))
    assert abs(means[0] - s.mean()) < 0.05


def test_alpha_one_draws_what_the_rule_before_it_drew():
    t = table(5000, seed=2)
    base = TEDConfig(target=0.6, warmup_epochs=0, ramp_epochs=0, seed=1)
    a = select(base, t, 3)
    b = select(TEDConfig(**{**base.to_dict(), "alpha": 1.0}), t, 3)
    assert a.crc == b.crc and a.base_weight == b.base_weight == 1.0
    assert "alpha" not in base.run_identity()  # tables frozen before alpha existed keep their identity
    assert TEDConfig(alpha=0.5).run_identity()["alpha"] == 0.5


@pytest.mark.parametrize("k,pool,candidates,alpha,expected", [
    (10, 20, 100, 1.0, 10), (10, 20, 100, 0.0, 2), (10, 20, 100, 0.5, 6), (30, 20, 100, 1.0, 20),
    (95, 20, 100, 0.0, 19), (95, 20, 100, 0.5, 20),  # never more than the pool
])
def test_pool_share(k, pool, candidates, alpha, expected):
    from ted_stream.policy import pool_share

    assert pool_share(k, pool, candidates, alpha) == expected


def test_the_default_alpha_is_the_measured_one():
    assert _TEDConfig().alpha == 0.5  # docs/quality.md: chosen from the issue-23 grids


def test_alpha_is_validated():
    with pytest.raises(ValueError, match=r"TEDConfig.alpha=1.5 is invalid: expected a fraction in \[0, 1\]"):
        TEDConfig(alpha=1.5)
