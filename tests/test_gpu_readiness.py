"""What a GPU run would hit first, caught on the CPU: fp16 loss-scale overflows (non-finite
scores are dropped and counted, the EMA reference survives), fp16 loss weights times the loss
scale, the DeepSpeed loss scale wherever DeepSpeed keeps it, and a reference restored before the
model moved (the "meta" device stands in for the accelerator)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import make_corpus
from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream.protocol import TEDProtocol
from ted_stream.scorer import TaylorScorer, per_sample_ce

BATCH = 8
CFG = TEDConfig(target=0.5, epochs=2, warmup_epochs=1, ramp_epochs=0, explore=0.2)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def make_batch(first: int, weight: float = 1.0) -> dict[str, torch.Tensor]:
    ids = torch.arange(first, first + BATCH)
    return {"ted_id": ids, "ted_weight": torch.full((BATCH,), weight), "label": ids % 2,
            "x": torch.sin(ids[:, None].float() * torch.arange(1, 7) * 0.37)}


@pytest.fixture
def data(tmp_path):
    return make_corpus(tmp_path / "data", 32)


def protocol(data, table_dir, **scorer) -> TEDProtocol:
    ds = TEDStreamingDataset(local=data, table_dir=str(table_dir), batch_size=BATCH, ted=CFG)
    ted = TEDProtocol(ds, make_model(), scorer={"rows": 4, **scorer}, flush_every=100)
    ted.start_epoch(0)
    return ted


def step(ted: TEDProtocol, batch, blow_up: float = 1.0, scale: float = 1.0, loss_dtype=torch.float32) -> None:
    """One micro-step; ``blow_up`` = inf makes every gradient non-finite, as an fp16 overflow does."""
    per_sample = per_sample_ce(ted.model(batch["x"]), batch["label"]).to(loss_dtype)
    (ted.loss(per_sample, batch) * blow_up * scale).backward()
    ted.score(backward_scale=scale)
    ted.model.zero_grad()


def scored(ted: TEDProtocol) -> dict[int, float]:
    table = ted.dataset.table
    return {i: float(v) for i, v in enumerate(table.score_array()) if table.scored[i]}


def test_overflowed_step_is_dropped_and_counted_and_the_reference_survives(data, tmp_path, caplog):
    ted = protocol(data, tmp_path / "a", ref_ema=0.5)
    step(ted, make_batch(0))
    step(ted, make_batch(8), blow_up=float("inf"))
    step(ted, make_batch(16))
    with caplog.at_level(logging.WARNING, logger="ted_stream.protocol"):
        ted.flush()  # the table refuses non-finite scores: this raised ValueError
    assert ted.skipped == BATCH and "dropped 8 non-finite score(s)" in caplog.text
    got = scored(ted)
    assert sorted(got) == list(range(8)) + list(range(16, 24))

    clean = protocol(data, tmp_path / "b", ref_ema=0.5)  # the same run without the overflowed step
    step(clean, make_batch(0))
    step(clean, make_batch(16))
    clean.flush()
    assert got == scored(clean) and clean.skipped == 0


def test_first_step_overflow_does_not_poison_the_reference():
    model = make_model()
    scorer = TaylorScorer(model, rows=4, ref_ema=0.5)
    batch = make_batch(0)
    for blow_up in (float("inf"), 1.0):
        (per_sample_ce(model(batch["x"]), batch["label"]).mean() * blow_up).backward()
        scores = scorer.compute(blow_up / BATCH)
    assert torch.isfinite(scorer.reference).all() and torch.isfinite(scores.d).all()


def test_fp16_loss_times_the_fp16_loss_scale_stays_finite(data, tmp_path):
    half, wide = protocol(data, tmp_path / "a"), protocol(data, tmp_path / "b")
    step(half, make_batch(0, weight=1.5), scale=65536.0, loss_dtype=torch.float16)
    step(wide, make_batch(0, weight=1.5))
    half.flush()
    wide.flush()
    assert half.skipped == 0
    assert half.dataset.table.scored[:BATCH].all()
    torch.testing.assert_close(torch.tensor(list(scored(half).values())),
                               torch.tensor(list(scored(wide).values())), rtol=2e-2, atol=1e-6)


def test_a_reference_restored_before_the_model_moved_follows_it():
    """Trainer + DeepSpeed resume: restore() runs while the model is on the CPU, then DeepSpeed
    moves it; the "meta" device stands in for the accelerator."""
    model = make_model()
    scorer = TaylorScorer(model, rows=4, ref_ema=0.5)
    for device in ("cpu", "meta"):  # a step on the CPU leaves the reference there, as restore() does
        model.to(device)
        batch = {k: v.to(device) for k, v in make_batch(0).items()}
        per_sample_ce(model(batch["x"]), batch["label"]).mean().backward()
        scores = scorer.compute(1.0 / BATCH)
    assert scorer.reference.device.type == "meta" and scores.d.device.type == "meta"
