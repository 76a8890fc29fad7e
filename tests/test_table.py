import errno
import json
import os
import re
import stat
import struct
import subprocess
import sys
import zlib

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


def test_record_in_slices_folds_like_one_call(monkeypatch):
    """A large call is folded a slice at a time: an id repeated within and across slices gets the
    same EMA as when the whole call is one slice."""
    rng = np.random.default_rng(3)
    ids, vals = rng.integers(0, 50, 1000), rng.standard_normal(1000).astype(np.float32)
    whole, sliced = ScoreTable(50, FP, ema=0.3), ScoreTable(50, FP, ema=0.3)
    whole.record(ids, vals)
    monkeypatch.setattr("ted_stream.table._RECORD_SLICE", 7)
    sliced.record(ids, vals)
    assert whole.scores.tobytes() == sliced.scores.tobytes() and whole.updated.tobytes() == sliced.updated.tobytes()
    for i in (int(ids[0]), int(ids[-1])):  # each id's records folded in recording order
        expect = None
        for v in vals[ids == i]:
            expect = v if expect is None else 0.7 * expect + 0.3 * v
        assert whole.score_array()[i] == pytest.approx(expect, rel=0.05, abs=0.05)


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


# ---- format 2: every byte under a checksum, strict header ---------------------------------------
def _prefix_and_header(data: bytes) -> tuple[tuple, dict, bytes]:
    prefix = struct.unpack("<8sIII", data[:20])
    return prefix, json.loads(data[20:20 + prefix[2]]), data[20 + prefix[2]:]


def _rebuild(header: dict, payload: bytes, fix_crc: bool = True, old_crc: int = 0) -> bytes:
    raw = json.dumps(header, sort_keys=True).encode()
    sized = struct.pack("<II", 2, len(raw))
    crc = zlib.crc32(raw, zlib.crc32(sized)) if fix_crc else old_crc
    return b"TEDTABLE" + sized + struct.pack("<I", crc) + raw + payload


def _same(a: ScoreTable, b: ScoreTable) -> bool:
    return (np.array_equal(a.scores, b.scores) and np.array_equal(a.updated, b.updated)
            and a.epoch == b.epoch and a.ema == b.ema and a.fingerprint == b.fingerprint
            and sorted(a.masks) == sorted(b.masks) and a.frozen_by == b.frozen_by
            and all(a.masks[e].crc == b.masks[e].crc and a.masks[e].boost_weight == b.masks[e].boost_weight
                    and a.masks[e].requested == b.masks[e].requested for e in a.masks))


def test_header_edits_are_detected(tmp_path):
    # Before format 2 these loaded and trained on wrong masks: the header was outside the CRC.
    _, path = _filled(tmp_path)
    good = open(path, "rb").read()
    prefix, header, payload = _prefix_and_header(good)
    for edit in ({"boost_weight": 9.0}, {"epoch": 7}, {"boost": False}):
        h = json.loads(json.dumps(header))
        h["masks"][1].update(edit)
        open(path, "wb").write(_rebuild(h, payload, fix_crc=False, old_crc=prefix[3]))
        with pytest.raises(TableError, match="header CRC mismatch"):
            ScoreTable.load(path, FP)


@pytest.mark.parametrize("data,msg", [
    (lambda g: g[:12], "truncated: 12 bytes, shorter than the 20-byte prefix"),
    (lambda g: g[:8] + struct.pack("<III", 2, 2 ** 31, 0) + g[20:], "header length is damaged: header needs 2147483648"),
    (lambda g: g[:8] + struct.pack("<I", 3) + g[12:], "format version 3; this ted_stream reads version 2 only"),
    (lambda g: b"TEDTABL1" + struct.pack("<Q", 2) + b"{}", "version-1 table"),
    (lambda g: b"", "not a ted_stream score table"),
])
def test_malformed_prefixes_name_the_file_and_problem(tmp_path, data, msg):
    _, path = _filled(tmp_path)
    good = open(path, "rb").read()
    open(path, "wb").write(data(good))
    with pytest.raises(TableError, match=re.escape(msg)) as err:
        ScoreTable.load(path, FP)
    assert path in str(err.value)


@pytest.mark.parametrize("edit,msg", [
    (lambda h: h.pop("masks"), "'masks' is missing"),
    (lambda h: h.update(num_samples="100"), "'num_samples' = '100' is not an integer >= 0"),
    (lambda h: h.update(ema=float("nan")), "'ema' = nan is not a finite number"),
    (lambda h: h["masks"][0].update(boost=1), "masks[0].'boost' = 1 is not true or false"),
    (lambda h: h["masks"].append(dict(h["masks"][0])), "epoch 0 has two masks"),
    (lambda h: h["masks"][1].update(requested=-2), "masks[1].'requested' = -2 is not null or an integer"),
    (lambda h: h["masks"][0].update(config="nope"), "masks[0].'config' = 'nope' is not in 'configs'"),
    (lambda h: h.update(num_samples=10 ** 30), "'payload_bytes' = 339 but"),
    (lambda h: h.clear(), "'num_samples' is missing"),
])
def test_malformed_headers_name_the_field(tmp_path, edit, msg):
    # With the header CRC recomputed, as a buggy writer or a deliberate edit would leave it.
    _, path = _filled(tmp_path)
    _, header, payload = _prefix_and_header(open(path, "rb").read())
    edit(header)
    open(path, "wb").write(_rebuild(header, payload))
    with pytest.raises(TableError, match=re.escape(msg)) as err:
        ScoreTable.load(path, FP)
    assert path in str(err.value) and "malformed header" in str(err.value)


def test_fuzz_truncations_bit_flips_and_header_edits(tmp_path):
    """Every damaged table either loads identically or raises TableError, never anything else."""
    original, path = _filled(tmp_path)
    original = ScoreTable.load(path, FP)
    good = open(path, "rb").read()
    prefix, header, payload = _prefix_and_header(good)
    rng = np.random.default_rng(0)
    junk = ["x", -1, 1.5, None, [], {}, True, 2 ** 70, float("inf"), "0" * 20]
    loaded = refused = 0

    def keys(obj, trail=()):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
        for k, v in items:
            yield trail + (k,)
            yield from keys(v, trail + (k,))

    paths = list(keys(header))
    cases = []
    for _ in range(150):
        cases.append(good[: int(rng.integers(0, len(good)))])
        flipped = bytearray(good)
        for pos in rng.integers(0, len(good), int(rng.integers(1, 4))):
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(flipped))
        h = json.loads(json.dumps(header))
        trail = paths[int(rng.integers(len(paths)))]
        parent = h
        for k in trail[:-1]:
            parent = parent[k]
        if rng.random() < 0.3:
            del parent[trail[-1]]
        else:
            parent[trail[-1]] = junk[int(rng.integers(len(junk)))]
        fix = bool(rng.random() < 0.5)
        cases.append(_rebuild(h, payload, fix_crc=fix, old_crc=prefix[3]))
    for case in cases:
        open(path, "wb").write(case)
        try:
            t = ScoreTable.load(path, FP)
        except TableError as e:
            assert path in str(e)
            refused += 1
            continue
        loaded += 1
        # A fixed-CRC edit that is still a valid header (e.g. another int epoch) may load differently;
        # anything else that loads must be the original.
        assert _same(t, original) or zlib.crc32(case[20:]) != zlib.crc32(good[20:])
    assert refused > 400 and open(path, "rb").read() == cases[-1]  # load never writes


def test_requested_and_run_identity_round_trip(tmp_path):
    t = ScoreTable(16, FP)
    t.masks[0] = EpochMask.from_bools(0, np.ones(16, bool))
    t.bind({"target": 0.4, "policy": "ted"})
    t.masks[1] = EpochMask.from_bools(1, np.arange(16) < 10, requested=7)
    path = t.save(str(tmp_path / "t.tedt"))
    u = ScoreTable.load(path)
    assert u.masks[1].requested == 7 and u.masks[0].requested is None
    assert u.frozen_by[0] == u.frozen_by[1] and u.configs[u.frozen_by[1]] == {"target": 0.4, "policy": "ted"}
    u.bind({"policy": "ted", "target": 0.4})  # the same run: resuming is fine
    with pytest.raises(TableError, match=r"epoch\(s\) \[0, 1\] were frozen by another configuration.*"
                                         r"target: 0.4 -> 0.2.*another table_dir.*same configuration"):
        ScoreTable.load(path).bind({"target": 0.2, "policy": "ted"})


def test_masks_without_a_recorded_config_are_adopted(tmp_path):
    t = ScoreTable(16, FP)
    t.masks[0] = EpochMask.from_bools(0, np.ones(16, bool))
    u = ScoreTable.load(t.save(str(tmp_path / "t.tedt")))
    assert u.frozen_by == {}
    u.bind({"target": 0.1})
    assert set(u.frozen_by) == {0}


# ---- record validation -----------------------------------------------------------------------
@pytest.mark.parametrize("ids,vals,msg", [
    (np.array([1.7, 2.0]), [1.0, 2.0], "ids must be integers.*float64.*1.7"),
    ([True, False], [1.0, 2.0], "ids must be integers.*bool"),
    ([0, 1], np.ones((2, 1)), r"1-D arrays.*\(2,\) and \(2, 1\)"),
    (np.array([[0, 1]]), [1.0, 2.0], r"1-D arrays.*\(1, 2\)"),
    (3, [1.0], r"1-D arrays.*\(\) and \(1,\)"),
    ([0, 1], ["a", "b"], "scores must be real numbers"),
    ([0], [np.inf], "finite"),
    ([0], [1e300], "finite"),  # overflows float32
    ([-1], [1.0], r"\[0, 10\)"),
])
def test_record_rejects_what_it_would_otherwise_coerce(ids, vals, msg):
    t = ScoreTable(10, FP)
    with pytest.raises(ValueError, match=msg):
        t.record(ids, vals)
    assert not t.scored.any()


def test_record_accepts_integer_kinds_and_empty_batches():
    t = ScoreTable(10, FP)
    t.record(np.array([1, 2], np.uint8), np.array([1, 2], np.int32))
    t.record([], [])
    assert t.scored.sum() == 2


# ---- concurrent writers, permissions, disk full ---------------------------------------------------
WRITER = r"""
import sys
from ted_stream.table import ScoreTable, TableError
t = ScoreTable.load(sys.argv[1])
t.record([int(sys.argv[2])], [42.0])
print("loaded", flush=True)
sys.stdin.readline()
try:
    t.save()
    print("saved", flush=True)
except TableError as e:
    print("refused", e, flush=True)
"""


def test_two_processes_sharing_a_table_never_lose_scores_silently(tmp_path):
    _, path = _filled(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "loaded"
    results = []
    for p in procs:  # both loaded the same file; they save one after the other
        out, _ = p.communicate("go\n", timeout=900)  # hang guard
        results.append(out)
    assert results[0].startswith("saved")
    assert results[1].startswith("refused") and "written by another process after this one loaded it" in results[1] \
        and "table_dir" in results[1]
    on_disk = ScoreTable.load(path, FP)
    assert on_disk.score_array()[1] == 42.0  # the first writer's score survived
    assert on_disk.updated[2] == 0  # the second wrote nothing


def test_saving_again_from_the_same_table_and_over_a_deleted_file_is_fine(tmp_path):
    t, path = _filled(tmp_path)
    t.record([2], [1.0])
    t.save()
    os.unlink(path)
    t.save()
    assert ScoreTable.load(path).scored[2]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask):
    from ted_stream.prepare import write_mds

    old = os.umask(umask)
    try:
        path = ScoreTable(10, FP).save(str(tmp_path / "t" / "table.tedt"))
        write_mds(({"text": f"s{i}"} for i in range(4)), str(tmp_path / "mds"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "mds").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "mds" / "ted" / "table.tedt").st_mode) == 0o666 & ~umask


def test_disk_full_while_writing_keeps_the_old_table(tmp_path, monkeypatch):
    t, path = _filled(tmp_path)
    good = open(path, "rb").read()
    t.record(np.arange(100), np.ones(100))
    real_write, budget = os.write, [len(good) // 2]

    def full_disk(fd, data):  # accepts half a table, then the device is full
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match=r"cannot save the score table .*No space left.*previous table is unchanged") as err:
        t.save()
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert open(path, "rb").read() == good
    assert os.listdir(os.path.dirname(path)) == ["table.tedt"]
    t.save()  # once there is room again, the same table saves
    assert ScoreTable.load(path, FP).scored.all()
