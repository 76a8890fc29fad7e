import os

import numpy as np
import pytest

from ted_stream.table import EpochMask, ScoreTable, TableError, bf16_order_key, bf16_to_f32, f32_to_bf16

FP = {"digest": "a" * 64, "num_samples": 100, "num_shards": 2, "num_streams": 1}


def test_bfloat16_round_trip_and_order():
    x = np.array([0.0, -0.0, 1.0, -2.5, 3.0e30, 1e-30, 123.456], np.float32)
    back = bf16_to_f32(f32_to_bf16(x))
    np.testing.assert_allclose(back, x, rtol=2 ** -8)
    assert back[4] > 1e30  # float16 would overflow here
    vals = np.array([-5, -1, -0.5, 0, 0.25, 1, 7, 1e6], np.float32)
    keys = bf16_order_key(f32_to_bf16(vals))
    assert (np.diff(keys.astype(np.int64)) > 0).all()


def test_record_is_ema_and_tracks_epoch():
    t = ScoreTable(10, FP, ema=0.25)
    t.record([1, 2], [4.0, 8.0])
    assert t.score_array()[[1, 2]].tolist() == [4.0, 8.0]  # first score taken as is
    t.epoch = 3
    t.record([1], [8.0])
    assert t.score_array()[1] == pytest.approx(0.75 * 4 + 0.25 * 8)
    assert t.updated[[0, 1, 2]].tolist() == [0, 4, 1]
    assert t.scored.sum() == 2
    t.record([5, 5], [2.0, 6.0])  # repeated id in one call (padding): folded in order
    assert t.score_array()[5] == pytest.approx(0.75 * 2 + 0.25 * 6)


@pytest.mark.parametrize("ids,vals,msg", [([0, 1], [1.0], "2 ids but 1 scores"),
                                          ([10], [1.0], r"\[0, 10\)"),
                                          ([0], [np.nan], "finite")])
def test_record_rejects_bad_input(ids, vals, msg):
    with pytest.raises(ValueError, match=msg):
        ScoreTable(10, FP).record(ids, vals)


def _filled(tmp_path):
    t = ScoreTable(100, FP, ema=0.5)
    t.record(np.arange(0, 100, 3), np.linspace(-1, 1, 34))
    keep = np.arange(100) % 4 != 0
    t.masks[0] = EpochMask.from_bools(0, np.ones(100, bool))
    t.masks[1] = EpochMask.from_bools(1, keep, boost=keep & (np.arange(100) < 10), boost_weight=2.0)
    path = str(tmp_path / "ted" / "table.tedt")
    t.save(path)
    return t, path


def test_save_load_round_trip(tmp_path):
    t, path = _filled(tmp_path)
    u = ScoreTable.load(path, FP)
    np.testing.assert_array_equal(u.scores, t.scores)
    np.testing.assert_array_equal(u.updated, t.updated)
    assert sorted(u.masks) == [0, 1] and u.masks[1].crc == t.masks[1].crc
    assert u.masks[1].kept == 75
    assert u.masks[1].weights([1, 11, 4]).tolist() == [2.0, 1.0, 1.0]
    assert os.listdir(os.path.dirname(path)) == ["table.tedt"]  # no temporary file left


def test_loaded_table_changes_file_only_on_save(tmp_path):
    _, path = _filled(tmp_path)
    before = open(path, "rb").read()
    u = ScoreTable.load(path, FP)
    u.record([0], [99.0])  # copy-on-write map
    assert open(path, "rb").read() == before
    u.save()
    assert ScoreTable.load(path, FP).score_array()[0] == pytest.approx(0.5 * -1 + 0.5 * 99)


def test_truncated_and_corrupted_tables_raise_and_stay_on_disk(tmp_path):
    _, path = _filled(tmp_path)
    good = open(path, "rb").read()
    open(path, "wb").write(good[:-7])
    with pytest.raises(TableError, match="truncated"):
        ScoreTable.load(path, FP)
    assert open(path, "rb").read() == good[:-7]
    bad = bytearray(good)
    bad[-20] ^= 0xFF
    open(path, "wb").write(bytes(bad))
    with pytest.raises(TableError, match="corrupted: payload CRC"):
        ScoreTable.load(path, FP)
    assert open(path, "rb").read() == bytes(bad)
    open(path, "wb").write(b"PK\x03\x04 not a table at all")
    with pytest.raises(TableError, match="not a ted_stream score table"):
        ScoreTable.load(path, FP)


def test_fingerprint_mismatch_names_both_datasets(tmp_path):
    _, path = _filled(tmp_path)
    other = dict(FP, digest="b" * 64, num_samples=101)
    with pytest.raises(TableError, match="another dataset.*aaaaaaaaaaaa.*100 samples.*bbbbbbbbbbbb.*101 samples"):
        ScoreTable.load(path, other)


def test_failed_save_keeps_old_table(tmp_path, monkeypatch):
    t, path = _filled(tmp_path)
    good = open(path, "rb").read()
    t.record([1], [5.0])

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    assert open(path, "rb").read() == good
    assert os.listdir(os.path.dirname(path)) == ["table.tedt"]
