"""TEDProtocol in one process: scores reach the table (buffered, flushed at epoch ends and
checkpoints), the loss is weighted by ted_weight while the scores are not, and a checkpoint
restores the sample stream, the masks and the table exactly (mid-epoch and at an epoch end)."""
from __future__ import annotations

import gc
import os
import re

import numpy as np
import pytest
import torch
from streaming import StreamingDataLoader
from torch import nn

from conftest import make_corpus
from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream.protocol import TABLE_FILE, TEDProtocol
from ted_stream.scorer import per_sample_ce
from ted_stream.table import ScoreTable

N, BATCH, EPOCHS = 64, 8, 3
CFG = TEDConfig(target=0.5, epochs=EPOCHS, warmup_epochs=1, ramp_epochs=1, explore=0.2, max_weight=2.0)


def features(ids: torch.Tensor) -> torch.Tensor:
    """A fixed, distinct input per sample."""
    return torch.sin(ids[:, None].double() * torch.arange(1, 7, dtype=torch.float64) * 0.37).float()


def collate(samples):
    return {"ted_id": torch.tensor([s["ted_id"] for s in samples]),
            "ted_weight": torch.tensor([s["ted_weight"] for s in samples], dtype=torch.float32),
            "label": torch.tensor([s["label"] % 2 for s in samples])}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


class Run:
    """A plain PyTorch loop with the protocol, as in docs/integrations.md."""

    def __init__(self, folder, table_dir, cfg=CFG, **protocol_kw):
        self.ds = TEDStreamingDataset(local=folder, table_dir=str(table_dir), batch_size=BATCH, shuffle=True,
                                      ted=cfg)
        self.loader = StreamingDataLoader(self.ds, batch_size=BATCH, collate_fn=collate)
        self.model = make_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.ted = TEDProtocol(self.ds, self.model, **protocol_kw)
        self.ids: list[list[int]] = []
        self.rows: list[dict] = []

    def train(self, stop_after=None, on_step=None):
        """Train to the end (or return after ``stop_after`` micro-steps of the whole run)."""
        for epoch in range(self.ds.upcoming_epoch(), CFG.epochs):
            self.ted.start_epoch(epoch)
            for batch in self.loader:
                loss = self.ted.loss(per_sample_ce(self.model(features(batch["ted_id"])), batch["label"]), batch)
                loss.backward()
                self.ted.score()
                self.opt.step()
                self.opt.zero_grad()
                self.ids.append(batch["ted_id"].tolist())
                if on_step is not None:
                    on_step(self)
                if stop_after is not None and len(self.ids) == stop_after:
                    return
            self.rows.append(self.ted.end_epoch())

    def save(self, folder, skip_finished_epoch=False):
        state = self.ted.checkpoint(str(folder), self.loader, skip_finished_epoch=skip_finished_epoch)
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "ted": state}, folder / "ck.pt")

    def load(self, folder):
        ck = torch.load(folder / "ck.pt", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.ted.restore(str(folder), ck["ted"], self.loader)


@pytest.fixture
def data(tmp_path):
    return make_corpus(tmp_path / "data", N)


def close(*runs):
    for r in runs:
        r.ted.scorer and r.ted.scorer.remove()
        r.ds = r.loader = r.ted = None
    gc.collect()


def test_scores_reach_the_table_in_batches_and_at_epoch_end(data, tmp_path):
    run = Run(data, tmp_path / "t", flush_every=3, scorer={"reading": "loss"})
    seen = []

    def check(r):  # the table gets the scores every third micro-step, not before
        seen.append(int(r.ds.table.scored.sum()))
    run.train(stop_after=N // BATCH, on_step=check)
    assert seen == [0, 0, 24, 24, 24, 48, 48, 48]
    row = run.ted.end_epoch()  # flushes the last two micro-steps
    assert run.ds.table.scored.all()
    assert row == {"epoch": 0, "kept": N, "pruned": 0, "trained": N, "saved_so_far": 0.0}
    close(run)


def test_loss_reading_records_each_samples_own_loss(data, tmp_path):
    run = Run(data, tmp_path / "t", scorer={"reading": "loss"})
    model_before = make_model()  # the loss is read before the step changes the model
    losses = {}

    def capture(r):
        ids = torch.tensor(r.ids[-1])
        with torch.no_grad():
            label = torch.tensor([r.ds.get_item(int(i))["label"] % 2 for i in ids])
            loss = per_sample_ce(model_before(features(ids)), label)
        model_before.load_state_dict(r.model.state_dict())
        losses.update(zip(ids.tolist(), loss.tolist()))
    run.train(stop_after=N // BATCH, on_step=capture)
    run.ted.end_epoch()
    ids = np.array(sorted(losses))
    np.testing.assert_allclose(run.ds.table.score_array()[ids], [losses[i] for i in ids], rtol=1e-2)  # bf16
    close(run)


def test_loss_is_weighted_and_scores_are_not(data, tmp_path):
    """A sample's gradient score is the score of its own unweighted loss whatever its ted_weight."""
    ds = TEDStreamingDataset(local=data, table_dir=str(tmp_path / "t"), batch_size=BATCH, ted=CFG,
                             ted_keys="always")
    model = make_model()
    ted = TEDProtocol(ds, model, scorer={"layers": "*", "rows": None})
    batch = collate([ds.get_item(i) for i in range(BATCH)])
    label, x = batch["label"], features(batch["ted_id"])
    per_sample = per_sample_ce(model(x), label)
    plain = ted.loss(per_sample, batch)
    assert plain.item() == pytest.approx(per_sample.mean().item())
    plain.backward()
    ted.score()
    model.zero_grad()

    batch["ted_weight"] = torch.tensor([1.0, 2.0, 1.5, 1.0, 3.0, 1.0, 1.0, 2.5])
    per_sample = per_sample_ce(model(x), label)
    weighted = ted.loss(per_sample, batch)
    assert weighted.item() == pytest.approx((per_sample * batch["ted_weight"]).mean().item())
    (weighted / 2).backward()  # e.g. gradient accumulation over 2 micro-batches
    ted.score(backward_scale=0.5)
    a, b = ted._values
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # d of each sample, unchanged by its weight
    assert a.std() > 0  # real, varying scores
    ted.flush()
    assert ds.table.scored[:BATCH].all() and not ds.table.scored[BATCH:].any()
    with pytest.raises(RuntimeError, match="without a preceding loss"):
        ted.score()


def test_pruning_weights_and_saved_fraction(data, tmp_path):
    run = Run(data, tmp_path / "t", flush_every=5)
    weights = []
    run.train(on_step=lambda r: weights.append(r.ds.table.masks[r.ted.epoch].weights(np.array(r.ids[-1]))))
    kept = [row["kept"] for row in run.rows]
    assert kept[0] == N and kept[1] < N and kept[2] < N
    assert [row["trained"] for row in run.rows] == kept
    assert run.rows[-1]["saved_so_far"] == pytest.approx(1 - sum(kept) / (EPOCHS * N))
    assert max(np.concatenate(weights)) > 1.0  # the policy rescales the kept part of the pool
    for epoch in range(1, EPOCHS):
        assert set(sum(run.ids[sum(kept[:epoch]) // BATCH: sum(kept[:epoch + 1]) // BATCH], [])) == set(
            run.ds.kept_ids(epoch).tolist())
    close(run)


@pytest.mark.parametrize("stop,skip", [(11, False), (12, False), (12, True)],
                         ids=["mid-epoch", "epoch-end", "epoch-end-skipped"])
def test_checkpoint_resumes_exactly(data, tmp_path, stop, skip):
    """Checkpoint after `stop` micro-steps (12 = the last step of epoch 1, whose 32 kept samples
    make 4 steps), then a new process-like setup resumes: same ids, masks and final table. At an
    epoch end the resumed loop closes the finished epoch (its empty rest), or with
    skip_finished_epoch starts the next one."""
    ref = Run(data, tmp_path / "ref", flush_every=4)
    ck = tmp_path / "ck"
    ck.mkdir()
    ref.train(on_step=lambda r: len(r.ids) == stop and r.save(ck, skip))
    ref_table = ScoreTable.load(ref.ds.table_path)
    assert ScoreTable.load(str(ck / TABLE_FILE)).scored.sum() > 0
    ids_ref, rows_ref = ref.ids, ref.rows
    assert sum(len(x) for x in ids_ref[:12]) == N + 32  # the epoch boundary the parametrisation relies on
    close(ref)

    # resume in the same table folder, which holds the finished run's later scores and masks
    run = Run(data, tmp_path / "ref", flush_every=4)
    run.load(ck)
    assert run.ds.upcoming_epoch() == (2 if skip else 1)
    run.train()
    assert run.ids == ids_ref[stop:]
    assert run.rows == [r for r in rows_ref if r["epoch"] >= run.rows[0]["epoch"]]
    final = ScoreTable.load(run.ds.table_path)
    np.testing.assert_array_equal(final.scores, ref_table.scores)
    assert sorted(final.masks) == sorted(ref_table.masks)
    for e in final.masks:
        np.testing.assert_array_equal(final.masks[e].keep, ref_table.masks[e].keep)
    close(run)


def test_state_dict_refuses_unflushed_scores_and_bad_input(data, tmp_path):
    ds = TEDStreamingDataset(local=data, table_dir=str(tmp_path / "t"), batch_size=BATCH, ted=CFG,
                             ted_keys="always")
    model = make_model()
    ted = TEDProtocol(ds, model, flush_every=100)
    batch = collate([ds.get_item(i) for i in range(BATCH)])
    ted.loss(per_sample_ce(model(features(batch["ted_id"])), batch["label"]), batch).backward()
    ted.score()
    with pytest.raises(RuntimeError, match="call checkpoint"):
        ted.state_dict()
    state = ted.checkpoint(str(tmp_path / "ck"))
    assert ScoreTable.load(str(tmp_path / "ck" / TABLE_FILE)).scored.sum() == BATCH
    assert state["micro"] == 1 and "loader" not in state
    with pytest.raises(ValueError, match=r"shape \(8, 1\)"):
        ted.loss(torch.zeros(BATCH, 1), batch)
    with pytest.raises(ValueError, match="pass the model"):
        TEDProtocol(ds)
    with pytest.raises(ValueError, match="flush_every=0"):
        TEDProtocol(ds, model, flush_every=0)
    with pytest.raises(ValueError, match="epochs=5 but"):
        TEDProtocol(ds, model, epochs=5)


def recipe(name: str) -> str:
    """A code block of docs/integrations.md, marked <!-- test: name -->."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "integrations.md")).read()
    return re.search(rf"<!-- test: {name} -->\n```python\n(.*?)```", text, re.S).group(1)


def test_plain_loop_recipe_in_the_docs_runs(capsys):
    exec(compile(recipe("plain"), "docs/integrations.md", "exec"), {})
    out = capsys.readouterr().out
    assert [int(k) for k in re.findall(r"kept (\d+),", out)] == [256, 128, 128, 256]
    assert "resumed run agrees: True" in out
    gc.collect()
