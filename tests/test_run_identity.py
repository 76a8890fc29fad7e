"""Run identity: frozen masks are reused only by the configuration that froze them (a resume)."""
import gc
import os

import numpy as np
import pytest

from ted_stream import TEDConfig, TEDStreamingDataset, TableError
from ted_stream.table import ScoreTable

CFG = TEDConfig(target=0.4, warmup_epochs=1, ramp_epochs=1, explore=0.1)


def run_two_epochs(folder, cfg, **kw):
    ds = TEDStreamingDataset(local=folder, batch_size=8, ted=cfg, **kw)
    ds.start_epoch(0)
    ids = np.array([s["ted_id"] for s in ds])
    ds.record(ids, np.sin(ids * 1.3))
    mask = ds.start_epoch(1)
    del ds
    gc.collect()
    return mask


@pytest.mark.parametrize("other", [{"target": 0.2}, {"target": 0.0}, {"policy": "random"}])
def test_another_configuration_is_refused_naming_both_and_the_ways_out(corpus, other):
    # Before run identity, a second run on the folder silently trained on the first run's masks.
    run_two_epochs(corpus, CFG)
    table = os.path.join(corpus, "ted", "table.tedt")
    before = open(table, "rb").read()
    changed = TEDConfig(**{**CFG.to_dict(), **other})
    with pytest.raises(TableError) as err:
        TEDStreamingDataset(local=corpus, batch_size=8, ted=changed)
    msg = str(err.value)
    field, value = next(iter(other.items()))
    assert "epoch(s) [0, 1] were frozen by another configuration" in msg
    assert f"{field}: {CFG.to_dict()[field]!r} -> {value!r}" in msg  # both values of what differs
    assert "another table_dir" in msg and f"move {table} aside" in msg and "same configuration" in msg
    assert open(table, "rb").read() == before  # nothing changed on disk


def test_the_same_configuration_resumes_with_its_masks(corpus, tmp_path):
    mask = run_two_epochs(corpus, CFG)
    again = TEDStreamingDataset(local=corpus, batch_size=8, ted=TEDConfig(**CFG.to_dict()))
    assert again.table.masks[1].crc == mask.crc
    del again
    gc.collect()
    # A new run with another configuration: a fresh table in its own table_dir.
    fresh = run_two_epochs(corpus, TEDConfig(**{**CFG.to_dict(), "target": 0.2}),
                           table_dir=str(tmp_path / "other_run"))
    assert fresh.kept > mask.kept
    stamps = ScoreTable.load(os.path.join(corpus, "ted", "table.tedt")).frozen_by
    assert set(stamps) == {0, 1} and len(set(stamps.values())) == 1
