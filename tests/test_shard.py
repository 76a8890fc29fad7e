"""The sharded merge's plan (ted_stream.shard), simulated in one process at scale: a thousand
owners, millions of samples, the same tables as the all-gather fold, bit for bit."""
import numpy as np
import pytest

from ted_stream import shard
from ted_stream.table import ScoreTable

FP = {"digest": "0" * 64}


def _records(rng, n, ranks, per_rank):
    """Each rank's records of an epoch: ids with repeats (upstream padding), signed scores."""
    return [(rng.integers(0, n, per_rank), rng.standard_normal(per_rank).astype(np.float32)) for _ in range(ranks)]


def test_owner_bounds_cover_every_id_once_and_balance():
    for n, owners in [(1, 1), (7, 3), (10**9, 1024), (2**31 + 5, 1000), (5, 8)]:
        b = shard.owner_bounds(n, owners)
        assert b[0] == 0 and b[-1] == n and (np.diff(b) >= 0).all()
        assert np.diff(b).max() - np.diff(b).min() <= 1
    with pytest.raises(ValueError, match="owners >= 1"):
        shard.owner_bounds(10, 0)


def test_route_groups_each_record_by_owner_in_order():
    rng = np.random.default_rng(0)
    n, owners = 3_000_000, 1024
    ids, vals = rng.integers(0, n, 2_000_000), rng.standard_normal(2_000_000).astype(np.float32)
    bounds = shard.owner_bounds(n, owners)
    got_ids, got_vals, counts = shard.route(ids, vals, bounds, n)
    assert got_ids.dtype == np.int32 and counts.sum() == len(ids) and len(counts) == owners
    starts = np.r_[0, np.cumsum(counts)]
    for r in (0, 511, 1023):  # each owner's records, in recording order
        mine = (ids >= bounds[r]) & (ids < bounds[r + 1])
        assert got_ids[starts[r] : starts[r + 1]].tolist() == ids[mine].tolist()
        assert got_vals[starts[r] : starts[r + 1]].tolist() == vals[mine].tolist()
    wide, _, counts = shard.route(np.array([2**40 - 1, 3]), np.ones(2), shard.owner_bounds(2**40, 2), 2**40)
    assert wide.dtype == np.int64 and wide.tolist() == [3, 2**40 - 1] and counts.tolist() == [1, 1]


def received(records, bounds, n):
    """What each owner receives from an all-to-all of every rank's routed records: its records,
    source rank after source rank (a stable sort of all records by owner)."""
    ids = np.concatenate([shard.route(i, v, bounds, n)[0] for i, v in records]).astype(np.int64)
    vals = np.concatenate([shard.route(i, v, bounds, n)[1] for i, v in records])
    order = np.argsort(np.searchsorted(bounds, ids, side="right") - 1, kind="stable")
    return ids[order], vals[order]


def test_sharded_fold_equals_the_all_gather_fold_on_a_thousand_ranks():
    """Every owner folds its slice from every rank's routed records; the holders apply every
    owner's delta: the same bits as every rank folding every rank's records in rank order."""
    rng = np.random.default_rng(1)
    n, ranks = 2_000_000, 1000
    old = ScoreTable(n, FP)
    new = ScoreTable(n, FP)
    bounds = shard.owner_bounds(n, ranks)
    for epoch in range(2):  # the second epoch's EMA folds into the first's scores
        old.epoch = new.epoch = epoch
        records = _records(rng, n, ranks, 2_000)
        for ids, vals in records:  # today: every rank's records, in rank order
            old.record(ids, vals)
        ids, vals = received(records, bounds, n)
        owned = ScoreTable(n, FP, scores=new.scores.copy(), updated=new.updated.copy())  # the owners' views
        owned.epoch = epoch
        starts = np.searchsorted(np.searchsorted(bounds, ids, side="right") - 1, np.arange(ranks + 1))
        for r in range(ranks):
            lo, hi, part = int(bounds[r]), int(bounds[r + 1]), slice(starts[r], starts[r + 1])
            touched = shard.fold_owned(owned, ids[part], vals[part], lo, hi)
            delta = shard.encode_delta(owned.scores[lo:hi], owned.updated[lo:hi], touched)
            shard.apply_delta(new, lo, hi, delta)  # a holder applies every owner's delta
        np.testing.assert_array_equal(new.scores, old.scores)
        np.testing.assert_array_equal(new.updated, old.updated)


def test_fold_refuses_records_outside_the_owners_range():
    table = ScoreTable(100, FP)
    with pytest.raises(ValueError, match=r"ids \[70, 70\] reached the owner of \[0, 50\)"):
        shard.fold_owned(table, np.array([70], np.int32), np.array([1.0], np.float32), 0, 50)


def test_delta_round_trips_and_refuses_a_wrong_length():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 1 << 16, 1001).astype(np.uint16)
    touched = rng.random(1001) < 0.3
    updated = np.where(touched, 7, rng.integers(0, 255, 1001)).astype(np.uint8)  # one merge: one epoch
    data = shard.encode_delta(scores, updated, touched)
    assert len(data) == 126 + 2 * touched.sum() + 1  # bits, scores, the epoch once
    got, s, u = shard.decode_delta(data, 1001)
    assert (got == touched).all() and (s == scores[touched]).all() and u == 7
    table = ScoreTable(2001, FP)
    shard.apply_delta(table, 1000, 2001, data)
    assert (table.updated[1000:][touched] == 7).all() and (table.updated[1000:][~touched] == 0).all()
    assert (table.scores[1000:][touched] == scores[touched]).all()
    assert len(shard.encode_delta(scores, updated, np.zeros(1001, bool))) == 126  # nothing changed: bits only
    with pytest.raises(ValueError, match="expected"):
        shard.decode_delta(data[:-1], 1001)
    with pytest.raises(ValueError, match=r"updated in epochs \[3, 7\]: expected one"):
        shard.encode_delta(scores, np.where(np.arange(1001) == np.flatnonzero(touched)[0], 3, updated), touched)


def test_traffic_meets_the_target_per_rank_that_holds_no_table():
    n, ranks = 10**9, 1024
    mask = 2 * n // 8  # the default policy's mask: keep and boost bits
    t = shard.traffic(n, ranks, records=n, changed=n, mask_bytes=mask)
    assert t.allgather == 8 * n
    assert t.owner <= 8 * n / ranks + n / 8  # the mask comes from the node's file, not the network
    assert t.holder == t.owner + n // 8 + 2 * n + ranks + mask
