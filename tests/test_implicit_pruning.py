"""A score table left by an earlier run never prunes a plain loop silently (issue 24 item 2): the
pruning is logged once per epoch, len(loader) is what comes out, and it can be refused."""
import gc
import logging

import numpy as np
import pytest
from streaming import StreamingDataLoader

from ted_stream import TEDConfig, TEDStreamingDataset

CFG = TEDConfig(target=0.4, warmup_epochs=1, ramp_epochs=1)
BATCH = 8


def earlier_run(corpus):
    ds = TEDStreamingDataset(local=corpus, batch_size=BATCH, ted=CFG)
    ds.record(np.arange(ds.num_samples), np.random.default_rng(0).normal(size=ds.num_samples))
    ds.save_table()
    del ds
    gc.collect()


def plain_loop(ds, epochs=3):
    """A loop that never heard of TED: no start_epoch, no record."""
    loader = StreamingDataLoader(ds, batch_size=BATCH)
    out = []
    for _ in range(epochs):
        promised = len(loader)
        got = [len(b["label"]) for b in loader]
        out.append((promised, len(got), sum(got)))
    return out


def test_a_table_on_disk_prunes_a_plain_loop_loudly_and_len_says_so(corpus, caplog):
    earlier_run(corpus)
    ds = TEDStreamingDataset(local=corpus, batch_size=BATCH, ted=CFG)
    with caplog.at_level(logging.WARNING, logger="ted_stream.loaders.streaming"):
        epochs = plain_loop(ds)
    assert [e[2] for e in epochs] == [600, 360, 360]  # epoch 0 is warm-up, then 40% pruned
    assert all(promised == batches for promised, batches, _ in epochs)  # len(loader) is the truth
    notes = [r.getMessage() for r in caplog.records if "without start_epoch" in r.getMessage()]
    assert len(notes) == 2 and notes[0].startswith("epoch 1: pruning 240 of 600 samples without start_epoch(1)")
    assert "implicit_pruning=False" in notes[0] and "600 samples scored" in notes[0]


def test_implicit_pruning_can_be_refused(corpus, caplog):
    earlier_run(corpus)
    ds = TEDStreamingDataset(local=corpus, batch_size=BATCH, ted=CFG, implicit_pruning=False)
    with caplog.at_level(logging.WARNING, logger="ted_stream.loaders.streaming"):
        epochs = plain_loop(ds)
    assert [e[2] for e in epochs] == [600, 600, 600]
    assert all(promised == batches for promised, batches, _ in epochs)
    assert "without start_epoch" not in caplog.text
    with pytest.raises(ValueError, match="implicit_pruning='no' is invalid: expected True or False"):
        TEDStreamingDataset(local=corpus, batch_size=BATCH, ted=CFG, implicit_pruning="no")
