"""Small inputs that used to pass silently or end in a traceback: each is a clear error naming the
value, or a documented conversion (issue 24, item 7), and damaged shards are refused."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import make_corpus
from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream.cli import main
from ted_stream.loaders.upstream import ShardError
from ted_stream.prepare import read_corpus, write_mds
from ted_stream.table import BF16_MAX, ScoreTable, bf16_to_f32, copy_atomic, f32_to_bf16

FP = {"digest": "e" * 64}


def test_scores_beyond_bfloat16_saturate_and_beyond_float32_are_refused():
    t = ScoreTable(4, FP, ema=1.0)
    t.record(np.arange(3), np.array([3.4e38, -3.4e38, 1.0], dtype=np.float32))  # finite float32
    assert bf16_to_f32(t.scores[:3]).tolist() == [BF16_MAX, -BF16_MAX, 1.0]
    assert np.isinf(bf16_to_f32(f32_to_bf16(np.array([np.inf], np.float32)))).all()  # inf stays inf
    with pytest.raises(ValueError, match=r"finite float32 values \(\|score\| <= 3.4e38\); got \[1e\+39\]"):
        t.record(np.array([3]), np.array([1e39]))


def test_record_takes_bfloat16_scores(corpus):
    ds = TEDStreamingDataset(local=corpus, batch_size=4, ted=TEDConfig())
    ds.record(torch.tensor([0, 1]), torch.tensor([1.5, -2.25], dtype=torch.bfloat16))
    assert ds.table.score_array()[:2].tolist() == [1.5, -2.25]


def test_config_from_dict_names_non_string_keys():
    with pytest.raises(ValueError, match=r"TED config key\(s\) \[3\] are not strings"):
        TEDConfig.from_dict({3: 0.5})
    with pytest.raises(ValueError, match="expected a mapping"):
        TEDConfig.from_dict([("target", 0.5)])


@pytest.mark.parametrize("lines,problem", [
    ([{"x": 1}, {"x": 3.5}], r":2: column 'x' holds 3.5 \(float\) but the first sample made it an integer column"),
    ([{"x": 1}, {"x": None}], r":2: column 'x' is null"),
    ([{"x": None}], r":1: column\(s\) \['x'\] are null in the first sample"),
    ([{"x": 1}, {"x": 1 << 70}], r":2: column 'x' holds 1180591620717411303424, outside the 64-bit"),
    ([{"t": "a"}, {"t": 5}], r":2: column 't' holds 5 \(int\); expected str"),
    ([{"t": "a"}, {"u": "b"}], r":2: keys \['u'\]; expected \['t'\]"),
])
def test_prepare_names_the_line_and_the_value(tmp_path, lines, problem):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=problem):
        list(read_corpus(str(path)))
    assert main(["prepare", str(path), str(tmp_path / "out")]) == 2  # a clear error, no traceback
    assert not os.path.exists(tmp_path / "out")


def test_prepare_names_the_line_of_invalid_utf8(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"c.txt:3: not valid UTF-8 \(invalid start byte at byte 4\)"):
        list(read_corpus(str(path)))


def test_integers_in_a_float_column_are_stored_as_floats(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"x": 0.5}\n{"x": 2}\n')
    write_mds(read_corpus(str(path)), str(tmp_path / "out"))
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(tmp_path / "out"), batch_size=1)
    assert sorted(ds[i]["x"] for i in range(2)) == [0.5, 2.0]


def test_prepare_on_a_full_disk_is_a_clear_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.txt"
    path.write_text("a\nb\n")
    import ted_stream.cli as cli

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_mds", full)
    assert main(["prepare", str(path), str(tmp_path / "out")]) == 2
    assert "ted-stream: error: [Errno 28] No space left on device" in capsys.readouterr().err


def test_copy_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    import shutil

    def fail(a, b):
        with open(b, "wb") as f:
            f.write(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", fail)
    with pytest.raises(OSError, match="No space left"):
        copy_atomic(str(src), str(tmp_path / "dst" / "table.tedt"))
    assert os.listdir(tmp_path / "dst") == []


def test_damaged_shard_is_refused_with_validate_hash(tmp_path):
    folder = make_corpus(tmp_path / "data", 300)
    index = json.load(open(os.path.join(folder, "index.json")))
    zip_name = index["shards"][1]["zip_data"]["basename"]
    assert "xxh64" in index["shards"][1]["zip_data"]["hashes"]  # written by write_mds
    with open(os.path.join(folder, zip_name), "r+b") as f:
        f.seek(30)
        byte = f.read(1)
        f.seek(30)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not os.path.exists(os.path.join(folder, index["shards"][1]["raw_data"]["basename"]))  # decompressed on read
    ds = TEDStreamingDataset(local=folder, batch_size=4, validate_hash="xxh64", ted=TEDConfig())
    first_of_shard = index["shards"][0]["samples"]
    checksum = rf"shard .*{zip_name} could not be prepared \(ValueError: Checksum failure: .*{zip_name}"
    with pytest.raises(ShardError, match=checksum):  # read in this thread
        ds.get_item(first_of_shard)
    ds = TEDStreamingDataset(local=folder, batch_size=4, validate_hash="xxh64", ted=TEDConfig())
    with pytest.raises(ShardError, match=checksum):  # decompressed by streaming's download thread
        list(ds)
