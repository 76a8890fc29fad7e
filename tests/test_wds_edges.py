"""TEDWebDataset edge cases a user meets without reading the source (issue 24, item 6): a table
that travels with the saved state, the streaming path's real saving, shard dealing, and an index
that names truncated shards and manifests copied from another folder."""
import json
import logging
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from test_wds import BATCH, N, PER_SHARD, dataset, scored, shards, stream_epoch, write_tars  # noqa: F401 (shards: a fixture)
from ted_stream.loaders.wds_state import KEEP, STATES
from ted_stream.loaders.wds_stream import REPEAT_WARNING_SHARE, RepeatWarning
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


# ---- the table travels with the saved state ---------------------------------------------------
def _scores(ids, epoch):
    """Deterministic per-sample scores that change every epoch: both runs record the same values."""
    return np.cos(np.asarray(ids) * 1.7 + epoch)


def _run(ds, epochs, stop=None):
    """A plain loop (docs/webdataset.md's first example): ``stop=(epoch, step, then)`` takes the
    state after that step, then ``then`` is "kill" (the process dies) or "went on" (it finishes
    the epoch, saves the table and dies). Returns the state, or each epoch's served ids."""
    served = []
    for epoch in epochs:
        ds.start_epoch(epoch)
        served.append([])
        state = None
        for step, batch in enumerate(DataLoader(ds, batch_size=BATCH, sampler=ds.sampler)):
            ds.record(batch["ted_id"], _scores(batch["ted_id"], epoch))
            served[-1] += batch["ted_id"].tolist()
            if stop is not None and stop[:2] == (epoch, step):
                state = json.dumps(ds.state_dict(samples_in_epoch=(step + 1) * BATCH))
                if stop[2] == "kill":
                    return state
        if state is not None:
            ds.save_table()
            return state
    return served


@pytest.mark.parametrize("then", ["kill", "went on"])
def test_a_resumed_plain_loop_prunes_the_next_epoch_as_the_uninterrupted_one(shards, tmp_path, then):
    full = _run(dataset(shards, table_dir=str(tmp_path / "full")), range(3))
    state = _run(dataset(shards, table_dir=str(tmp_path / "cut")), range(2), stop=(1, 14, then))
    resumed = dataset(shards, table_dir=str(tmp_path / "cut"))  # a fresh process: only the state
    resumed.load_state_dict(json.loads(state))
    rest = _run(resumed, range(1, 3))
    assert rest[0] == full[1][15 * BATCH:]  # epoch 1 goes on right after the state
    assert 0 < len(rest[1]) < N and rest[1] == full[2]  # epoch 2 prunes (and orders) the same set


def test_a_state_whose_table_copy_is_gone_says_what_to_keep(shards, tmp_path):
    state = json.loads(_run(dataset(shards, table_dir=str(tmp_path / "t")), range(2), stop=(1, 2, "went on")))
    os.unlink(tmp_path / "t" / state["table"]["file"])
    with pytest.raises(FileNotFoundError, match=r"the state was taken with the score table .*/t/states/table-"
                                                r"[0-9a-f]{16}.tedt \(digest [0-9a-f]{16}\), which is missing"):
        dataset(shards, table_dir=str(tmp_path / "t")).load_state_dict(state)


def test_table_copies_are_shared_by_content_and_bounded(shards, tmp_path):
    ds = dataset(shards, table_dir=str(tmp_path / "t"))
    ds.start_epoch(0)
    assert ds.state_dict(0)["table"] == ds.state_dict(0)["table"]  # nothing recorded between: one copy
    for i in range(KEEP + 3):
        ds.record([i], [float(i)])
        ds.state_dict(0)
    assert len(os.listdir(tmp_path / "t" / STATES)) == KEEP


# ---- the streaming path: its real saving, and shard dealing -----------------------------------
def _streamed(ds, workers):
    """Samples this rank's streaming pipeline serves in the current epoch."""
    return sum(len(ids) for ids, _, _ in stream_epoch(ds, workers=workers))


def test_streaming_figures_count_the_repeats(shards):
    scored(shards)
    ranks = [dataset(shards, rank=r, world_size=2, decode=None) for r in range(2)]
    for ds in ranks:
        ds.start_epoch(1)
    stats = ranks[0].wds_stats(num_workers=2)
    kept = len(ranks[0].kept_ids(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepeatWarning)  # raised in the workers; its test is below
        served = sum(_streamed(ds, workers=2) for ds in ranks)
    assert stats["slots"] == 4 and stats["kept"] == kept and stats["served"] == served > kept
    assert stats["repeats"] == served - kept
    assert stats["saved"] == pytest.approx(1 - served / N) and stats["saved_by_mask"] == pytest.approx(1 - kept / N)
    assert stats == ranks[1].wds_stats(num_workers=2)  # the same figures on every rank


def test_streaming_warns_once_per_epoch_when_repeats_undo_the_saving(shards):
    scored(shards)
    ds = dataset(shards, rank=0, world_size=4, decode=None)  # 4 slots over 6 shards: 2, 2, 1, 1
    ds.start_epoch(1)
    stats = ds.wds_stats(num_workers=0)
    assert stats["repeats"] > REPEAT_WARNING_SHARE * (N - stats["kept"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _streamed(ds, workers=0)
        _streamed(ds, workers=0)  # the same epoch again: no second report
    repeats = [str(w.message) for w in caught if w.category is RepeatWarning]
    assert len(repeats) == 1
    assert (f"epoch 1, streaming path: {stats['served']} samples served for {stats['kept']} kept of {N} "
            f"({stats['repeats']} repeats equalise 4 ranks x workers): {stats['saved']:.1%} saved, "
            f"{stats['saved_by_mask']:.1%} by the mask; the repeats undo") in repeats[0]
    assert "more than 10%" in repeats[0]


def test_streaming_logs_its_figures_without_warning_when_repeats_are_few(shards, caplog):
    scored(shards)
    ds = dataset(shards, rank=0, world_size=2, decode=None)  # 3 shards per slot: counts close
    ds.start_epoch(1)
    stats = ds.wds_stats(num_workers=0)
    assert stats["repeats"] <= REPEAT_WARNING_SHARE * (N - stats["kept"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepeatWarning)
        with caplog.at_level(logging.INFO, logger="ted_stream.wds"):
            _streamed(ds, workers=0)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["epoch 1, streaming path"]
    assert f"{stats['saved']:.1%} saved" in caplog.records[0].getMessage()


def test_select_without_shard_dealing_is_refused(shards):
    scored(shards)
    ds = dataset(shards, rank=0, world_size=2, decode=None)
    ds.start_epoch(1)
    urls = [os.path.join(ds.index.folder, s["name"]) for s in ds.index.shards]
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), ds.wds_select(), wds.batched(BATCH))
    with pytest.raises(RuntimeError, match=r"wds_select\(\): rank 0, worker slot 0 of 2 read shard data-\d+.tar, "
                                           r"which is not among the shards wds_shards\(\) deals it in epoch 1 "
                                           r"\(\['data-.*'\]\): expected ds.wds_shards\(\) as the pipeline's first stage"):
        list(pipe)
