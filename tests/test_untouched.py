"""A loop that never heard of TED gets upstream's samples unchanged (issue 24 item 1): no extra
keys until the loop calls start_epoch, `model(**batch)` works, and a column that would clash with
ted_id / ted_weight is refused rather than overwritten."""
import warnings

import numpy as np
import pytest
import torch
from streaming import StreamingDataLoader, StreamingDataset

from ted_stream import TEDConfig, TEDStreamingDataset, model_inputs
from ted_stream.prepare import write_mds

CFG = TEDConfig(target=0.5, warmup_epochs=0, ramp_epochs=0)


class Model(torch.nn.Module):
    def forward(self, label, text):  # no **kwargs: any extra key raises TypeError
        return torch.as_tensor(label).float().mean()


def test_a_plain_loop_gets_upstreams_batches_and_model_star_star_batch_works(corpus):
    ted = TEDStreamingDataset(local=corpus, batch_size=8, shuffle=True, shuffle_seed=3, ted=CFG)
    plain = StreamingDataset(local=corpus, batch_size=8, shuffle=True, shuffle_seed=3)
    plain_batches = list(StreamingDataLoader(plain, batch_size=8))  # one at a time: both decompress into corpus
    for ted_batch, plain_batch in zip(StreamingDataLoader(ted, batch_size=8), plain_batches, strict=True):
        assert ted_batch.keys() == plain_batch.keys() == {"label", "text"}
        assert ted_batch["text"] == plain_batch["text"]
        Model()(**ted_batch)
    assert type(ted[0]) is type(plain[0]) and ted[0] == plain[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_ted_loop_gets_ids_and_weights_once_it_starts_an_epoch(corpus, workers):
    ds = TEDStreamingDataset(local=corpus, batch_size=8, ted=CFG)
    ds.record(np.arange(ds.num_samples), np.random.default_rng(0).normal(size=ds.num_samples))
    mask = ds.start_epoch(0)
    batches = list(StreamingDataLoader(ds, batch_size=8, num_workers=workers))
    ids = np.concatenate([b["ted_id"].numpy() for b in batches])
    assert sorted(ids) == list(np.flatnonzero(mask.bools()))
    assert all(b["ted_weight"].dtype == torch.float32 or b["ted_weight"].dtype == torch.float64 for b in batches)
    assert {k for b in batches for k in b} == {"label", "text", "ted_id", "ted_weight"}
    Model()(**model_inputs(batches[0]))  # what a TED loop hands its model


def test_ted_keys_always_and_never(corpus):
    always = TEDStreamingDataset(local=corpus, batch_size=8, ted=CFG, ted_keys="always")
    assert always[5]["ted_id"] == 5 and always[5]["ted_weight"] == 1.0
    never = TEDStreamingDataset(local=corpus, batch_size=8, ted=CFG, ted_keys="never")
    never.start_epoch(0)
    batch = next(iter(StreamingDataLoader(never, batch_size=8)))
    assert batch.keys() == {"label", "text"}
    with pytest.raises(ValueError, match="ted_keys='sometimes' is invalid: expected one of auto, always, never"):
        TEDStreamingDataset(local=corpus, batch_size=8, ted=CFG, ted_keys="sometimes")


def test_a_column_named_ted_id_is_refused_not_overwritten(tmp_path):
    folder = str(tmp_path / "clash")
    write_mds(({"text": f"s{i}", "ted_id": f"doc-{i}"} for i in range(40)), folder)
    ds = TEDStreamingDataset(local=folder, batch_size=8, ted=CFG)
    assert ds[3]["ted_id"] == "doc-3"  # a plain loop reads its own column
    ds.start_epoch(0)
    with pytest.raises(ValueError, match=r"sample 3 already has a column named 'ted_id' \(value 'doc-3'\).*rename"):
        ds[3]


def test_without_implicit_pruning_a_plain_loop_creates_and_fetches_nothing(tmp_path):
    """With a remote, the table's home is <local>/ted, mirrored to <remote>/ted: a plain loop that
    refuses implicit pruning never creates that folder nor asks the remote for a table; the first
    TED call does both, and the table then lands at the remote."""
    import os

    from conftest import make_corpus

    remote = make_corpus(tmp_path / "remote", 200)
    local = str(tmp_path / "cache")
    ds = TEDStreamingDataset(remote=remote, local=local, batch_size=8, ted=CFG, implicit_pruning=False)
    loader = StreamingDataLoader(ds, batch_size=8)
    for _ in range(2):
        assert sum(len(b["label"]) for b in loader) == 200
    state = loader.state_dict()
    assert not os.path.exists(os.path.join(local, "ted")), "a plain loop touched the table folder"
    ds.load_state_dict(state)
    ds.record(np.arange(200), np.random.default_rng(0).normal(size=200))  # the first TED call opens it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # epoch 1 went whole as asked: nothing to warn about
        assert ds.start_epoch(ds.upcoming_epoch()).kept < 200
    assert os.path.exists(os.path.join(local, "ted", "table.tedt"))
    assert os.path.exists(os.path.join(remote, "ted", "table.tedt"))  # uploaded beside index.json
