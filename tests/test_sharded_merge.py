"""The sharded score merge (Pruner.sync) against the all-gather merge it replaced: 2 and 4 gloo
ranks (4 as two nodes of two, each node with its own table file) end every epoch with the
all-gather's tables and bit-identical masks on every rank."""
import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from conftest import free_port

N = 5_000


def _rank_main(rank, world, port, out):
    import torch.distributed as dist

    from ted_stream import TEDConfig
    from ted_stream.dist import all_gather_records
    from ted_stream.policy import select
    from ted_stream.pruner import Pruner
    from ted_stream.table import ScoreTable

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=1, seed=3)
    fp = {"digest": "5" * 64, "num_samples": N}
    per_node = 2 if world == 4 else world
    path = os.path.join(out, f"node{rank // per_node}", "table.tedt")
    pruner = Pruner(path, fp, cfg, leader=rank % per_node == 0)
    old = ScoreTable(N, fp, cfg.ema)  # the all-gather merge's table, on this rank

    def choose(table, epoch):
        return select(cfg, table, epoch, granule=world * 4)

    result = {}
    for epoch in range(4):
        mask = pruner.freeze(epoch, choose)
        old.epoch = epoch
        old.masks[epoch] = choose(old, epoch) if epoch not in old.masks else old.masks[epoch]
        result[f"keep{epoch}"], result[f"old_keep{epoch}"] = mask.to_bytes(), old.masks[epoch].to_bytes()
        result[f"scores{epoch}"], result[f"old_scores{epoch}"] = pruner.table.scores.copy(), old.scores.copy()
        result[f"updated{epoch}"], result[f"old_updated{epoch}"] = pruner.table.updated.copy(), old.updated.copy()
        rng = np.random.default_rng([rank, epoch])
        for _flush in range(2):  # two flushes an epoch; uneven counts, repeated ids (upstream padding)
            ids = rng.integers(0, N, rng.integers(0, 3 * N // world))
            vals = rng.standard_normal(len(ids)).astype(np.float32) * (1 + rank)
            pruner.record(ids, vals)
            for rank_ids, rank_vals in all_gather_records(ids, vals, N):
                old.record(rank_ids, rank_vals)
            pruner.sync()
    np.savez(os.path.join(out, f"rank{rank}.npz"), **result)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_merge_matches_the_all_gather(tmp_path, world):
    mp.spawn(_rank_main, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    pruned = 0
    for epoch in range(4):
        reference = ranks[0][f"old_keep{epoch}"]
        for got in ranks:
            assert got[f"old_keep{epoch}"].tobytes() == reference.tobytes()  # the all-gather agrees with itself
            assert got[f"keep{epoch}"].tobytes() == reference.tobytes()
            np.testing.assert_array_equal(got[f"scores{epoch}"], got[f"old_scores{epoch}"])
            np.testing.assert_array_equal(got[f"updated{epoch}"], got[f"old_updated{epoch}"])
        keep = np.unpackbits(reference[: (N + 7) // 8], bitorder="little", count=N)
        pruned += N - int(keep.sum())
    assert pruned > 0 and (ranks[0]["scores3"] != 0).any()
