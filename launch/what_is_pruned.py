"""What do the scores prune? One TED run per task, then the pruned and kept samples compared.

For the last pruned epoch of a run (hard selection by default, so the scores alone choose), and
for each tenth of the final scores, it reports: the share of the training samples the run's own
final model gets wrong (a label-noise proxy: a wrong label is learned last or never), the class
mix, the passage length in words (text tasks) and the share of exact duplicates.

    .venv/bin/python launch/what_is_pruned.py --task rotten --epochs 6
    .venv/bin/python launch/what_is_pruned.py --task fashion --limit 20000 --epochs 8

Writes docs/results/what_is_pruned_<task>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np
import torch
from streaming import StreamingDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_classifier as tc  # noqa: E402
from provenance import git_state  # noqa: E402
from ted_stream import ScoreTable  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe(ids: np.ndarray, wrong: np.ndarray, labels: np.ndarray, words: np.ndarray | None,
             duplicate: np.ndarray, classes: int) -> dict:
    share = np.bincount(labels[ids], minlength=classes) / max(1, len(ids))
    return {"n": int(len(ids)), "wrong": float(wrong[ids].mean()), "duplicate": float(duplicate[ids].mean()),
            "words": None if words is None else float(words[ids].mean()),
            "class_share": [round(float(x), 4) for x in share]}


def main() -> None:
    p = tc.parser()
    p.description = __doc__
    p.set_defaults(policy="ted", target_saved=0.5, tail=0, keep_table=True)
    args = p.parse_args()
    args.keep_table = True
    result = tc.run(args)
    task = tc.TASKS[args.task]()
    table = ScoreTable.load(result["table"])
    pruned_epochs = [e for e, m in sorted(table.masks.items()) if m.kept < table.num_samples]
    if not pruned_epochs:
        raise SystemExit("the run pruned nothing: raise --target-saved or --epochs")
    epoch = pruned_epochs[-1]
    mask = table.masks[epoch]
    keep = np.unpackbits(mask.keep, bitorder="little", count=mask.num_samples).astype(bool)

    ds = StreamingDataset(local=result["data"], batch_size=256)
    samples = [ds.get_item(i) for i in range(ds.num_samples)]
    labels = np.array([s["label"] for s in samples])
    model = task.model()
    model.load_state_dict(torch.load(os.path.join(os.path.dirname(result["table"]), "model.pt"), weights_only=True))
    model.eval()
    raw_key = next(k for k in ("image", "features", "states", "tokens") if k in samples[0])
    with torch.no_grad():
        pred = torch.cat([model(task.inputs({raw_key: [s[raw_key] for s in samples[i:i + 512]]}))[1].argmax(1)
                          for i in range(0, len(samples), 512)]).numpy()
    wrong = pred != labels
    content = [s["text"] if "text" in s else s[raw_key] for s in samples]
    counts = collections.Counter(content)
    duplicate = np.array([counts[c] > 1 for c in content])
    words = np.array([len(s["text"].split()) for s in samples]) if "text" in samples[0] else None
    classes = int(labels.max()) + 1

    scores = table.score_array()
    order = np.argsort(scores, kind="stable")
    rows = {"all": describe(np.arange(len(labels)), wrong, labels, words, duplicate, classes),
            f"pruned in epoch {epoch}": describe(np.flatnonzero(~keep), wrong, labels, words, duplicate, classes),
            f"kept in epoch {epoch}": describe(np.flatnonzero(keep), wrong, labels, words, duplicate, classes)}
    for d, part in enumerate(np.array_split(order, 10)):
        rows[f"score decile {d + 1}"] = describe(part, wrong, labels, words, duplicate, classes)
    out = {"task": args.task, "command": " ".join(sys.argv), "result": {k: result[k] for k in ("test_acc", "saved", "config", "seed")},
           "epoch": epoch, "rows": rows, **git_state()}
    path = os.path.join(ROOT, "docs", "results", f"what_is_pruned_{args.task}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"| {args.task}: samples | n | final model wrong | duplicates | words | largest class share |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        w = "–" if r["words"] is None else f"{r['words']:.1f}"
        print(f"| {name} | {r['n']} | {r['wrong']:.1%} | {r['duplicate']:.1%} | {w} | {max(r['class_share']):.1%} |")


if __name__ == "__main__":
    main()
