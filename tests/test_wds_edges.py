"""TEDWebDataset edge cases a user meets without reading the source (issue 24, item 6): a table
that travels with the saved state, the streaming path's real saving, shard dealing, and an index
that names truncated shards and manifests copied from another folder."""
import json
import os
import shutil
import tarfile

import pytest

from test_wds import PER_SHARD, write_tars
from ted_stream.loaders.wds_index import MANIFEST, ManifestError, WdsIndex, index_shards, prepare_shards


# ---- the tar index ----------------------------------------------------------------------------
def _member_ends(path):
    """Byte offsets where each member (header and padded data) of the tar at ``path`` ends."""
    with tarfile.open(path) as tar:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tar]


@pytest.mark.parametrize("cut, error", [
    ("member boundary", r"shard data-000002.tar is truncated or damaged: after its last readable member "
                        r"\(byte \d+, 20 samples\) it holds 0 bytes where tar's end-of-archive marker "
                        r"\(a zero block\) was expected"),
    ("inside a member", r"shard data-000002.tar is not a readable tar file: unexpected end of data"),
])
def test_a_truncated_shard_is_refused_by_name(tmp_path, cut, error):
    pattern = write_tars(tmp_path / "data")
    path = tmp_path / "data" / "data-000002.tar"
    ends = _member_ends(path)  # three members per sample (cls, json, txt)
    with open(path, "r+b") as f:
        f.truncate(ends[3 * 20 - 1] - (0 if cut == "member boundary" else 100))
    with pytest.raises(ValueError, match=error):
        index_shards(pattern)


def test_a_manifest_copied_from_another_folder_is_named_as_such(tmp_path):
    index_shards(write_tars(tmp_path / "a"))
    index_shards(write_tars(tmp_path / "b", per_shard=PER_SHARD - 1))
    shutil.copyfile(tmp_path / "a" / MANIFEST, tmp_path / "b" / MANIFEST)
    with pytest.raises(ManifestError) as caught:
        WdsIndex.open(str(tmp_path / "b"))
    message = str(caught.value)
    assert f"indexes the shards in {tmp_path / 'a'}, not these in {tmp_path / 'b'}" in message
    assert f"ted-stream index {tmp_path / 'b'}" in message
    assert not message.startswith("shard ")  # not reported as one shard changed after indexing


def test_a_copied_dataset_folder_still_opens(tmp_path):
    """A copy of shards and manifest together (a per-node cache: new mtimes, same bytes) is the
    same dataset: the folder recorded in the manifest is only named when the shards differ."""
    index_shards(write_tars(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "c", copy_function=shutil.copyfile)
    assert WdsIndex.open(str(tmp_path / "c")).num_samples == WdsIndex.open(str(tmp_path / "a")).num_samples


def test_prepared_shards_record_their_final_folder(tmp_path):
    prepare_shards(({"x": i} for i in range(10)), str(tmp_path / "out"))
    with open(tmp_path / "out" / MANIFEST) as f:
        assert json.load(f)["folder"] == str(tmp_path / "out")
