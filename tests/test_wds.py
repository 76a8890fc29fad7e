"""TEDWebDataset on real tar shards written by webdataset: indexing, both read paths, resume."""
import gzip
import io
import json
import os
import re
import tarfile
import warnings

import numpy as np
import pytest
import torch.multiprocessing as mp
import webdataset as wds
from torch.utils.data import DataLoader

from conftest import free_port
from ted_stream import TEDConfig, TableError
from ted_stream import cli
from ted_stream.loaders import wds_index
from ted_stream.loaders.wds import CorruptSampleWarning, TEDWebDataset, TEDWebLoader
from ted_stream.policy import select
from ted_stream.loaders.wds_index import CorruptSample, ManifestError, WdsIndex, index_shards

SHARDS, PER_SHARD, BATCH = 6, 40, 4
N = SHARDS * PER_SHARD
CFG = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, explore=0.1, seed=3)


def write_tars(folder, shards=SHARDS, per_shard=PER_SHARD):
    """``shards`` tar shards of ``per_shard`` samples (txt + cls + json), as webdataset writes them."""
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(os.path.join(folder, f"data-{s:06d}.tar")) as w:
            for j in range(per_shard):
                n = s * per_shard + j
                w.write({"__key__": f"k{n:05d}", "txt": f"sample {n} " + "x" * (n % 97), "cls": str(n % 3),
                         "json": json.dumps({"n": n}).encode()})
    return os.path.join(str(folder), "data-{000000..%06d}.tar" % (shards - 1))


@pytest.fixture
def shards(tmp_path):
    pattern = write_tars(tmp_path / "data")
    index_shards(pattern)
    return pattern


def decoder(sample):
    return {"n": json.loads(sample["json"])["n"], "txt": sample["txt"].decode(), "cls": int(sample["cls"])}


def dataset(shards, **kw):
    kw.setdefault("ted", CFG)
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("decode", decoder)
    return TEDWebDataset(shards, **kw)


def scored(shards, **kw):
    """Epoch 0 on all data, every sample scored; the table saved for the other 'ranks'."""
    ds = dataset(shards, **kw)
    ds.start_epoch(0)
    ids = np.arange(N)
    ds.record(ids, np.sin(ids * 1.7))
    ds.save_table()
    return ds


def exact_epoch(ds, workers=0):
    """This rank's batches of the current epoch through a DataLoader, as lists of ids."""
    loader = DataLoader(ds, batch_size=BATCH, sampler=ds.sampler, num_workers=workers)
    return [b["ted_id"].tolist() for b in loader]


# ---- indexing ------------------------------------------------------------------------------------
def test_index_gives_dense_ids_and_exact_bytes(shards, capsys):
    index = WdsIndex.open(shards)
    assert index.num_samples == N
    for sample_id in (0, 39, 40, 123, N - 1):
        raw = index.read(sample_id)
        assert raw["__key__"] == f"k{sample_id:05d}" and raw["__shard__"] == f"data-{sample_id // PER_SHARD:06d}.tar"
        assert raw["txt"] == (f"sample {sample_id} " + "x" * (sample_id % 97)).encode()
        assert json.loads(raw["json"]) == {"n": sample_id}
    with pytest.raises(IndexError, match=f"expected \\[0, {N}\\)"):
        index.read(N)
    # the command line: a brace pattern, same manifest, same fingerprint
    assert cli.main(["index", shards]) == 0
    assert f"indexed {N} samples in {SHARDS} shards" in capsys.readouterr().out
    assert WdsIndex.open(shards).fingerprint == index.fingerprint
    assert WdsIndex.open(os.path.dirname(shards)).fingerprint == index.fingerprint  # the folder form


def test_prepare_format_wds_writes_indexed_shards_and_an_empty_table(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i}", "label": i % 2}) + "\n" for i in range(50)))
    out = str(tmp_path / "out")
    assert cli.main(["prepare", str(corpus), out, "--format", "wds", "--shard-size", "4096"]) == 0
    assert "wrote 50 samples" in capsys.readouterr().out
    ds = TEDWebDataset(out, ted=CFG, decode=lambda raw: json.loads(raw["json"]))
    assert len(ds.index.shards) > 1 and ds.table.scored.sum() == 0  # several shards, an empty table
    assert ds.table.fingerprint == ds.index.fingerprint
    assert [ds[i]["text"] for i in (0, 49)] == ["line 0", "line 49"]
    assert cli.main(["prepare", str(corpus), out, "--format", "wds"]) == 2  # never into a used folder
    assert "is not empty" in capsys.readouterr().err


def test_manifest_refuses_added_removed_and_changed_shards(tmp_path, shards):
    folder = os.path.dirname(shards)
    scored(shards)  # a table bound to this fingerprint
    extra = os.path.join(folder, "data-000006.tar")
    write_tars(tmp_path / "more", shards=7)
    os.rename(str(tmp_path / "more" / "data-000006.tar"), extra)
    with pytest.raises(ManifestError, match="data-000006.tar.*added after indexing"):
        WdsIndex.open(folder)
    with pytest.raises(ManifestError, match="data-000006.tar.*added after indexing"):
        WdsIndex.open(shards[:-len("000005}.tar")] + "000006}.tar")
    os.unlink(extra)
    victim = os.path.join(folder, "data-000002.tar")
    os.rename(victim, victim + ".moved")
    with pytest.raises(ManifestError, match=r"\['data-000002.tar'\].*removed"):
        WdsIndex.open(shards)
    os.rename(victim + ".moved", victim)
    # the same bytes with a new mtime (a copy on another node) are the same shard
    os.utime(victim, ns=(1, 1))
    assert WdsIndex.open(shards).num_samples == N
    # one byte changed inside a sample, same size: found by the content digest
    with open(victim, "r+b") as f:
        data = f.read()
        at = data.index(b"sample 85 ")
        f.seek(at)
        f.write(b"S")
    changed = r"shard data-000002.tar .* changed after indexing \(same size, but its SHA-256 differs"
    with pytest.raises(ManifestError, match=changed):
        TEDWebDataset(shards, ted=CFG)
    # re-indexed, the shards are another dataset: the old table is refused, not silently reused
    index_shards(shards)
    with pytest.raises(TableError, match="belongs to another dataset"):
        TEDWebDataset(shards, ted=CFG)


def _tar_with(path, members):
    with tarfile.open(path, "w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)


def test_no_member_path_leads_outside_the_folder(tmp_path):
    evil = tmp_path / "shards"
    evil.mkdir()
    bad = tarfile.TarInfo("../escaped.txt")
    bad.size = 1
    _tar_with(str(evil / "a.tar"), [bad])
    with pytest.raises(ValueError, match=r"shard a.tar: member '../escaped.txt' points outside"):
        index_shards(str(evil))
    link = tarfile.TarInfo("k1.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    _tar_with(str(evil / "a.tar"), [link])
    with pytest.raises(ValueError, match="is a link to '../../etc/passwd'"):
        index_shards(str(evil))
    # writing: a key that would climb out of the shard's folder is refused before anything is written
    out = tmp_path / "written"
    with pytest.raises(ValueError, match=r"__key__='../escaped' is not a plain name"):
        wds_index.write_shards(iter([{"__key__": "../escaped", "text": "hi"}]), str(out))
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # nothing written, the partial folder removed
    assert sorted(os.listdir(evil)) == ["a.tar"]  # no manifest either


def test_compressed_shards_are_refused(tmp_path):
    good = tarfile.TarInfo("k1.txt")
    good.size = 1
    _tar_with(str(tmp_path / "plain"), [good])
    os.mkdir(tmp_path / "shards")
    with open(tmp_path / "plain", "rb") as f, gzip.open(tmp_path / "shards" / "a.tar", "wb") as z:
        z.write(f.read())  # webdataset streams it; offsets into it would be meaningless
    with pytest.raises(ValueError, match="shard a.tar is compressed: expected an uncompressed tar"):
        index_shards(str(tmp_path / "shards"))


# ---- the exact path ----------------------------------------------------------------------------
def test_exact_path_every_kept_id_once_across_ranks_and_workers(shards):
    scored(shards)
    world = 3
    per_rank, masks = [], []
    for rank in range(world):
        ds = dataset(shards, rank=rank, world_size=world)
        masks.append(ds.start_epoch(1))
        per_rank.append(exact_epoch(ds, workers=2))
    expected = select(CFG, ds.table, 1, world * BATCH)  # the policy's own mask, through the table
    assert all(m.crc == expected.crc for m in masks)
    kept = ds.kept_ids(1)
    assert 0 < len(kept) < N
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts on every rank
    served = [i for batches in per_rank for b in batches for i in b]
    assert set(served) == set(kept.tolist())  # pruned ids never reach the model
    counts = np.bincount(served, minlength=N)[kept]
    pad = -len(kept) % world
    assert (counts >= 1).all() and counts.sum() == len(kept) + pad  # once each, pads are kept ids
    assert (counts == 2).sum() == pad


def test_shard_blocks_prune_whole_tar_shards_of_any_size(tmp_path):
    """block="shard" takes the blocks from the shard index: tars of different sample counts are
    each kept or pruned whole (but for the one the granule partly restores)."""
    sizes = [10, 55, 30, 70, 25, 50, 45, 15]
    for s, size in enumerate(sizes):
        write_tars(tmp_path / "data" / f"part{s}", shards=1, per_shard=size)
        os.rename(tmp_path / "data" / f"part{s}" / "data-000000.tar", tmp_path / "data" / f"data-{s:06d}.tar")
    pattern = str(tmp_path / "data" / "data-{000000..000007}.tar")
    index_shards(pattern)
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, block="shard")
    ds = dataset(pattern, ted=cfg)
    ds.start_epoch(0)
    ds.record(np.arange(sum(sizes)), np.sin(np.arange(sum(sizes)) * 1.7))
    mask = ds.start_epoch(1)
    read = np.add.reduceat(mask.bools().astype(np.int64), np.cumsum(sizes) - sizes)
    assert ((read > 0) & (read < sizes)).sum() <= 1 and 2 <= (read == 0).sum() <= 6


def test_exact_path_reads_only_kept_bytes(shards, monkeypatch):
    ds = scored(shards)
    ds.start_epoch(1)
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(
        (os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), off, n)) or real(fd, n, off))
    served = {i for b in exact_epoch(ds) for i in b}
    index = ds.index
    spans = {(name, start, end - start): i for i in range(N) for name, start, end in [index.span(i)]}
    read_ids = {spans[r] for r in reads}  # every read is exactly one sample's span
    assert read_ids == served == set(ds.kept_ids(1).tolist())
    assert len(reads) == len(ds.sampler)


def test_weights_follow_the_mask(shards):
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, explore=0.5, rescale=True, seed=1)
    ds = scored(shards, ted=cfg, table_dir=os.path.join(os.path.dirname(shards), "t2"))
    mask = ds.start_epoch(1)
    assert mask.boost is not None
    for i in ds.kept_ids(1)[:40]:
        sample = ds[(1, int(i))]
        assert sample["ted_weight"] == pytest.approx(float(mask.weights([i])[0]))
        assert sample["n"] == sample["ted_id"] == i


def test_exact_mid_epoch_resume(shards):
    scored(shards)
    ds = dataset(shards, rank=1, world_size=2)
    ds.start_epoch(1)
    full = [i for b in exact_epoch(ds, workers=2) for i in b]
    ds = dataset(shards, rank=1, world_size=2)
    ds.start_epoch(1)
    loader = DataLoader(ds, batch_size=BATCH, sampler=ds.sampler, num_workers=2)
    first = []
    for step, batch in enumerate(loader):
        first += batch["ted_id"].tolist()
        if step == 4:
            state = json.loads(json.dumps(ds.state_dict(samples_in_epoch=len(first))))  # JSON, no pickle
            break
    del loader
    resumed = dataset(shards, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.start_epoch(1)  # a frozen epoch keeps its mask and the resume point
    rest = [i for b in exact_epoch(resumed, workers=2) for i in b]
    assert first + rest == full
    assert [i for b in exact_epoch(resumed) for i in b] == full  # the next pass is a whole epoch again
    with pytest.raises(ValueError, match="world_size=2, this dataset 3"):
        dataset(shards, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="samples_in_epoch=999 is invalid"):
        resumed.state_dict(999)


def test_persistent_workers_read_later_masks_from_the_table(shards):
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, explore=0.5, rescale=True, seed=2)
    ds = scored(shards, ted=cfg)
    loader = DataLoader(ds, batch_size=BATCH, sampler=ds.sampler, num_workers=2, persistent_workers=True)
    for epoch in (1, 2):  # the workers were forked in epoch 1, before the mask of epoch 2 existed
        mask = ds.start_epoch(epoch)
        batches = list(loader)
        served = [i for b in batches for i in b["ted_id"].tolist()]
        assert served == ds.rank_ids(epoch).tolist()
        weights = np.concatenate([b["ted_weight"].numpy() for b in batches])
        np.testing.assert_allclose(weights, mask.weights(served))
    assert ds.kept_ids(1).tolist() != ds.kept_ids(2).tolist()


def test_iterating_without_start_epoch_says_what_to_call(shards):
    ds = dataset(shards)
    with pytest.raises(RuntimeError, match=r"call start_epoch\(epoch\)"):
        exact_epoch(ds)


def test_corrupt_member_is_reported_and_the_epoch_goes_on(shards):
    ds = dataset(shards)
    ds.start_epoch(0)  # all data: 240 samples
    index = ds.index
    victim = 47
    header_at = index.members(victim)[0][1] - 512  # the first member's header block
    with open(os.path.join(index.folder, index.span(victim)[0]), "r+b") as f:
        f.seek(header_at + 148)  # the header checksum field
        f.write(b"999999")
    decode_victim = 130  # bytes that pass the tar checks but not the decoder
    field, offset, size = next(m for m in index.members(decode_victim) if m[0] == "json")
    with open(os.path.join(index.folder, index.span(decode_victim)[0]), "r+b") as f:
        f.seek(offset)
        f.write(b"{" * size)
    with pytest.raises(CorruptSample, match="shard data-000001.tar, key 'k00047' .*bad tar header"):
        index.read(victim)
    with pytest.warns(CorruptSampleWarning) as caught:
        served = [i for b in exact_epoch(ds) for i in b]
    messages = sorted(str(w.message) for w in caught)
    assert "shard data-000001.tar, key 'k00047' (sample id 47)" in messages[0]
    assert "shard data-000003.tar, key 'k00130' (sample id 130): decode failed: JSONDecodeError" in messages[1]
    assert len(served) == N and 47 not in served and 130 not in served
    assert set(served) == set(range(N)) - {47, 130}  # the rest of the epoch is all there
    assert served.count(48) == 2 and served.count(131) == 2  # replaced by the next kept sample


# ---- the streaming path ------------------------------------------------------------------------
def stream_epoch(ds, workers=2, reader=None):
    pipe = wds.DataPipeline(ds.wds_shards(), reader or wds.tarfile_to_samples(), ds.wds_select(),
                            wds.decode(partial=True), wds.batched(BATCH))
    loader = wds.WebLoader(pipe, batch_size=None, num_workers=workers)
    return [(list(map(int, b["ted_id"])), list(b["ted_weight"]), [int(c) for c in b["cls"]]) for b in loader]


def test_streaming_path_drops_pruned_ids_and_equalises_ranks(shards):
    scored(shards)
    world, per_rank = 2, []
    for rank in range(world):
        ds = dataset(shards, rank=rank, world_size=world, decode=None)
        mask = ds.start_epoch(1)
        per_rank.append(stream_epoch(ds))
    kept = set(ds.kept_ids(1).tolist())
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # equal batch counts
    assert len({sum(len(ids) for ids, _, _ in batches) for batches in per_rank}) == 1  # and samples
    served = [i for batches in per_rank for ids, _, _ in batches for i in ids]
    assert set(served) == kept  # no pruned id; no kept id lost
    for ids, weights, cls in (b for batches in per_rank for b in batches):
        assert weights == pytest.approx(mask.weights(ids).tolist())
        assert cls == [i % 3 for i in ids]  # decoded after the stage, fields intact


def test_streaming_reader_reads_only_kept_samples_and_yields_the_same_batches(shards, monkeypatch):
    scored(shards)
    ds = dataset(shards, rank=1, world_size=2, decode=None)
    ds.start_epoch(1)
    expected = stream_epoch(ds, workers=0)  # webdataset's own tar reader
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    assert stream_epoch(ds, workers=0, reader=ds.wds_read()) == expected
    served = {i for ids, _, _ in expected for i in ids}
    assert len(reads) == len(served)  # one read per kept sample of this rank's shards, none pruned
    assert sum(reads) == sum(end - start for _, start, end in map(ds.index.span, served))


def test_streaming_reader_reports_a_corrupt_sample_and_keeps_rank_counts_equal(shards):
    victim = 47
    index = WdsIndex.open(shards)
    path = os.path.join(index.folder, index.span(victim)[0])
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(index.members(victim)[0][1] - 512 + 148)  # the first member's header checksum
        f.write(b"999999")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot: same size and mtime, so it opens
    counts, served = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rank in range(2):
            ds = dataset(shards, rank=rank, world_size=2, decode=None)
            ds.start_epoch(0)  # all data
            batches = stream_epoch(ds, workers=0, reader=ds.wds_read())
            counts.append(sum(len(ids) for ids, _, _ in batches))
            served += [i for ids, _, _ in batches for i in ids]
    reports = [str(w.message) for w in caught if w.category is CorruptSampleWarning]
    assert len(reports) == 1 and "shard data-000001.tar, key 'k00047' (sample id 47)" in reports[0]
    assert counts[0] == counts[1]  # the corrupt sample's worker padded with one of its own
    assert victim not in served and set(served) == set(range(N)) - {victim}  # the rest is all there


# ---- torch.distributed: one mask for every rank -----------------------------------------------
def _rank_main(rank, pattern, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = dataset(pattern)
    ds.start_epoch(0)
    ids = np.array([i for b in exact_epoch(ds) for i in b])
    ds.record(ids, np.cos(ids * (1.0 + rank)))  # each rank scores only its own samples
    mask = ds.start_epoch(1)  # merges both ranks' scores, rank 0 selects, broadcast
    kept = [i for b in exact_epoch(ds) for i in b]
    np.savez(os.path.join(out, f"rank{rank}.npz"), ids=ids, kept=kept, keep=mask.keep, scores=ds.table.scores)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_share_scores_and_mask(shards, tmp_path):
    # fork: the children skip re-importing torch and webdataset (seconds each on a busy machine)
    mp.start_processes(_rank_main, args=(shards, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    assert sorted(np.concatenate([r0["ids"], r1["ids"]]).tolist()) == list(range(N))
    np.testing.assert_array_equal(r0["keep"], r1["keep"])
    np.testing.assert_array_equal(r0["scores"], r1["scores"])
    keep = np.unpackbits(r0["keep"], bitorder="little", count=N).astype(bool)
    assert len(r0["kept"]) == len(r1["kept"])
    assert sorted(np.concatenate([r0["kept"], r1["kept"]]).tolist()) == np.flatnonzero(keep).tolist()
    assert 0 < keep.sum() < N


def test_docs_example_runs(capsys):
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "webdataset.md")).read()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/webdataset.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert [line.split(":")[1].split(" of")[0] for line in out.splitlines()[:4]] == [
        " kept 256", " kept 128", " kept 128", " kept 256"]
    assert "128 per rank" in out.splitlines()[1]
    assert "streaming epoch 2: 10 batches, 130 served for 128 kept: 49.2% saved (50.0% by the mask)" in out
    assert "resumed epoch 1 with 80 samples left; epoch 2 prunes the same samples: True" in out


def test_docs_training_loop_resumes_exactly(capsys):
    """docs/webdataset.md's second example: TEDProtocol over TEDWebLoader, a checkpoint in the middle
    of a pruned epoch, and a resume that ends with the uninterrupted run's ids and figures."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "webdataset.md")).read()
    code = re.search(r"<!-- test: training-loop -->\n```python\n(.*?)```", doc, re.S).group(1)
    exec(compile(code, "docs/webdataset.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert [int(k) for k in re.findall(r"kept (\d+),", out)] == [256, 128, 128, 256]
    assert "resumed run agrees: True (448 samples after the checkpoint)" in out


def test_loader_refuses_what_the_dataset_decides(shards):
    ds = dataset(shards)
    with pytest.raises(ValueError, match=r"TEDWebLoader got batch_size=3 \(the dataset's is \d+\), shuffle: "
                                         "expected none of them"):
        TEDWebLoader(ds, batch_size=3, shuffle=True)
    assert TEDWebLoader(ds, batch_size=ds.batch_size).batch_size == ds.batch_size  # the dataset's own is fine
    with pytest.raises(TypeError, match="dataset is a list: expected a TEDWebDataset"):
        TEDWebLoader([1, 2])
