"""The Trainer's GPU-only paths, reproduced on the CPU: the fp16 loss scale read before the step
that accelerate runs inside backward under DeepSpeed, DeepSpeed's loss scale at every ZeRO stage,
ted_weight kept fp32 when the Trainer casts float inputs to DeepSpeed's dtype, and nn.DataParallel
(several GPUs, no launcher) refused, by launch/train_hf.py before it prepares any data."""
from __future__ import annotations

import gc
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from ted_stream import TEDConfig, TEDStreamingDataset  # noqa: E402
from ted_stream.integrations.hf import TEDTrainerMixin  # noqa: E402
from ted_stream.prepare import write_mds  # noqa: E402
from ted_stream.protocol import deepspeed_loss_scale  # noqa: E402

N, SEQ, VOCAB, BATCH = 16, 8, 32, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TEDConfig(target=0.5, epochs=1, warmup_epochs=1, ramp_epochs=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-hf") / "data"
    write_mds(({"input_ids": [(i + t) % VOCAB for t in range(SEQ)]} for i in range(N)), str(folder))
    return str(folder)


def collate(samples):
    ids = torch.tensor([s["input_ids"] for s in samples])
    return {"input_ids": ids, "labels": ids.clone()}


class StepsInBackward(Trainer):
    """What accelerate does under DeepSpeed fp16: the engine steps inside backward, and the step
    moves the loss scale (here: halves it, as after an overflow)."""

    scale = 1024.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.before.append(self.scale)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.scale /= 2
        return loss


class Probe(TEDTrainerMixin, StepsInBackward):
    def __init__(self, *a, **kw):
        self.before: list[float] = []
        super().__init__(*a, **kw)
        self.passed: list[float] = []
        score = self.ted.score
        self.ted.score = lambda backward_scale: (self.passed.append(backward_scale), score(backward_scale))[1]

    def _loss_scale(self):
        return self.scale


def make(kind, corpus, tmp_path, **args):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ))
    ds = TEDStreamingDataset(local=corpus, table_dir=str(tmp_path / "table"), batch_size=BATCH, ted=CFG)
    targs = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                              report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **args)
    return kind(model=model, args=targs, train_dataset=ds, data_collator=collate, ted_scorer={"rows": 2})


def release(t) -> None:
    t.ted.scorer.remove()
    t.train_dataset = t._ted_loader = t.ted = t.callback_handler = None
    gc.collect()


def test_the_loss_scale_is_read_before_the_step_inside_backward(corpus, tmp_path):
    t = make(Probe, corpus, tmp_path, gradient_accumulation_steps=2)
    t.train()
    assert len(t.before) == N // BATCH
    assert t.passed == [s / 2 for s in t.before]  # the scale backward ran with, over GAS
    release(t)


class CastsFloatInputs(TEDTrainerMixin, Trainer):
    """The Trainer under DeepSpeed bf16: ``_prepare_input`` casts every float tensor to bf16."""

    def _prepare_input(self, data):
        if isinstance(data, torch.Tensor) and torch.is_floating_point(data):
            return data.to(self.args.device, torch.bfloat16)
        return super()._prepare_input(data)


def test_ted_weight_stays_fp32_when_the_trainer_casts_float_inputs(corpus, tmp_path):
    t = make(CastsFloatInputs, corpus, tmp_path)
    weight = torch.tensor([1.0, 1.2345678, 0.7, 2.0])
    got = t._prepare_inputs({"input_ids": torch.zeros(4, SEQ, dtype=torch.long), "mask": torch.ones(4),
                             "ted_weight": weight})
    assert got["mask"].dtype == torch.bfloat16  # the cast is in effect
    assert got["ted_weight"].dtype == torch.float32 and torch.equal(got["ted_weight"], weight)
    release(t)


def test_data_parallel_is_refused_naming_the_launchers(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"n_gpu=2.*nn\.DataParallel.*torchrun --nproc_per_node 2"):
        make(CastsFloatInputs, corpus, tmp_path)


def fp16_engine(optimizer):
    return SimpleNamespace(fp16_enabled=lambda: True, optimizer=optimizer)


def test_deepspeed_loss_scale_at_every_stage():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage0 = FP16_Optimizer.__new__(FP16_Optimizer)  # ZeRO stage 0: no cur_scale
    stage0.custom_loss_scaler = False
    stage0.loss_scale_config = SimpleNamespace(use_grad_scaling=True, cur_scale=4096.0)
    assert not hasattr(stage0, "cur_scale")
    assert deepspeed_loss_scale(fp16_engine(stage0)) == 4096.0
    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
    zero.custom_loss_scaler = False
    zero.loss_scaler = SimpleNamespace(cur_scale=512.0)
    assert deepspeed_loss_scale(fp16_engine(zero)) == 512.0
    assert deepspeed_loss_scale(SimpleNamespace(fp16_enabled=lambda: False, optimizer=None)) == 1.0
    with pytest.raises(RuntimeError, match=r"optimizer \(SGD\) has no numeric loss_scale or cur_scale"):
        deepspeed_loss_scale(fp16_engine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)))


def test_train_hf_refuses_data_parallel_before_preparing_data(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_hf", os.path.join(ROOT, "launch", "train_hf.py"))
    train_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_hf)
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 4))
    with pytest.raises(SystemExit, match=r"train_hf: TrainingArguments.n_gpu=4.*torchrun --nproc_per_node 4"):
        train_hf.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "data").exists()
