"""start_epoch is collective: two gloo ranks end with identical tables and bit-identical masks."""
import os

import numpy as np
import torch.multiprocessing as mp

from conftest import free_port, make_corpus


def _rank_main(rank, folder, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("LOCAL_WORLD_SIZE", None)  # as under the deepspeed launcher
    import torch.distributed as dist

    from ted_stream import TEDConfig, TEDStreamingDataset
    from ted_stream.table import ScoreTable

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = TEDStreamingDataset(local=folder, batch_size=4, shuffle=True,
                             ted=TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=0, seed=rank * 0))
    ds.start_epoch(0)
    ids = np.array([s["ted_id"] for s in ds])  # this rank's half of the epoch
    # Each rank scores only its own samples; rank 1 adds a rank-dependent twist so that a
    # missing merge would show up as different tables.
    ds.record(ids, ids * (1.0 + rank))
    ds.save_table()  # a checkpoint mid-run: merges both ranks' scores before writing
    dist.barrier()
    scored_on_disk = int(ScoreTable.load(ds.table_path).scored.sum())
    mask = ds.start_epoch(1)
    kept = np.array([s["ted_id"] for s in ds])
    np.savez(os.path.join(out, f"rank{rank}.npz"), ids=ids, kept=kept, keep=mask.keep,
             scores=ds.table.scores, updated=ds.table.updated, lws=ds._unique_rank_world.ranks_per_node,
             lws_env=os.environ.get("LOCAL_WORLD_SIZE", "unset"), scored_on_disk=scored_on_disk)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_share_scores_and_mask(tmp_path):
    folder = make_corpus(tmp_path / "data", 200)
    mp.spawn(_rank_main, args=(folder, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    assert int(r0["lws"]) == 2  # streaming's node size derived from LOCAL_SIZE
    assert str(r0["lws_env"]) == "unset"  # without writing the process's environment
    assert len(set(r0["ids"]) & set(r1["ids"])) == 0
    assert sorted(np.concatenate([r0["ids"], r1["ids"]])) == list(range(200))
    np.testing.assert_array_equal(r0["keep"], r1["keep"])
    np.testing.assert_array_equal(r0["scores"], r1["scores"])
    assert (r0["updated"] > 0).all()
    assert int(r0["scored_on_disk"]) == int(r1["scored_on_disk"]) == 200
    keep = np.unpackbits(r0["keep"], bitorder="little", count=200).astype(bool)
    assert keep.sum() == 104  # 100 rounded up to a multiple of 2 ranks x batch 4
    kept = np.concatenate([r0["kept"], r1["kept"]])
    assert len(r0["kept"]) == len(r1["kept"]) == 52
    assert sorted(kept) == np.flatnonzero(keep).tolist()


def test_collectives_use_the_backends_device(monkeypatch):
    """NCCL only reduces CUDA tensors (the first GPU run crashed on a CPU tensor); gloo CPU ones."""
    import torch

    from ted_stream import dist as ted_dist

    monkeypatch.setattr(ted_dist.dist, "get_backend", lambda *a: "gloo")
    assert ted_dist.collective_device() == torch.device("cpu")
    monkeypatch.setattr(ted_dist.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ted_dist.collective_device() == torch.device("cuda", 3)


def _gather_main(rank, port, out):
    import torch.distributed as dist

    from ted_stream.dist import all_gather_records

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    # Uneven counts (rank 1 scored nothing in the first case), repeated ids, scores that
    # float32 holds exactly, ids at the top of each width's range.
    for name, num_samples, ids in [("narrow", 2**31, [[2**31 - 1, 0, 5, 5], []]),
                                   ("wide", 2**40, [[2**40 - 1, 3], [2**33 + 7]])]:
        mine = np.array(ids[rank], np.int64)
        vals = (np.arange(len(mine), dtype=np.float32) + 0.25) * (rank + 1)
        for r, (got_ids, got_vals) in enumerate(all_gather_records(mine, vals, num_samples)):
            results[f"{name}{r}_ids"], results[f"{name}{r}_vals"] = got_ids, got_vals
    np.savez(os.path.join(out, f"gather{rank}.npz"), **results)
    dist.destroy_process_group()


def test_all_gather_records_round_trips_every_ranks_records(tmp_path):
    from ted_stream.dist import record_bytes

    assert record_bytes(2**31) == 8 and record_bytes(2**31 + 1) == 12
    mp.spawn(_gather_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = {"narrow": [[2**31 - 1, 0, 5, 5], []], "wide": [[2**40 - 1, 3], [2**33 + 7]]}
    for rank in range(2):
        got = np.load(tmp_path / f"gather{rank}.npz")
        for name, per_rank in expected.items():
            for r, ids in enumerate(per_rank):
                assert got[f"{name}{r}_ids"].dtype == np.int64 and got[f"{name}{r}_ids"].tolist() == ids
                assert got[f"{name}{r}_vals"].tolist() == [(i + 0.25) * (r + 1) for i in range(len(ids))]
