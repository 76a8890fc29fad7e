"""Step `sync` of launch/gpu_check.sh: launch/train_llm.py's own training loop, in this process, under
``torch.cuda.set_sync_debug_mode("warn")``; every synchronising CUDA call is counted and placed.

    python launch/gpu_sync.py --out sync.json --run-dir runs/sync -- [train_llm.py arguments]

Each warning is attributed to the line of train_llm.py's ``main`` it came from (its call stack) and
classed: ``micro_step`` (a statement of the loop body run every micro-step), ``optimizer``
(``engine.step()``), ``optimizer_boundary`` (the block run once per optimizer step: the metric
read, checkpoints) or ``outside_loop`` (set-up, evaluation, epoch boundaries); ``protocol_flush``
separates the scores' host transfer every ``flush_every`` micro-steps. The run uses gradient
accumulation 2, so a per-micro-step sync and a per-optimizer-step one differ. Issue 22's target:
no ``micro_step`` syncs. Without CUDA the loop runs and nothing is counted (the DRY rehearsal).
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import sys
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
TRAIN_LLM = os.path.join(HERE, "train_llm.py")


def loop_layout(path: str = TRAIN_LLM) -> dict[str, tuple[int, int]]:
    """Line ranges in train_llm.py: the training loop (``for batch in loader``), its
    ``engine.step()`` statement and its per-optimizer-step block (``if step_done:``)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.For) and isinstance(n.iter, ast.Name)
                and n.iter.id == "loader" and isinstance(n.target, ast.Name) and n.target.id == "batch")
    out = {"loop": (loop.lineno, loop.end_lineno)}
    for n in ast.walk(loop):
        if isinstance(n, ast.Expr) and "engine.step()" in ast.unparse(n):
            out["optimizer"] = (n.lineno, n.end_lineno)
        if isinstance(n, ast.If) and ast.unparse(n.test) == "step_done":
            out["optimizer_boundary"] = (n.lineno, n.end_lineno)
    missing = {"optimizer", "optimizer_boundary"} - set(out)
    if missing:
        raise SystemExit(f"gpu_sync: train_llm.py's loop has no {sorted(missing)}: update loop_layout")
    return out


def classify(line: int, layout: dict[str, tuple[int, int]]) -> str:
    inside = lambda key: layout[key][0] <= line <= layout[key][1]  # noqa: E731
    if not inside("loop"):
        return "outside_loop"
    if inside("optimizer"):
        return "optimizer"
    return "optimizer_boundary" if inside("optimizer_boundary") else "micro_step"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", required=True, help="train_llm.py's --out")
    p.add_argument("--gas", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("train_llm_args", nargs="*")
    args = p.parse_args()

    import torch
    import train_llm

    cuda = torch.cuda.is_available()
    config = os.path.join(HERE, "configs", "zero2_bf16.json" if cuda else "zero2.json")
    with open(config) as f:
        raw = json.load(f)
    raw["gradient_accumulation_steps"] = args.gas
    os.makedirs(args.run_dir, exist_ok=True)
    cfg_path = os.path.join(args.run_dir, "sync_config.json")
    with open(cfg_path, "w") as f:
        json.dump(raw, f)
    layout = loop_layout()
    source = open(TRAIN_LLM).read().splitlines()
    counts: collections.Counter = collections.Counter()
    by_line: collections.Counter = collections.Counter()
    by_origin: collections.Counter = collections.Counter()

    def on_warning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" not in text:
            return previous(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if os.path.abspath(f.filename) == TRAIN_LLM and f.name == "main"]
        where = ours[-1].lineno if ours else None
        kind = classify(where, layout) if where else "outside_loop"
        # the innermost frame outside torch: which library call synchronised
        origin = next((f for f in reversed(stack) if "/torch/" not in f.filename and "warnings" not in f.filename),
                      None)
        if origin is not None and origin.name == "flush" and origin.filename.endswith("protocol.py"):
            kind = "protocol_flush"
        counts[kind] += 1
        if where:
            by_line[f"train_llm.py:{where}: {source[where - 1].strip()}"] += 1
        if origin is not None:
            root = os.path.dirname(HERE)
            name = os.path.relpath(origin.filename, root) if origin.filename.startswith(root) else origin.filename
            by_origin[f"{name}:{origin.lineno} {origin.name} ({kind})"] += 1

    previous = warnings.showwarning
    result = {"cuda": cuda, "config": os.path.relpath(config, os.path.dirname(HERE)), "gas": args.gas,
              "argv": args.train_llm_args, "layout": layout}
    if cuda:
        warnings.filterwarnings("always", message=".*synchroniz.*")
        warnings.showwarning = on_warning
        torch.cuda.set_sync_debug_mode("warn")
    try:
        rc = train_llm.main(["--config", cfg_path, "--out", args.run_dir, *args.train_llm_args])
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous
    micro = 0
    try:
        with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
            micro = sum(r.get("micro_steps_per_rank", 0) for r in map(json.loads, f) if r.get("type") == "epoch")
    except (OSError, ValueError):
        pass
    result.update(rc=rc, micro_steps=micro, counts=dict(counts) if cuda else None,
                  per_micro_step={k: round(v / micro, 3) for k, v in counts.items()} if cuda and micro else None,
                  micro_step_syncs_target_met=(counts["micro_step"] == 0) if cuda else None,
                  by_line=dict(by_line.most_common(30)), by_origin=dict(by_origin.most_common(30)),
                  note=None if cuda else "no CUDA: the loop ran, nothing was counted")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_line", "by_origin")}))
    for k, v in by_origin.most_common(12):
        print(f"  {v:6d}  {k}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
