"""TaylorScorer under DeepSpeed ZeRO 1-3 with two CPU ranks (gloo) equals a single process."""
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from ted_stream.scorer import TaylorScorer, per_sample_lm_loss

deepspeed = pytest.importorskip("deepspeed")

WORLD = 2
BATCH = 3  # micro-batch per rank
LAYERS = ("lm_head", "*.mlp.down_proj", "model.layers.1.self_attn.o_proj")
ROWS = 9
CONFIGS = [(stage, gas) for stage in (1, 2, 3) for gas in (1, 2)]
SHM = Path("/dev/shm")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


def micro_batch(rank: int, micro: int, length: int = 10):
    """Rank- and micro-step-specific tokens with right padding and some ignored labels."""
    g = torch.Generator().manual_seed(1000 * micro + rank)
    ids = torch.randint(0, 67, (BATCH, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6 + rank :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return ids, mask, labels


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage, gas in CONFIGS:
        model = tiny_llama()
        scorer = TaylorScorer(model, layers=LAYERS, rows=ROWS, seed=0)
        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": gas,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        if stage == 3:  # the weights really are partitioned: the scorer cannot be reading them
            results[(stage, "partitioned")] = engine.module.lm_head.weight.numel() == 0
        for micro in range(gas):
            ids, mask, labels = micro_batch(rank, micro)
            loss = per_sample_lm_loss(engine(input_ids=ids, attention_mask=mask).logits, labels)
            engine.backward(loss.mean())  # divides by gas, hence loss_weight 1 / (B * gas)
            scores = scorer.compute(1 / (BATCH * gas), loss=loss)
            results[(stage, gas, micro)] = (scores.s, scores.sqnorm, scores.loss)
            engine.step()
        scorer.remove()
        engine.destroy()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def run_ranks(out: Path, timeout_s: float = 1800.0) -> None:  # a hang guard, not a speed check
    ctx = mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DeepSpeed ranks did not finish within {timeout_s} s")


def single_process(micro: int):
    """Scores of the global micro-batch (both ranks' samples) in one process, same weights."""
    model = tiny_llama()
    scorer = TaylorScorer(model, layers=LAYERS, rows=ROWS, seed=0)
    ids, mask, labels = (torch.cat(parts) for parts in zip(*(micro_batch(r, micro) for r in range(WORLD))))
    loss = per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.mean().backward()
    return scorer.compute(1 / len(ids), loss=loss)


def test_zero_stages_and_gradient_accumulation_match_single_process(tmp_path):
    shm_before = set(os.listdir(SHM))
    try:
        run_ranks(tmp_path)
    finally:  # DeepSpeed's CPU shared-memory allreduce leaves ~66 MB buffers behind
        for name in set(os.listdir(SHM)) - shm_before:
            if name.startswith("deepspeed_allreduce_buffer"):
                (SHM / name).unlink(missing_ok=True)
    assert not [n for n in set(os.listdir(SHM)) - shm_before if n.startswith("deepspeed")]

    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert per_rank[0][(3, "partitioned")] and per_rank[1][(3, "partitioned")]
    expected = {micro: single_process(micro) for micro in range(2)}
    for stage, gas in CONFIGS:
        for micro in range(gas):
            ref = expected[micro]
            for rank in range(WORLD):
                s, sqnorm, loss = per_rank[rank][(stage, gas, micro)]
                rows = slice(rank * BATCH, (rank + 1) * BATCH)
                where = f"stage {stage} gas {gas} micro {micro} rank {rank}"
                torch.testing.assert_close(loss, ref.loss[rows], rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(sqnorm, ref.sqnorm[rows], rtol=1e-4, atol=0, msg=where)
                # s_i can be near 0: compare on the scale of the batch's largest |s|
                scale = ref.s.abs().max()
                torch.testing.assert_close(s / scale, ref.s[rows] / scale, rtol=0, atol=1e-4, msg=where)
