"""Drop-in compatibility: with nothing scored, TEDStreamingDataset yields what StreamingDataset
yields, scenario by scenario; plus elastic resumption and static filters with pruning on."""
import functools
import gc
import logging
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.batching import generate_work
from streaming.base.world import World

from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream import filter as sample_filters
from ted_stream.loaders.remote import table_home
from ted_stream.prepare import write_mds
from ted_stream.table import ScoreTable

BATCH = 4
# Prunes half the data from epoch 1 on: with nothing scored, it must change nothing.
CFG = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, explore=0.1, seed=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three small MDS streams (one in a split subfolder) with unique texts."""
    root = tmp_path_factory.mktemp("compat")
    for name, n in (("a", 300), ("b", 130), ("c/train", 90)):
        write_mds(({"text": f"{name}-{i}", "label": i % 3} for i in range(n)), str(root / name), size_limit=1200)
    return root


# stream layouts: each a function of the data folder returning StreamingDataset kwargs
LAYOUTS = {
    "one": lambda d: {"local": str(d / "a")},
    "split": lambda d: {"local": str(d / "c"), "split": "train"},
    "two": lambda d: {"streams": [Stream(local=str(d / "a")), Stream(local=str(d / "b"))]},
    "epoch_size": lambda d: {"local": str(d / "a"), "epoch_size": 410},
    "proportion": lambda d: {"streams": [Stream(local=str(d / "a"), proportion=0.6),
                                         Stream(local=str(d / "b"), proportion=0.4)], "epoch_size": 500},
    "repeat": lambda d: {"streams": [Stream(local=str(d / "a"), repeat=0.5), Stream(local=str(d / "b"), repeat=2.5)]},
    "choose": lambda d: {"streams": [Stream(local=str(d / "a"), choose=170),
                                     Stream(local=str(d / "c"), split="train", choose=200)]},
    "fixed": lambda d: {"streams": [Stream(local=str(d / "a"), repeat=0.7), Stream(local=str(d / "b"))],
                        "sampling_method": "fixed"},
}
METHODS = ["random", "stratified", "per_stream", "device_per_stream"]
SHUFFLES = [None, "py1e", "py1s", "py1br", "py2s", "naive"]
WORLDS = [World(1, 1, 1, 0), World(1, 2, 3, 0), World(2, 2, 2, 0)]


def make(cls, d, layout, **kw):
    kw = {"batch_size": BATCH, "num_canonical_nodes": 2, **LAYOUTS[layout](d), **kw}
    if cls is TEDStreamingDataset:
        kw["ted"] = CFG
    return cls(**kw)


def cases():
    # every method with every layout, and every shuffle algorithm, without the full product
    for i, method in enumerate(METHODS):
        for j, layout in enumerate(LAYOUTS):
            yield method, layout, SHUFFLES[(i + j) % len(SHUFFLES)]


@pytest.mark.parametrize("method,layout,algo", list(cases()))
def test_generate_work_is_upstreams(data, method, layout, algo):
    """streaming's own simulation of nodes x ranks x workers, epochs 0-2 (1 and 2 'prune'),
    from the start and from mid-epoch: bit-identical work tensors."""
    kw = {"batching_method": method, "shuffle": algo is not None, "shuffle_algo": algo or "py1e",
          "shuffle_block_size": 256}
    up, ted = make(StreamingDataset, data, layout, **kw), make(TEDStreamingDataset, data, layout, **kw)
    assert len(ted) == len(up) and ted.epoch_size == up.epoch_size
    for epoch in range(3):
        for world in WORLDS:
            for offset in (0, 3 * world.num_ranks * BATCH):
                want = generate_work(method, up, world, epoch, offset)
                np.testing.assert_array_equal(generate_work(method, ted, world, epoch, offset), want)
    del up, ted
    gc.collect()


def texts(loader, stop_after=None):
    out, state = [], None
    for i, batch in enumerate(loader):
        out.append(list(batch["text"]))
        if stop_after is not None and i + 1 == stop_after:
            state = loader.state_dict()
            break
    return out, state if stop_after is not None else loader.state_dict()


def run(cls, d, layout, workers, persistent, remote, cache, stop_after):
    """Three plain `for batch in loader` epochs (no start_epoch), then a fresh instance resumes
    from a checkpoint taken mid-epoch 3. Returns every batch's texts and the state dict."""
    kw = {"shuffle": True, "batching_method": "random"}
    if remote:  # the layout's folder as the remote, a fresh cache per instance
        kw.update(remote=LAYOUTS[layout](d)["local"], local=str(cache / cls.__name__ / "run1"))
    ds = make(cls, d, layout, **kw)
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=persistent)
    epochs = [texts(loader)[0] for _ in range(3)]
    head, state = texts(loader, stop_after)
    del loader, ds
    gc.collect()
    if remote:
        kw["local"] = str(cache / cls.__name__ / "run2")
    again = make(cls, d, layout, **kw)
    loader = StreamingDataLoader(again, batch_size=BATCH, num_workers=workers, persistent_workers=persistent)
    loader.load_state_dict(state)
    rest = texts(loader)[0]
    del loader, again
    gc.collect()
    return epochs, head, rest, state


@pytest.mark.parametrize("layout,workers,persistent,remote,stop_after", [
    ("one", 0, False, False, 5), ("proportion", 2, False, False, 5), ("repeat", 2, True, False, 5),
    ("one", 2, False, True, 5), ("two", 2, False, False, None)])
def test_loader_epochs_and_resume_are_upstreams(data, tmp_path, layout, workers, persistent, remote, stop_after):
    """stop_after=None: the checkpoint is taken after the whole epoch 3."""
    up = run(StreamingDataset, data, layout, workers, persistent, remote, tmp_path, stop_after)
    ted = run(TEDStreamingDataset, data, layout, workers, persistent, remote, tmp_path, stop_after)
    assert ted[:3] == up[:3]  # epochs, the head of epoch 3 and its resumed rest
    assert up[0][0] != up[0][1]  # each epoch shuffled anew: the streams compared are not trivial
    assert (len(up[2]) > 0) == (stop_after is not None)  # mid-epoch: a rest; at the end: none
    ted_state = dict(ted[3])
    assert ted_state.pop("ted")["epoch"] == 3
    assert ted_state == up[3]


def test_mixture_and_remote_table_homes(data, tmp_path, caplog):
    """Several streams get a table beside the first stream, named by the mixture's fingerprint;
    with a remote, save_table uploads it there and a new cache downloads it."""
    ds = make(TEDStreamingDataset, data, "proportion")
    digest = ds.table.fingerprint["digest"]
    assert ds.table_path == os.path.join(data, "a", "ted", f"mix-{digest[:16]}", "table.tedt")
    remote = tmp_path / "remote"
    shutil.copytree(data / "a", remote)
    shutil.rmtree(remote / "ted")
    ds = TEDStreamingDataset(remote=str(remote), local=str(tmp_path / "cache1"), batch_size=BATCH, ted=CFG)
    assert ds.table_path == str(tmp_path / "cache1" / "ted" / "table.tedt")
    ds.record(np.arange(10), np.arange(10.0))
    ds.save_table()
    assert ScoreTable.load(str(remote / "ted" / "table.tedt")).scored.sum() == 10
    assert sorted(os.listdir(tmp_path / "cache1" / "ted")) == [".ted-job.lock", "table.tedt"]  # no staging or download left
    del ds
    gc.collect()
    again = TEDStreamingDataset(remote=str(remote), local=str(tmp_path / "cache2"), batch_size=BATCH, ted=CFG)
    assert again.table.scored.sum() == 10
    again.record(np.arange(10, 30), np.arange(20.0))
    again.save_table()
    del again
    gc.collect()
    # the first cache's copy is stale now: the remote copy replaces it
    again = TEDStreamingDataset(remote=str(remote), local=str(tmp_path / "cache1"), batch_size=BATCH, ted=CFG)
    assert again.table.scored.sum() == 30
    again.save_table()  # the local copy is the installed one: no "rewritten by another process"
    mix = [SimpleNamespace(remote="s3://bucket/a", local="/cache/a", split="train"),
           SimpleNamespace(remote=None, local="/data/b", split=None)]
    assert table_home(mix, digest) == (f"/cache/a/train/ted/mix-{digest[:16]}",
                                       f"s3://bucket/a/train/ted/mix-{digest[:16]}")
    sftp = SimpleNamespace(remote="sftp://host/data", local=str(tmp_path / "x"), split=None)  # no uploader
    with caplog.at_level(logging.WARNING):  # the table stays in the local cache, and says so
        assert table_home([sftp], digest) == (str(tmp_path / "x" / "ted"), None)
    assert "cannot upload to sftp://, so the score table is kept in the local cache only" in caplog.text
    del again
    gc.collect()


def scored(ds, world):
    """Epoch 0 in-process with scores for every sample, then epoch 1 frozen for ``world``."""
    ds._parallel_rank_world = world
    ids = np.arange(ds.num_samples)
    ds.record(ids, np.sin(ids * 1.7))
    ds.next_epoch = 1  # epoch 0 (warm-up) done
    return ds.start_epoch(1)


def consumed(work, steps):
    """Sample ids a job of ``work``'s shape consumed in ``steps`` batches per rank: the loader takes
    batch i of a rank from worker i % workers."""
    nodes, ranks, workers = work.shape[:3]
    out = [work[n, r, i % workers, i // workers] for n in range(nodes) for r in range(ranks) for i in range(steps)]
    return np.concatenate(out)


@pytest.mark.parametrize("before,after", [(World(1, 2, 2, 0), World(1, 1, 2, 0)),
                                          (World(1, 1, 1, 0), World(1, 2, 1, 0)),
                                          (World(1, 2, 1, 0), World(2, 2, 1, 0))])
def test_elastic_resume_with_pruning(data, tmp_path, before, after):
    """A checkpoint taken on N ranks mid-epoch resumes on M: the rest of the epoch is the same set
    of samples, and the next mask is the one the uninterrupted run freezes. (Upstream promises this
    for `random` batching only: the other methods depend on the global batch size.)"""
    method = "random"
    kw = {"shuffle": True, "batching_method": method, "shuffle_block_size": 256}
    ds = make(TEDStreamingDataset, data, "proportion", table_dir=str(tmp_path / "t1"), **kw)
    scored(ds, before)
    ds.next_epoch = 2  # epoch 1 in progress
    full = generate_work(method, ds, before, 1, 0)
    steps = 3
    k = steps * before.num_ranks * BATCH
    head = consumed(full, steps)
    state = ds.state_dict(k, True)
    shutil.copytree(tmp_path / "t1", tmp_path / "t2")
    other = make(TEDStreamingDataset, data, "proportion", table_dir=str(tmp_path / "t2"), **kw)
    other._parallel_rank_world = after
    other.load_state_dict(state)
    assert other.upcoming_epoch() == 1  # as a worker does: take the checkpoint's epoch and nodes
    rest = generate_work(method, other, after, 1, k)
    uninterrupted = generate_work(method, ds, before, 1, k)  # the N-rank job going on
    assert set(rest[rest >= 0].tolist()) == set(uninterrupted[uninterrupted >= 0].tolist())
    assert set(head.tolist()) | set(rest[rest >= 0].tolist()) == set(full[full >= 0].tolist())
    assert ds.table.masks[1].keeps(rest[rest >= 0]).all() and len(head) == k
    # epoch 2: both score the same samples, then freeze; the masks must be identical
    for d in (ds, other):
        d.record(np.arange(60), np.cos(np.arange(60.0)))
        d.next_epoch = 2
    assert ds.start_epoch(2).crc == other.start_epoch(2).crc
    del ds, other
    gc.collect()


def no_label_zero(sample):
    return sample["label"] != 0


@pytest.mark.parametrize("method", METHODS)
def test_filter_composes_with_pruning_and_resumes(data, tmp_path, method, monkeypatch):
    """A predicate filter, evaluated once and cached: every epoch yields only samples it keeps,
    pruning acts on those, and a mid-epoch resume yields exactly the rest."""
    kw = {"shuffle": True, "batching_method": method, "table_dir": str(tmp_path / "t"),
          "sample_filter": no_label_zero}
    calls = []
    evaluate = sample_filters.evaluate
    monkeypatch.setattr(sample_filters, "evaluate", lambda *a: calls.append(a) or evaluate(*a))
    ds = make(TEDStreamingDataset, data, "two", **kw)
    assert len(calls) == 1
    allowed = {i for i in range(ds.num_samples) if ds.get_item(i)["label"] != 0}
    assert set(ds.kept_ids(0).tolist()) == allowed
    ds.start_epoch(0)
    seen0 = [s["ted_id"] for s in ds]
    # every method yields only allowed samples, each once; the stream-wise methods drop the
    # incomplete batches of each stream, as upstream does, so only `random` yields them all
    assert set(seen0) <= allowed and len(seen0) == len(set(seen0)) > 0.8 * len(allowed)
    assert method != "random" or set(seen0) == allowed
    ds.record(seen0, np.sin(np.array(seen0) * 1.7))
    assert len(ds) == len(allowed)  # epoch 1 before it is frozen: the filter alone
    mask = ds.start_epoch(1)
    assert len(ds) == mask.kept
    kept = set(ds.kept_ids(1).tolist())
    assert kept < allowed and len(kept) == mask.kept >= len(allowed) // 2
    loader = StreamingDataLoader(ds, batch_size=BATCH)
    full = [i for b in loader for i in b["ted_id"].tolist()]
    assert set(full) <= kept and len(set(full)) > 0.8 * len(kept)
    # upstream's partition repeats a few samples to pad a stream's share to its canonical nodes
    # when a count does not divide; the stream-wise methods partition each stream on its own
    assert len(full) - len(set(full)) <= (0 if method == "random" else 2 * 3)  # canonical nodes x streams
    assert method != "random" or set(full) == kept
    del loader, ds
    gc.collect()
    again = make(TEDStreamingDataset, data, "two", **kw)
    assert len(calls) == 1  # cached beside the table
    loader = StreamingDataLoader(again, batch_size=BATCH)
    again.next_epoch = 1  # epoch 0 was done by the first instance
    again.start_epoch(1)  # already frozen: keeps its mask
    head, state = [], None
    for i, b in enumerate(loader):
        head += b["ted_id"].tolist()
        if i == 4:
            state = loader.state_dict()
            break
    assert head == full[:len(head)]
    del loader, again
    gc.collect()
    third = make(TEDStreamingDataset, data, "two", **kw)
    loader = StreamingDataLoader(third, batch_size=BATCH)
    loader.load_state_dict(state)
    third.start_epoch(1)
    assert head + [i for b in loader for i in b["ted_id"].tolist()] == full
    del loader, third
    gc.collect()


def test_keep_list_filter(data, tmp_path):
    ds = make(TEDStreamingDataset, data, "one", sample_filter=np.arange(0, 300, 3), ted_keys="always")
    assert sorted(s["ted_id"] for s in ds) == list(range(0, 300, 3))
    with pytest.raises(ValueError, match=r"keep-list holds ids in \[0, 300\]: expected ids in \[0, 300\)"):
        make(TEDStreamingDataset, data, "one", sample_filter=[0, 300])
    with pytest.raises(ValueError, match=r"sample_filter=<function .*<lambda> at .*> keeps none of the 300 samples"):
        make(TEDStreamingDataset, data, "one", sample_filter=lambda s: False, table_dir=str(tmp_path))
    del ds
    gc.collect()


THRESHOLD = 1


def above_threshold(sample):
    return sample["label"] > THRESHOLD


def test_predicate_identity_follows_what_it_computes(monkeypatch):
    """The cache key changes with the code, a captured value or a global the predicate reads."""
    first = sample_filters.predicate_identity(above_threshold)
    assert sample_filters.predicate_identity(above_threshold) == first
    monkeypatch.setitem(above_threshold.__globals__, "THRESHOLD", 2)
    assert sample_filters.predicate_identity(above_threshold) != first
    captured = [sample_filters.predicate_identity(lambda s, k=k: s["label"] > k) for k in (1, 2)]
    assert captured[0] != captured[1]
    with pytest.raises(ValueError, match=r"sample_filter=functools.partial\(.*\) has no __code__"):
        sample_filters.predicate_identity(functools.partial(above_threshold))


def _rank_main(rank, folder, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = TEDStreamingDataset(local=folder, batch_size=BATCH, shuffle=True, ted=CFG, ted_keys="always")
    loader = StreamingDataLoader(ds, batch_size=BATCH)  # workers agreeing: test_dataset.py
    ids0 = [i for b in loader for i in b["ted_id"].tolist()]  # epoch 0, this rank's half
    ds.record(ids0, np.sin(np.array(ids0) * 1.7))
    ds.save_table()  # merges both ranks' scores, then persists: what epoch 1 freezes from
    ids1 = [i for b in loader for i in b["ted_id"].tolist()]  # epoch 1: no start_epoch anywhere
    crc = loader.state_dict()["ted"]["mask_crc"]
    ds.save_table()
    np.savez(os.path.join(out, f"rank{rank}.npz"), ids0=ids0, ids1=ids1, crc=crc)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_freeze_the_same_mask_without_start_epoch(tmp_path):
    """Real gloo ranks: the implicit freeze of epoch 1 gives every rank the same mask, with no
    collective of its own."""
    import socket

    import torch.multiprocessing as mp

    folder = str(tmp_path / "data")
    write_mds(({"text": f"s{i}", "label": i % 3} for i in range(200)), folder, size_limit=1200)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(folder, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    assert sorted(np.concatenate([r0["ids0"], r1["ids0"]]).tolist()) == list(range(200))
    table = ScoreTable.load(os.path.join(folder, "ted", "table.tedt"))
    assert table.scored.all() and int(r0["crc"]) == int(r1["crc"]) == table.masks[1].crc
    ids1 = np.concatenate([r0["ids1"], r1["ids1"]])
    assert len(set(r0["ids1"]) & set(r1["ids1"])) == 0
    assert sorted(ids1.tolist()) == np.flatnonzero(
        np.unpackbits(table.masks[1].keep, bitorder="little", count=200)).tolist()
    assert 96 <= len(ids1) < 200  # half of it pruned, rounded up to 2 ranks x batch
