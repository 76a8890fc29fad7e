"""Step `lmft` of launch/gpu_check.sh: a SmolLM2-135M fine-tune grid on the news corpus, in one process.

    python launch/gpu_lmft.py --model runs/.../SmolLM2-135M-Instruct.Q4_1.gguf --out lmft.json --work runs/lmft
    python launch/gpu_lmft.py --model tiny ...        # a tiny random Llama and a small BPE (the CPU rehearsal)

The variants and the matched budget are launch/bench_lm_ft.py's (the CPU grid), so both grids mean
the same thing: all data; all data stopped at the sample-iterations the pruned runs train
("fewer epochs, same compute"); random pruning at the same loss scale; the TED default; at 30% and
50% saved over EPOCHS epochs (warm-up 1, cubic ramp 2). Windows of news text tokenized by the model's
own tokenizer (launch/llm_data.py's split and MDS shards), read through TEDStreamingDataset;
TEDProtocol with the default scorer (every linear layer, 16 rows, reading d); AdamW, cosine over
epoch progress (the fewer-epochs run over its own budget), bf16 autocast on CUDA. The model is loaded
once; every cell starts from its weights. Held-out token loss and perplexity after every epoch.
Cells run in a fixed order and none starts unless the time it is expected to take is left of
--budget-s; the JSON is rewritten after every cell. One seed: a GPU window holds no more.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a .gguf file, a Hugging Face folder, or 'tiny'")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=1024, help="training windows")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--max-docs", type=int, default=0, help="training documents read (0: as many as the windows need)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9)
    args = p.parse_args()

    import bench_lm_ft as grid
    import llm_data
    import numpy as np
    import torch
    import train_llm

    from ted_stream.protocol import TEDProtocol
    from ted_stream.scorer import per_sample_lm_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.model == "tiny"
    if not tiny and not (os.path.isdir(args.model) or os.path.isfile(args.model)):
        raise SystemExit(f"--model {args.model}: no such file or folder")
    data_dir = os.path.join(args.work, "data")
    meta = llm_data.prepare(data_dir, seq_len=args.seq_len, vocab_size=300 if tiny else 2048,
                            model=None if tiny else os.path.abspath(args.model), max_docs=args.max_docs or None,
                            max_samples=args.windows, max_eval=args.eval_windows, log=print)
    heldout = torch.from_numpy(np.load(os.path.join(data_dir, "eval.npy")).astype(np.int64))
    t = time.time()
    if tiny:
        ns = argparse.Namespace(model=None, seed=0, hidden=32, layers=1, heads=2, seq_len=args.seq_len)
        model = train_llm.build_model(ns, meta["vocab_size"], meta["eot_id"])
    else:
        from transformers import AutoModelForCausalLM

        folder, gguf = llm_data.model_files(os.path.abspath(args.model))
        kw = {"gguf_file": gguf} if gguf else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    load_s = time.time() - t
    model.to(dev).train()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad(), amp:
            losses = [per_sample_lm_loss(model(input_ids=ids.to(dev)).logits, ids.to(dev)).float()
                      for ids in heldout.split(args.batch)]
        model.train()
        return float(torch.cat(losses).mean())

    before = heldout_loss()
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "model": "tiny random Llama" if tiny else os.path.basename(args.model),
              "params": sum(q.numel() for q in model.parameters()), "load_s": round(load_s, 1), "data": meta,
              "settings": {k: getattr(args, k) for k in ("seq_len", "windows", "eval_windows", "epochs", "batch", "lr",
                                                         "seed", "levels")},
              "heldout_loss_before": before, "cells": [], "skipped": []}

    def save():
        result["seconds"] = round(time.time() - T0, 1)
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    save()
    cells = [(grid.ALL, 0.0)] + [(v, lv) for lv in args.levels for v in (grid.DEFAULT, grid.RANDOM, grid.FEWER)]
    slowest = 0.0
    for k, (variant, level) in enumerate(cells):
        left = args.budget_s - (time.time() - T0)
        if slowest and left < 1.1 * slowest:
            result["skipped"].append({"variant": variant, "level": level, "why": f"{left:.0f} s left of --budget-s"})
            continue
        t_cell = time.time()
        cfg = grid.ted_config(variant, level or args.levels[0], args.seed, args.epochs)
        local = os.path.join(args.work, f"cell{k}")  # streaming refuses two datasets on one folder
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(data_dir, local, ignore=shutil.ignore_patterns("ted", "eval.npy", "tokenizer.json"))
        ds = llm_data.open_train(local, "mds", batch_size=args.batch, seed=args.seed, ted=cfg,
                                 table_dir=os.path.join(local, "ted"))
        loader = llm_data.train_loader(ds, train_llm.collate)
        protocol = TEDProtocol(ds, model, epochs=args.epochs)  # the default scorer
        model.load_state_dict(start)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                **({"fused": True} if dev.type == "cuda" else {}))
        n = ds.num_samples
        budget = grid.matched_budget(level, args.seed, n, args.epochs, args.batch) if variant == grid.FEWER else None
        trained, epochs = 0, []
        for epoch in range(args.epochs):
            if budget is not None and trained >= budget:
                break
            info = protocol.start_epoch(epoch)
            done = 0
            for step, batch in enumerate(loader):
                if budget is not None and trained >= budget:
                    break  # the rest is beyond the pruned runs' compute (the loader finishes its epoch unread)
                if budget is not None and len(batch["ted_id"]) > budget - trained:
                    batch = {key: v[: budget - trained] for key, v in batch.items()}
                progress = trained / budget if budget else (epoch + step / max(info["steps"], 1)) / args.epochs
                for g in opt.param_groups:
                    g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
                ids = batch["input_ids"].to(dev, non_blocking=True)
                with amp:
                    logits = model(input_ids=ids).logits
                loss = protocol.loss(per_sample_lm_loss(logits, ids), batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                protocol.score()
                opt.step()
                trained += len(ids)
                done += len(ids)
            protocol.end_epoch()
            loss_e = heldout_loss()
            epochs.append({"epoch": epoch, "kept": info["kept"], "trained": done, "heldout_loss": loss_e,
                           "heldout_ppl": math.exp(min(loss_e, 50.0)), "seconds": round(time.time() - t_cell, 1)})
            print(f"{variant} {level:.0%} epoch {epoch}: kept {info['kept']}/{n} trained {done} held-out loss "
                  f"{loss_e:.4f} ({time.time() - t_cell:.0f} s)", flush=True)
        if protocol.scorer is not None:
            protocol.scorer.remove()
        final = epochs[-1]["heldout_loss"]
        result["cells"].append({"variant": variant, "level": level, "n": n, "trained": trained, "budget": budget,
                                "saved": 1 - trained / (n * args.epochs), "heldout_loss": final,
                                "heldout_ppl": math.exp(min(final, 50.0)), "per_epoch": epochs,
                                "config": cfg.to_dict(), "seconds": round(time.time() - t_cell, 1)})
        slowest = max(slowest, time.time() - t_cell)
        del loader, ds, protocol, opt
        gc.collect()
        shutil.rmtree(local, ignore_errors=True)
        save()
    full = next((c["heldout_loss"] for c in result["cells"] if c["variant"] == grid.ALL), None)
    for c in result["cells"]:
        c["delta_vs_all_data"] = None if full is None else c["heldout_loss"] - full
    save()
    for c in result["cells"]:
        print(f"{c['variant']:30s} {c['level']:.0%}  saved {c['saved']:.3f}  held-out loss {c['heldout_loss']:.4f} "
              f"(ppl {c['heldout_ppl']:.2f})  {c['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
