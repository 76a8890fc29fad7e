"""What a GPU run would hit first, caught on the CPU: fp16 loss-scale overflows (non-finite
scores are dropped and counted, the EMA reference survives), fp16 loss weights times the loss
scale, a reference restored before the model moved, host-device copies per micro-step (the
"meta" device stands in for the accelerator), one upcast per shared input, and bf16 scores
ranked as the fp32 oracle ranks them."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


class Transfers(TorchDispatchMode):
    """What would stall a GPU's host, with "meta" as the device: copies between the host and the
    device (a read of a device value on the host, .item() or .cpu(), fails on meta outright), and
    dtype casts of tensors of ``shape``."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.shape = shape
        self.copies: list[str] = []
        self.casts: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("_to_copy", "copy_", "_copy_from", "lift_fresh", "lift_fresh_copy"):
            src = args[0]
            if src.device.type == "cpu" and out.device.type == "meta":
                self.copies.append(func.overloadpacket.__name__)
            if src.dtype != out.dtype and tuple(src.shape) == self.shape:
                self.casts.append((src.dtype, out.dtype))
        return out


def count_device_tensors_from_host_data(monkeypatch, seen: list[str]) -> None:
    """torch.tensor(data, device=...) and kin copy host data below the dispatcher's view."""
    for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
        def made(*args, _real=getattr(owner, name), _name=name, **kwargs):
            out = _real(*args, **kwargs)
            data = args[1] if _name == "new_tensor" else args[0]
            if out.device.type == "meta" and not isinstance(data, torch.Tensor):
                seen.append(_name)
            return out
        monkeypatch.setattr(owner, name, made)


def test_a_micro_step_copies_only_its_ted_weight_to_the_device(data, tmp_path, monkeypatch):
    ted = protocol(data, tmp_path / "t", ref_ema=0.5)
    ted.model.to("meta")
    copies = []
    for first in (0, 8, 16):
        batch = make_batch(first)  # on the host, as a loader yields it
        x, label = batch["x"].to("meta"), batch["label"].to("meta")  # the loop's own input copies
        with monkeypatch.context() as patch, Transfers() as seen:
            count_device_tensors_from_host_data(patch, seen.copies)
            ted.loss(per_sample_ce(ted.model(x), label), batch).backward()
            ted.score(backward_scale=0.5)
        copies.append(seen.copies)
    assert copies[1:] == [["_to_copy"], ["_to_copy"]]  # ted_weight; the first step also places the rows


class QKV(nn.Module):
    """Three scored layers reading one input, as q, k and v do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.head = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.q(x) * self.k(x) + self.v(x)).float().mean(dim=1)


@pytest.mark.parametrize("dtype, upcasts", [(torch.float16, 1), (torch.bfloat16, 0)])
def test_a_shared_input_is_upcast_at_most_once(dtype, upcasts):
    model = QKV().to(dtype)
    scorer = TaylorScorer(model, rows=2)
    x = torch.randn(4, 5, 8).to(dtype)
    with Transfers(shape=tuple(x.shape)) as seen:
        per_sample_ce(model(x), torch.tensor([0, 1, 2, 0])).mean().backward()
        scores = scorer.compute(1.0 / 4)
    assert seen.casts == [(dtype, torch.float32)] * upcasts
    assert scores.d.dtype == torch.float32 and torch.isfinite(scores.d).all()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.argsort().argsort().double() for t in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_bf16_scores_rank_samples_as_the_fp32_oracle_does(device):
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    narrow = copy.deepcopy(wide).to(torch.bfloat16)
    x, labels = torch.randn(64, 24, 16, device=device), torch.randint(0, 4, (64,), device=device)
    got = []
    for model, dtype in ((wide, torch.float32), (narrow, torch.bfloat16)):
        scorer = TaylorScorer(model, rows=8)
        per_sample_ce(model(x.to(dtype)).mean(dim=1), labels).mean().backward()
        got.append(scorer.compute(1.0 / 64).d)
    assert got[1].dtype == torch.float32
    assert spearman(got[0].cpu(), got[1].cpu()) >= 0.99
