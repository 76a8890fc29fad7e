"""TEDStreamingDataset on real MDS shards, through upstream's own machinery."""
import gc
import math
import os
import shutil

import numpy as np
import pytest
from streaming import StreamingDataLoader
from streaming.base.batching import generate_work
from streaming.base.world import World

from conftest import make_corpus
from ted_stream import TEDConfig, TEDStreamingDataset, TableError
from ted_stream.policy import PruningWarning
from ted_stream.table import ScoreTable

BATCH = 8
CFG = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=1, explore=0.1, seed=3)


def dataset(folder, cfg=CFG, **kw):
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("shuffle", True)
    return TEDStreamingDataset(local=folder, ted=cfg, **kw)


def close(*datasets):
    for ds in datasets:
        del ds
    gc.collect()


def score_everything(ds):
    """Epoch 0 (warm-up): see every sample once and score it."""
    ds.start_epoch(0)
    ids = np.array([s["ted_id"] for s in ds])
    ds.record(ids, np.sin(ids * 1.7))  # arbitrary but fixed scores
    return ids


def test_pruned_ids_never_yielded_and_kept_ids_once(corpus):
    ds = dataset(corpus)
    ids0 = score_everything(ds)
    assert sorted(ids0) == list(range(600))
    for epoch in (1, 2):
        mask = ds.start_epoch(epoch)
        assert len(ds) == mask.kept < 600
        ids = [s["ted_id"] for s in ds]
        assert sorted(ids) == ds.kept_ids(epoch).tolist()  # kept ids, each exactly once
        ds.record(ids, np.cos(np.array(ids)))
    assert mask.kept % BATCH == 0


def test_shard_blocks_prune_whole_shards_of_the_index(tmp_path):
    """block="shard": the loader hands the policy its shards' first ids, so every shard (its
    sample count set by its bytes, not a fixed number) is read whole or not at all, but for the
    one the granule partly restores."""
    folder = make_corpus(tmp_path / "data", 3000, shard_bytes=1500)
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, block="shard")
    ds = dataset(folder, cfg, table_dir=str(tmp_path / "t"))
    sizes = ds.samples_per_shard
    assert len(set(sizes.tolist())) > 1  # shards of different sizes: no fixed block fits them
    score_everything(ds)
    mask = ds.start_epoch(1)
    read = np.add.reduceat(mask.bools().astype(np.int64), np.cumsum(sizes) - sizes)
    partial = (read > 0) & (read < sizes)
    assert partial.sum() <= 1 and 0.3 < (read == 0).mean() < 0.7
    assert sorted(s["ted_id"] for s in ds) == ds.kept_ids(1).tolist()
    close(ds)


def test_samples_keep_their_columns_and_weights(corpus):
    # alpha 1: the kept pool weighs pool / kept (here 2), the rest 1
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, explore=0.5, alpha=1.0, rescale=True, max_weight=2.0)
    ds = dataset(corpus, cfg)
    score_everything(ds)
    mask = ds.start_epoch(1)
    weights = {}
    for s in ds:
        assert s["text"] == f"sample number {s['ted_id']}" and s["label"] == s["ted_id"] % 5
        weights[s["ted_id"]] = s["ted_weight"]
    ids = np.array(sorted(weights))
    np.testing.assert_array_equal([weights[i] for i in ids], mask.weights(ids))
    assert set(weights.values()) == {1.0, 2.0}


def test_groups_keep_the_label_mix(corpus):
    """Scores that favour some labels: with the labels as groups, every label keeps the same share."""
    labels = np.arange(600) % 5  # the corpus's label column, in sample-id order
    ds = dataset(corpus, groups=labels)
    ds.start_epoch(0)
    ids = np.array([s["ted_id"] for s in ds])
    ds.record(ids, labels[ids] + np.sin(ids * 1.7))  # label 0 scores lowest
    mask = ds.start_epoch(1)
    kept = np.bincount([s["label"] for s in ds], minlength=5)
    assert kept.sum() == mask.kept < 600 and kept.max() - kept.min() <= 1
    with pytest.raises(ValueError, match=r"groups has shape \(599,\) and dtype int64: expected \(600,\) integers"):
        dataset(corpus, groups=labels[:-1])


def test_loop_without_start_epoch_and_without_scores_yields_every_epoch_whole(corpus):
    """The drop-in case: epochs 1 and 2 prune per the schedule, but nothing was scored."""
    ds = dataset(corpus)
    for _ in range(3):
        assert sorted(s["text"] for s in ds) == sorted(f"sample number {i}" for i in range(600))
    assert ds.table.masks == {}


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (2, True)])
def test_loop_without_start_epoch_freezes_from_the_table_file(corpus, workers, persistent):
    """Scores persisted by save_table: an epoch iterated without start_epoch is frozen from the
    file by every worker alike, the main process agrees, save_table persists that mask, and a
    checkpoint taken mid-epoch resumes exactly. A loop that records but never starts an epoch
    asks for the keys with ted_keys="always"."""
    ds = dataset(corpus, ted_keys="always")
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=persistent)
    ids = np.array([i for b in loader for i in b["ted_id"].tolist()])  # epoch 0: warm-up
    ds.record(ids, np.sin(ids * 1.7))
    ds.save_table()
    seen, state = [], None
    for i, b in enumerate(loader):  # epoch 1, no start_epoch call
        seen += b["ted_id"].tolist()
        if i == 4:
            state = loader.state_dict()
            ds.save_table()  # a checkpoint: persists epoch 1's implicit mask before the new scores
            ds.record(b["ted_id"], np.zeros(BATCH))  # changes the scores, not the frozen epoch
            ds.save_table()
    assert len(seen) == len(set(seen)) < 600
    assert sorted(seen) == ds.kept_ids(1).tolist()  # each kept id once, across the workers
    assert state["ted"]["mask_crc"] == ScoreTable.load(ds.table_path).masks[1].crc
    del loader
    close(ds)
    resumed = dataset(corpus, ted_keys="always")
    loader = StreamingDataLoader(resumed, batch_size=BATCH, num_workers=workers)
    loader.load_state_dict(state)
    assert seen[:5 * BATCH] + [i for b in loader for i in b["ted_id"].tolist()] == seen


def test_epoch_without_scores_is_recorded_as_pruning_nothing(corpus):
    ds = dataset(corpus)
    for _ in range(2):
        list(ds)
    with pytest.warns(PruningWarning, match=r"epoch 1 was iterated without start_epoch\(1\) while the table "
                                            r"file held no scores, so it pruned none of the 300 samples"):
        ds.save_table()
    mask = ScoreTable.load(ds.table_path).masks[1]
    assert mask.kept == 600 and mask.requested == 300


def test_start_epoch_must_be_the_epoch_streaming_iterates_next(corpus):
    ds = dataset(corpus)
    with pytest.raises(ValueError, match=r"start_epoch\(1\) does not match the epoch streaming iterates next, 0"):
        ds.start_epoch(1)
    ds.start_epoch(0)
    ds.start_epoch(0)  # again before iterating: the same epoch, allowed
    assert len(list(ds)) == 600
    with pytest.raises(ValueError, match=r"start_epoch\(0\) does not match .* next, 1: .* call start_epoch\(1\)"):
        ds.start_epoch(0)
    state = ds.state_dict(0, True)
    close(ds)
    resumed = dataset(corpus)
    resumed.load_state_dict({**state, "epoch": 2})
    with pytest.warns(PruningWarning, match="only 0 have a score"):  # nothing was scored
        resumed.start_epoch(2)  # a loaded checkpoint resumes its own epoch


@pytest.mark.parametrize("nodes,ranks", [(1, 4), (2, 2), (4, 1)])
def test_equal_per_rank_counts_across_topologies(corpus, nodes, ranks):
    ds = dataset(corpus)
    score_everything(ds)
    workers = 2
    # Freeze the mask as a job of this shape would: kept count a multiple of ranks x batch.
    ds._parallel_rank_world = World(nodes, ranks, 1, 0)
    mask = ds.start_epoch(1)
    assert mask.kept % (nodes * ranks * BATCH) == 0
    ds.num_canonical_nodes, ds.shuffle_block_size = 4, 1 << 18
    world = World(nodes, ranks, workers, 0)
    work = generate_work(ds.batching_method, ds, world, 1, 0)
    assert work.shape[:3] == (nodes, ranks, workers)
    per_rank = (work.reshape(nodes * ranks, -1) >= 0).sum(axis=1)
    assert (per_rank == mask.kept // (nodes * ranks)).all()  # equal, and no padding needed
    flat = work[work >= 0]
    assert sorted(flat.tolist()) == ds.kept_ids(1).tolist()  # every kept id exactly once


def test_padding_only_repeats_kept_ids(corpus):
    """Upstream pads uneven splits by repeating samples; they must be kept ones too."""
    ds = dataset(corpus, batch_size=7)
    score_everything(ds)
    mask = ds.start_epoch(1)
    ds.num_canonical_nodes, ds.shuffle_block_size = 3, 1 << 18
    work = generate_work(ds.batching_method, ds, World(1, 3, 1, 0), 1, 0)
    flat = work[work >= 0]
    assert set(flat.tolist()) == set(ds.kept_ids(1).tolist())
    assert mask.keeps(flat).all()


def run_loader(ds, epoch, num_workers=0, stop_after=None, **kw):
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=num_workers, **kw)
    seen, state = [], None
    for i, batch in enumerate(loader):
        seen += batch["ted_id"].tolist()
        if stop_after is not None and i + 1 == stop_after:
            state = loader.state_dict()
            break
    return seen, state, loader


def test_mid_epoch_resume_yields_exactly_the_remainder(corpus):
    ds = dataset(corpus)
    score_everything(ds)
    ds.start_epoch(1)
    head, state, _ = run_loader(ds, 1, stop_after=5)
    close(ds)
    # Uninterrupted reference: a fresh process view of the same table and epoch.
    ref = dataset(corpus)
    ref.load_state_dict({**state, "sample_in_epoch": 0})
    ref.start_epoch(1)
    full, _, _ = run_loader(ref, 1)
    close(ref)
    assert full[:len(head)] == head
    resumed = dataset(corpus)
    loader = StreamingDataLoader(resumed, batch_size=BATCH)
    loader.load_state_dict(state)
    resumed.start_epoch(1)  # already frozen: the same mask comes back
    rest = [i for b in loader for i in b["ted_id"].tolist()]
    assert head + rest == full
    assert len(full) == len(set(full)) == resumed.table.masks[1].kept


def test_resume_against_a_different_mask_is_refused(corpus):
    ds = dataset(corpus)
    score_everything(ds)
    ds.start_epoch(1)
    _, state, _ = run_loader(ds, 1, stop_after=2)
    path = ds.table_path
    close(ds)
    table = ScoreTable.load(path)
    table.masks[1] = type(table.masks[1]).from_bools(1, np.arange(600) % 2 == 0)
    table.save()
    other = dataset(corpus)
    with pytest.raises(ValueError, match="cannot resume epoch 1: the checkpoint's keep-mask"):
        other.load_state_dict(state)


def test_dataloader_workers_see_the_mask(corpus):
    # One loader for the whole run: upstream cannot iterate an instance in-process and then
    # in forked workers (its barrier lock is inherited).
    ds = dataset(corpus)
    for epoch in range(3):
        mask = ds.start_epoch(epoch)
        seen, _, _ = run_loader(ds, epoch, num_workers=2)
        assert sorted(seen) == ds.kept_ids(epoch).tolist()
        assert mask.keeps(seen).all()
        ds.record(seen, np.sin(np.array(seen) * 1.7))
    assert mask.kept < 600


def test_persistent_workers_pick_up_new_masks_and_weights(corpus):
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=1, explore=0.5, rescale=True, seed=3)
    ds = dataset(corpus, cfg)
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True)
    for epoch in range(3):
        mask = ds.start_epoch(epoch)
        seen, weights = [], []
        for b in loader:
            seen += b["ted_id"].tolist()
            weights += b["ted_weight"].tolist()
        assert sorted(seen) == ds.kept_ids(epoch).tolist()
        # Workers made before this start_epoch read the new mask, boost weights included.
        np.testing.assert_allclose(weights, mask.weights(seen))
        ds.record(seen, np.sin(np.array(seen) * (epoch + 1.7)))
    assert mask.boost is not None and mask.boost_weight > 1
    assert ds.kept_ids(1).tolist() != ds.kept_ids(2).tolist()


def test_table_persisted_beside_the_shards_and_reloaded(corpus):
    ds = dataset(corpus)
    score_everything(ds)
    mask = ds.start_epoch(1)
    assert ds.table_path == os.path.join(corpus, "ted", "table.tedt")
    close(ds)
    again = dataset(corpus)
    assert again.table.masks[1].crc == mask.crc and again.table.scored.all()


def test_load_table_puts_a_checkpoint_table_back(corpus, tmp_path):
    ds = dataset(corpus)
    score_everything(ds)
    ds.save_table()
    saved = str(tmp_path / "checkpoint.tedt")
    shutil.copyfile(ds.table_path, saved)
    scores = ds.table.scores.copy()
    mask = ds.start_epoch(1)  # the live table moves ahead of the checkpoint: epoch 1's mask
    ds.record(ds.kept_ids(1), np.ones(mask.kept))
    assert len(ds) == mask.kept
    ds.load_table(saved)
    assert 1 not in ds.table.masks and np.array_equal(ds.table.scores, scores)
    assert not ds._kept_sizes  # the cached length of the replaced epoch 1 is gone
    assert len(ds) == mask.kept  # and epoch 1 counts as the restored scores will prune it
    assert ds.start_epoch(1).crc == mask.crc  # the same scores freeze the same mask; the save is allowed
    with pytest.raises(FileNotFoundError, match="missing.tedt is missing"):
        ds.load_table(str(tmp_path / "missing.tedt"))


def test_fingerprint_mismatch_refuses_the_table(corpus, tmp_path):
    other = make_corpus(tmp_path / "other", 599)
    shutil.copy(os.path.join(corpus, "ted", "table.tedt"), os.path.join(other, "ted", "table.tedt"))
    with pytest.raises(TableError, match="belongs to another dataset"):
        dataset(other)
    assert os.path.exists(os.path.join(other, "ted", "table.tedt"))


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match=r"unknown TED config key\(s\) \['targt'\]"):
        dataset(corpus, {"targt": 0.2})
    with pytest.raises(TypeError, match="ted=3 is invalid"):
        dataset(corpus, 3)
    ds = dataset(corpus)
    with pytest.raises(ValueError, match="epoch=-1 is invalid"):
        ds.start_epoch(-1)
    with pytest.raises(ValueError, match="3 ids but 2 scores"):
        ds.record([1, 2, 3], [0.1, 0.2])


def test_local_world_size_from_deepspeed_launcher(corpus, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "1")
    from streaming.base.world import World

    seen, detect = [], World.detect
    monkeypatch.setattr(World, "detect", classmethod(lambda cls: seen.append(os.environ.get("LOCAL_WORLD_SIZE"))
                                                     or detect()))
    dataset(corpus)
    assert seen and set(seen) == {"1"}  # streaming counts the node by the launcher's LOCAL_SIZE
    assert "LOCAL_WORLD_SIZE" not in os.environ  # and the process's environment is left as it was


def test_worker_batches_are_the_in_process_batches(corpus):
    """Batches made in DataLoader workers (whose ted_id/ted_weight cross to the main process as
    bytes, not shared memory) are plain dicts with the keys, dtypes and values of in-process ones."""
    import pickle

    import torch
    import torch.multiprocessing  # noqa: F401  (registers the tensor reducers on ForkingPickler)
    from torch.utils.data import default_collate
    from multiprocessing.reduction import ForkingPickler

    from ted_stream.loaders.streaming import _WorkerSample

    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=1, explore=0.5, rescale=True, seed=3)
    ds = dataset(corpus, cfg)
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=2)
    for epoch in range(2):
        mask = ds.start_epoch(epoch)
        batches = list(loader)
        assert all(type(b) is dict and list(b) == ["label", "text", "ted_id", "ted_weight"] for b in batches)
        assert all(b["ted_id"].dtype == torch.int64 and b["ted_weight"].dtype == torch.float64 for b in batches)
        seen = [i for b in batches for i in b["ted_id"].tolist()]
        weights = [w for b in batches for w in b["ted_weight"].tolist()]
        assert sorted(seen) == ds.kept_ids(epoch).tolist()
        assert weights == mask.weights(seen).tolist()  # float32-rounded, exactly
        ds.record(seen, np.sin(np.array(seen) * 1.7))
    assert mask.boost is not None and mask.boost_weight > 1
    del loader
    close(ds)
    # The round trip itself: a collated batch of worker samples unpickles to the plain batch.
    samples = [{"text": f"t{i}", "label": i, "ted_id": i, "ted_weight": 1.0 + i / 3} for i in range(5)]
    plain = default_collate(samples)
    sent = pickle.loads(ForkingPickler.dumps(default_collate([_WorkerSample(s) for s in samples])))
    assert type(sent) is dict and list(sent) == list(plain) and sent["text"] == plain["text"]
    for key in ("label", "ted_id", "ted_weight"):
        assert sent[key].dtype == plain[key].dtype and torch.equal(sent[key], plain[key])
    sent["ted_id"] += 1  # writable, like the tensor it replaces


def test_a_shared_memory_prefix_taken_by_another_job_is_retried(corpus, monkeypatch):
    """Streaming checks that a prefix is free, then creates it: another job starting at the same
    moment can take it in between (FileExistsError '/NNNNNN_locals'). A single process retries."""
    import streaming.base.dataset as upstream

    real, calls = upstream.get_shm_prefix, []

    def taken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise FileExistsError(17, "File exists", "/000042_locals")
        return real(*args, **kwargs)

    monkeypatch.setattr(upstream, "get_shm_prefix", taken_once)
    ds = dataset(corpus)
    assert len(calls) == 2 and len(list(ds)) == ds.num_samples
    close(ds)

    def always_taken(*args, **kwargs):
        raise FileExistsError(17, "File exists", "/000042_locals")

    monkeypatch.setattr(upstream, "get_shm_prefix", always_taken)
    monkeypatch.setattr("ted_stream.loaders.streaming._PREFIX_RETRIES", 1)
    with pytest.raises(RuntimeError, match=r"prefix /000042_locals was taken by another job .* start this job again"):
        dataset(corpus)
