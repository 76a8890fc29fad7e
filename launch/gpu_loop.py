"""Step `loop` of launch/gpu_check.sh: the speed of launch/train_llm.py's DeepSpeed loop with ted_stream
doing nothing (pruning off, no scorer) against the same loop without ted_stream, and with the defaults.

    python launch/gpu_loop.py --out loop.json --work runs/loop [--hidden 512 --layers 8 --seq-len 512 ...]

One DeepSpeed engine (one rank, the product's ZeRO-2 config: bf16 on CUDA), three loaders over the same
windows (launch/llm_data.py's news shards, each variant its own copy: streaming refuses two datasets
on one folder), whole epochs interleaved in rounds, round 0 a warm-up:
- ``plain``: mosaicml-streaming's StreamingDataset + StreamingDataLoader, the mean token loss;
- ``ted_off``: TEDStreamingDataset (target 0) + TEDProtocol with the ``loss`` reading (no scorer),
  train_llm.py's loop statements;
- ``ted_default``: the config's ``"ted"`` block and scorer (pruning from its warm-up on).
Tokens per second per epoch (synchronised at its end); issue 22's target: ted_off >= 0.95x plain.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-docs", type=int, default=1000)
    p.add_argument("--max-samples", type=int, default=768)
    p.add_argument("--rounds", type=int, default=3, help="rounds of one epoch per variant; the first is a warm-up")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no round after this")
    args = p.parse_args()
    t0 = time.time()

    import deepspeed
    import llm_data
    import numpy as np  # noqa: F401
    import torch
    import torch.nn.functional as F
    import train_llm
    from streaming import StreamingDataLoader, StreamingDataset

    from ted_stream import TEDConfig
    from ted_stream.config import split_config
    from ted_stream.protocol import TEDProtocol, deepspeed_loss_scale
    from ted_stream.scorer import per_sample_lm_loss

    cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_llm.single_process_env()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    config = os.path.join(HERE, "configs", "zero2_bf16.json" if cuda else "zero2.json")
    with open(config) as f:
        raw = json.load(f)
    epochs = max(args.rounds, 4)  # the ted block's schedule (warm-up 1, ramp 2) needs room
    ds_config, ted_default, scorer_cfg = split_config(raw, epochs)
    ds_config["train_micro_batch_size_per_gpu"] = args.micro
    gas = int(ds_config.get("gradient_accumulation_steps", 1))

    source = os.path.join(args.work, "data")
    meta = llm_data.prepare(source, seq_len=args.seq_len, vocab_size=args.vocab_size, max_docs=args.max_docs,
                            max_samples=args.max_samples, max_eval=8, log=print)
    folders = {}
    for v in ("plain", "ted_off", "ted_default"):
        folders[v] = os.path.join(args.work, v)
        shutil.rmtree(folders[v], ignore_errors=True)
        shutil.copytree(source, folders[v], ignore=shutil.ignore_patterns("ted", "eval.npy", "tokenizer.json"))

    ns = argparse.Namespace(model=None, seed=0, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            seq_len=args.seq_len)
    model = train_llm.build_model(ns, meta["vocab_size"], meta["eot_id"])
    pin = cuda

    def plain_collate(samples):
        return torch.tensor([s["input_ids"] for s in samples], dtype=torch.long)

    plain_ds = StreamingDataset(local=folders["plain"], batch_size=args.micro, shuffle=True, shuffle_seed=0)
    plain_loader = StreamingDataLoader(plain_ds, batch_size=args.micro, collate_fn=plain_collate, pin_memory=pin)
    ted = {"ted_off": TEDConfig(**{**ted_default.to_dict(), "target": 0.0}), "ted_default": ted_default}
    ted_ds = {v: llm_data.open_train(folders[v], "mds", batch_size=args.micro, seed=0, ted=ted[v]) for v in ted}
    ted_loader = {v: llm_data.train_loader(ted_ds[v], train_llm.collate) for v in ted}
    # the protocol (and its scorer's hooks) exists only while its variant runs
    protocol_cfg = {"ted_off": {"reading": "loss"}, "ted_default": scorer_cfg}

    engine, *_ = deepspeed.initialize(model=model, model_parameters=[q for q in model.parameters() if q.requires_grad],
                                      config=ds_config)
    dev = engine.device

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def plain_epoch() -> int:
        steps = 0
        for ids in plain_loader:
            ids = ids.to(dev, non_blocking=True)
            logits = engine(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
            steps += 1
        return steps

    def ted_epoch(v: str, epoch: int) -> int:
        # train_llm.py's loop statements, without its metrics and checkpoints
        protocol = TEDProtocol(ted_ds[v], engine.module, scorer=protocol_cfg[v], epochs=epochs)
        protocol.start_epoch(epoch)
        steps = 0
        for batch in ted_loader[v]:
            ids = batch["input_ids"].to(dev, non_blocking=True)
            weighted = {"ted_id": batch["ted_id"], "ted_weight": batch["ted_weight"].to(dev, non_blocking=True)}
            logits = engine(input_ids=ids).logits
            per_sample = per_sample_lm_loss(logits, ids)
            engine.backward(protocol.loss(per_sample, weighted))
            protocol.score(backward_scale=deepspeed_loss_scale(engine) / gas)
            engine.step()
            steps += 1
        protocol.end_epoch()
        if protocol.scorer is not None:
            protocol.scorer.remove()
        return steps

    order = ["plain", "ted_off", "ted_default"]
    runs = {v: [] for v in order}
    result = {"cuda": cuda, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
              "config": os.path.basename(config),
              "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "seq_len", "micro")},
              "params": sum(q.numel() for q in model.parameters()), "windows": meta["train_samples"],
              "timing": "whole epochs, variants interleaved (rotated each round), round 0 a warm-up, "
                        "synchronised at each epoch's end", "runs": runs}
    for r in range(args.rounds):
        if r and time.time() - t0 > args.budget_s:
            result["cut_short"] = f"stopped before round {r}: --budget-s"
            break
        for v in order[r % 3:] + order[: r % 3]:
            sync()
            t = time.perf_counter()
            steps = plain_epoch() if v == "plain" else ted_epoch(v, r)
            sync()
            dt = time.perf_counter() - t
            runs[v].append({"round": r, "steps": steps, "seconds": round(dt, 3),
                            "tokens_per_s": round(steps * args.micro * args.seq_len / dt, 1),
                            "ms_per_step": round(dt / max(steps, 1) * 1e3, 3)})
            print(f"round {r} {v:12s} {steps:4d} steps {dt:7.2f} s {runs[v][-1]['tokens_per_s']:10.0f} tok/s",
                  flush=True)
    med = {v: statistics.median(x["tokens_per_s"] for x in rs[1:]) for v, rs in runs.items() if len(rs) > 1}
    ms = {v: statistics.median(x["ms_per_step"] for x in rs[1:]) for v, rs in runs.items() if len(rs) > 1}
    result["median_tokens_per_s"] = med
    result["median_ms_per_step"] = ms
    if "plain" in med:
        result["ratio_to_plain"] = {v: round(med[v] / med["plain"], 4) for v in med}
        result["ted_off_target_met"] = result["ratio_to_plain"].get("ted_off", 0) >= 0.95
    result["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "ratio_to_plain") if k in result}))
    train_llm.unlink_deepspeed_shm()
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
