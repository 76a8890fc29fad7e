"""Train (or fine-tune) a Llama-architecture language model with TED data pruning under DeepSpeed.

    deepspeed --num_gpus 2 launch/train_llm.py                    # 2 ranks (CPU ranks here)
    torchrun --nproc_per_node 2 launch/train_llm.py --config launch/configs/zero3.json
    python launch/train_llm.py                                    # 1 process
    deepspeed --num_gpus 2 launch/train_llm.py --resume           # continue from the latest checkpoint
    deepspeed --num_gpus 2 launch/train_llm.py --data-format wds  # the same windows as WebDataset tar shards

The DeepSpeed JSON config (``--config``, default launch/configs/zero2.json) carries a ``"ted"``
block: the fields of ``ted_stream.TEDConfig`` plus a ``"scorer"`` sub-block (layers, rows,
reading, ref_ema, seed). The block is validated before anything starts and removed before the
config reaches ``deepspeed.initialize``. See docs/train_llm.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import threading
import sys
import time
from datetime import datetime, timezone
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # ted_stream from a source checkout, too

from provenance import git_state  # noqa: E402
from ted_stream import config as ted_config  # noqa: E402  (numpy only: no torch yet)
from ted_stream.config import READINGS  # noqa: E402,F401  (re-exported for tests)

DEFAULT_CONFIG = os.path.join(HERE, "configs", "zero2.json")


class ConfigError(ValueError):
    pass


# ---- configuration (no heavy imports: a bad config fails in a fraction of a second) ----------
def split_config(raw: dict[str, Any], epochs: int) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(DeepSpeed config without "ted", TEDConfig, scorer settings) from a loaded JSON config.

    Raises ConfigError naming any unknown, ill-typed or invalid key (ted_stream.config.split_config).
    """
    try:
        return ted_config.split_config(raw, epochs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(args: argparse.Namespace) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    try:
        with open(args.config) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read DeepSpeed config {args.config}: {e}") from None
    try:
        ted_config.apply_overrides(raw.setdefault("ted", {}), args.ted)
    except ValueError as e:
        raise ConfigError(f"--ted {e}") from None
    ds_config, ted, scorer = split_config(raw, args.epochs)
    if args.micro_batch:
        ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch
        ds_config.pop("train_batch_size", None)
    if args.lr is not None:
        ds_config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
        sched = ds_config.get("scheduler", {}).get("params", {})
        if "warmup_max_lr" in sched:
            sched["warmup_max_lr"] = args.lr
    if "train_micro_batch_size_per_gpu" not in ds_config:
        raise ConfigError("the DeepSpeed config needs train_micro_batch_size_per_gpu (the per-rank batch "
                          "the streaming loader is built with)")
    return ds_config, ted, scorer


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="DeepSpeed JSON config with a \"ted\" block")
    p.add_argument("--out", default="runs/llm", help="run folder (metrics, checkpoints, plot)")
    p.add_argument("--data-root", default=None,
                   help="where prepared shards live (default <out>/data); '{node}' is replaced by the "
                        "node rank for per-node local copies")
    p.add_argument("--data-format", choices=("mds", "wds"), default="mds",
                   help="the corpus as MDS shards read by TEDStreamingDataset (default), or as indexed "
                        "WebDataset tar shards read by TEDWebDataset's exact path")
    p.add_argument("--table-dir", default=None, help="score table folder (default: beside the shards)")
    p.add_argument("--model", default=None,
                   help="fine-tune a pretrained model: a Hugging Face folder, a .gguf file, or 'smollm2'")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--ted", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the config's \"ted\" block (value parsed as JSON if it can be), "
                        "e.g. --ted target=0 --ted policy=random-dynamic --ted scorer.reading=sqnorm")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-docs", type=int, default=400, help="training documents used (0 = all 3,4k)")
    p.add_argument("--max-samples", type=int, default=0, help="cap on training windows (0 = no cap)")
    p.add_argument("--max-eval", type=int, default=64, help="held-out windows evaluated each epoch")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (scratch model only)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=0, help="override train_micro_batch_size_per_gpu")
    p.add_argument("--lr", type=float, default=None, help="override the optimizer's (and warm-up's) lr")
    p.add_argument("--seed", type=int, default=0, help="model init and data shuffle seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>")
    p.add_argument("--log-ids", action="store_true", help="write each rank's sample ids per step to <out>/ids/")
    p.add_argument("--kill-after-step", type=int, default=0,
                   help="testing: SIGKILL every rank right after optimizer step N (and its checkpoint)")
    p.add_argument("--kill-at", default=None, metavar="PHASE:N",
                   help="testing (launch/soak.py): SIGKILL at a named point: step:N (after optimizer step N "
                        "and its checkpoint), save:N (inside step N's checkpoint: table saved, DeepSpeed's "
                        "files not yet), epoch:E (before epoch E's score merge and mask freeze), frozen:E "
                        "(right after it)")
    p.add_argument("--kill-rank", type=int, default=None, help="testing: only this rank dies at --kill-at")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


# ---- distributed setup ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """`python launch/train_llm.py`: a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1",
                          TED_SINGLE_PROCESS="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # The deepspeed launcher sets LOCAL_SIZE only; streaming counts nodes by LOCAL_WORLD_SIZE.
    if "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1"))


def die_with_launcher(poll: float = 1.0) -> list[int]:
    """End this rank (SIGTERM) when its launcher dies: a SIGKILLed `deepspeed` launcher must not
    leave ranks training into the same --out while a resumed job starts. Watches the parent (the
    per-node launcher or torchrun) and, under `deepspeed`, the runner above it; returns the pids
    watched (none for a process started by hand)."""
    if "LOCAL_RANK" not in os.environ or os.environ.get("TED_SINGLE_PROCESS"):
        return []
    watched = [os.getppid()]
    grand = _parent_of(watched[0])
    if grand and "deepspeed" in _cmdline(grand):
        watched.append(grand)

    def watch() -> None:
        while True:
            for pid in watched:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    print(f"[train_llm] rank {os.environ.get('RANK')}: launcher process {pid} is gone; "
                          "stopping", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(poll)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()
    return watched


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Ctx:
    """Rank layout and a few collectives over torch.distributed."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ["LOCAL_WORLD_SIZE"])
        self.node = self.rank // self.local_world
        self.is_leader = self.rank == 0
        self.is_local_leader = self.local_rank == 0

    def barrier(self) -> None:
        self.dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        import torch

        from ted_stream.dist import collective_device

        # on the backend's device: NCCL refuses CPU tensors
        t = torch.tensor(values, dtype=torch.float64, device=collective_device() if self.world > 1 else "cpu")
        if self.world > 1:
            self.dist.all_reduce(t)
        return t.tolist()

    def sum_on_device(self, value: Any) -> float:
        """The sum over ranks of a one-element tensor on this rank's device, read on the host
        once (a sync; ``sum`` would read it, copy it back and read it again)."""
        import torch

        total = torch.as_tensor(value, dtype=torch.float64).reshape(1)
        if self.world > 1:
            self.dist.all_reduce(total)
        return float(total)

    def gather(self, value: int) -> list[int]:
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def log(self, msg: str) -> None:
        if self.is_leader:
            print(f"[train_llm] {msg}", flush=True)


# ---- small helpers ---------------------------------------------------------------------------
def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "input_ids": torch.tensor([s["input_ids"] for s in samples], dtype=torch.long),
        "ted_id": torch.tensor([s["ted_id"] for s in samples], dtype=torch.long),
        "ted_weight": torch.tensor([s["ted_weight"] for s in samples], dtype=torch.float32),
    }


def filter_jsonl(path: str, keep) -> None:
    """Rewrite a JSONL file keeping the rows where keep(row) is true (resume: drop redone work)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # torn by a kill mid-write: that row is redone anyway
    rows = [json.loads(line) for line in lines]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            if keep(row):
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def latest_tag(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU allreduce leaves ~66 MB buffers in /dev/shm named after this job's port."""
    prefix = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
              f"{os.environ.get('MASTER_PORT', '')}_")
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def _shm_in_use(folder: str) -> set[str]:
    """Names under ``folder`` that a live process (of this user: others' /proc is unreadable) maps
    or holds open."""
    used = set()
    prefix = os.path.realpath(folder) + "/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.split(prefix, 1)[1].split(" (deleted)")[0].strip() for line in f if prefix in line)
            fds = f"/proc/{pid}/fd"
            used.update(os.readlink(os.path.join(fds, fd))[len(prefix):] for fd in os.listdir(fds)
                        if os.readlink(os.path.join(fds, fd)).startswith(prefix))
        except OSError:  # gone, or another user's
            continue
    return used


def clean_stale_shm(folder: str = "/dev/shm") -> list[str]:
    """Remove what killed runs left in ``folder``: DeepSpeed's CPU allreduce buffers (~69 MB each,
    named after the run's port, so a run on another port never finds them) and mosaicml-streaming's
    segments (``NNNNNN_*``; a stale ``_locals`` makes the next dataset on the same folder fail).
    Only this user's files that no live process maps or holds open go: a job running beside this
    one keeps its buffers. Returns the names removed."""
    uid = os.getuid()
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    ours = []
    for name in names:
        if name.startswith(f"deepspeed_allreduce_buffer_{uid}_") or (name[:6].isdigit() and name[6:7] == "_"):
            try:
                if os.stat(os.path.join(folder, name)).st_uid == uid:
                    ours.append(name)
            except OSError:
                pass
    if not ours:
        return []
    used = _shm_in_use(folder)
    removed = []
    for name in ours:
        if name not in used:
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


# What DeepSpeed pickles into its ZeRO 1-3 checkpoints besides tensors and containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint): plain data classes with no side effects.
CHECKPOINT_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")


def load_checkpoint_weights_only(engine: Any, ckpt_dir: str, tag: str) -> Any:
    """``engine.load_checkpoint`` with every file read by ``torch.load(weights_only=True)``.

    DeepSpeed's own engine unpickles with ``weights_only=False``, so a checkpoint folder could
    run code on resume; here it may hold only tensors, containers and CHECKPOINT_GLOBALS.
    """
    import importlib

    import torch

    allowed = [getattr(importlib.import_module(mod), name)
               for mod, name in (g.rsplit(".", 1) for g in CHECKPOINT_GLOBALS)]
    engine.checkpoint_engine.load = lambda path, map_location=None: torch.load(
        path, map_location=map_location, weights_only=True)
    with torch.serialization.safe_globals(allowed):
        return engine.load_checkpoint(ckpt_dir, tag=tag)


def build_model(args: argparse.Namespace, vocab_size: int, eot_id: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        from llm_data import model_files

        folder, gguf = model_files(args.model)
        kw = {"gguf_file": gguf} if gguf else {}
        return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, **kw)
    torch.manual_seed(args.seed)
    heads = args.heads
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=args.seq_len, bos_token_id=eot_id, eos_token_id=eot_id,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def plot(out: str, epochs: list[dict[str, Any]], steps: list[dict[str, Any]], title: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not epochs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [r["epoch"] for r in epochs]
    if steps:
        per_epoch = {}
        for r in steps:
            per_epoch.setdefault(r["epoch"], []).append(r["loss"])
        a1.plot(sorted(per_epoch), [sum(v) / len(v) for _, v in sorted(per_epoch.items())],
                "o--", color="tab:gray", label="train loss (epoch mean)")
    a1.plot(ep, [r["eval_loss"] for r in epochs], "o-", color="tab:blue", label="held-out loss (end of epoch)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss (nats/token)")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.bar(ep, [r["kept"] / r["num_samples"] for r in epochs], color="tab:green", alpha=0.6,
           label="kept fraction")
    a2.plot(ep, [max(0.0, r["saved_so_far"]) for r in epochs], "s-", color="tab:red",
            label="measured saved so far")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 1.05)
    a2.legend()
    a2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run ---------------------------------------------------------------------------------
def claim_folder(args: argparse.Namespace, ctx: Ctx, folder: str) -> None:
    """One job per --out and table folder (ted_stream.joblock), claimed by rank 0 before anything
    in it is deleted or resumed: a second job started on a live folder would otherwise clear the
    running job's checkpoints, ids and table before its dataset is refused. Every rank raises the
    refusal."""
    from ted_stream import joblock
    from ted_stream.table import TableError

    refusal = [""]
    if ctx.is_leader:
        try:
            joblock.claim(folder, args)  # held while args lives: the whole run
        except TableError as err:
            refusal[0] = str(err)
    if ctx.world > 1:
        ctx.dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise TableError(refusal[0])


def start_run_dir(args: argparse.Namespace, ctx: Ctx, ckpt_dir: str) -> Optional[str]:
    """The checkpoint tag to resume from, or None; a fresh run first clears an earlier one's files."""
    resume_tag = latest_tag(ckpt_dir) if args.resume else None
    if args.resume and resume_tag is None:
        ctx.log(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    if ctx.is_leader:
        os.makedirs(args.out, exist_ok=True)
        if resume_tag is None:  # a fresh run: nothing of an earlier one may leak in
            for stale in ("checkpoints", "ids", "metrics.jsonl"):
                path = os.path.join(args.out, stale)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                    os.path.exists(path) and os.unlink(path))
    ctx.barrier()
    return resume_tag


def prepare_data(args: argparse.Namespace, ctx: Ctx) -> tuple[str, dict[str, Any]]:
    """Shards and metadata: rank 0 prepares, then the leader of any node without its own copy."""
    import llm_data

    root = (args.data_root or os.path.join(args.out, "data")).replace("{node}", str(ctx.node))
    data_dir = os.path.join(root, llm_data.data_tag(args.model, args.vocab_size, args.seq_len,
                                                    args.max_docs or None, args.max_samples or None,
                                                    args.data_format))
    prep = dict(seq_len=args.seq_len, vocab_size=args.vocab_size, model=args.model,
                max_docs=args.max_docs or None, max_samples=args.max_samples or None,
                max_eval=args.max_eval, fmt=args.data_format, log=ctx.log)
    if ctx.is_leader:
        llm_data.prepare(data_dir, **prep)
    ctx.barrier()
    if ctx.is_local_leader and not ctx.is_leader:
        llm_data.prepare(data_dir, **prep)
    ctx.barrier()
    with open(os.path.join(data_dir, "meta.json")) as f:
        return data_dir, json.load(f)


def place_table(args: argparse.Namespace, ctx: Ctx, data_dir: str, resume: bool) -> str:
    """The score table's folder; a new run first deletes an earlier run's table (a resumed one
    gets its checkpoint's table from TEDProtocol.restore)."""
    from ted_stream.table import FILENAME

    table_dir = args.table_dir.replace("{node}", str(ctx.node)) if args.table_dir else os.path.join(data_dir, "ted")
    claim_folder(args, ctx, table_dir)  # after prepare_data: the default folder is inside the prepared one
    table_path = os.path.join(table_dir, FILENAME)
    if ctx.is_local_leader and not resume:
        try:  # every node's leader does this: on a shared folder another may have been first
            os.unlink(table_path)
        except FileNotFoundError:
            pass
    ctx.barrier()
    return table_dir


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        ds_config, ted, scorer_cfg = load_config(args)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_llm: {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    single_process_env()
    die_with_launcher()
    if os.environ.get("LOCAL_RANK", "0") == "0":  # before init_distributed: no rank of this job has any yet
        removed = clean_stale_shm()
        if removed:
            print(f"[train_llm] removed {len(removed)} shared-memory file(s) left in /dev/shm by killed "
                  f"runs: {', '.join(sorted(removed))}", flush=True)

    import numpy as np
    import torch
    import deepspeed
    from tqdm import tqdm

    import llm_data
    from ted_stream.protocol import TEDProtocol, deepspeed_loss_scale
    from ted_stream.scorer import per_sample_lm_loss, predicted_igd

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or max(1, cores // int(os.environ["LOCAL_WORLD_SIZE"])))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    ctx = Ctx()
    out = args.out
    ckpt_dir = os.path.join(out, "checkpoints")
    claim_folder(args, ctx, out)
    resume_tag = start_run_dir(args, ctx, ckpt_dir)
    data_dir, meta = prepare_data(args, ctx)
    table_dir = place_table(args, ctx, data_dir, resume_tag is not None)

    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    gas = int(ds_config.get("gradient_accumulation_steps", 1))
    ds = llm_data.open_train(data_dir, args.data_format, table_dir=table_dir, batch_size=micro, seed=args.seed,
                             ted=ted)
    loader = llm_data.train_loader(ds, collate)  # its position goes into every checkpoint
    n = ds.num_samples

    # -- model, TED protocol (its scorer hooks the model before DeepSpeed wraps it), engine
    model = build_model(args, meta["vocab_size"], meta["eot_id"])
    protocol = TEDProtocol(ds, model, scorer=scorer_cfg, epochs=args.epochs)
    reading = protocol.reading
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad], config=ds_config)
    n_params = sum(p.numel() for p in model.parameters()) if ds_config.get("zero_optimization", {}).get(
        "stage", 0) < 3 else sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    eval_rows = np.load(os.path.join(data_dir, "eval.npy"))
    eval_rows = eval_rows[: len(eval_rows) // ctx.world * ctx.world]
    if len(eval_rows) == 0:
        raise SystemExit(f"fewer held-out windows than ranks ({ctx.world}); raise --max-eval or --max-docs")

    state = {"epoch": 0, "step": 0, "trained": 0, "epoch_trained": 0, "epoch_micro": 0}
    if resume_tag is not None:
        _, client = load_checkpoint_weights_only(engine, ckpt_dir, resume_tag)
        state.update(client["train"])
        # the checkpoint's table replaces the live one, which a later save may have put ahead of it
        protocol.restore(os.path.join(ckpt_dir, resume_tag), client["ted_protocol"], loader)
        ctx.log(f"resumed from {resume_tag}: epoch {state['epoch']}, step {state['step']}")
    metrics_path = os.path.join(out, "metrics.jsonl")
    ids_path = os.path.join(out, "ids", f"rank{ctx.rank}.jsonl")
    if resume_tag is not None:  # drop what the killed run did after its checkpoint: it is redone
        if ctx.is_leader:
            filter_jsonl(metrics_path, lambda r: (r["type"] == "step" and r["step"] <= state["step"])
                         or (r["type"] == "epoch" and r["epoch"] < state["epoch"]) or r["type"] == "run")
        filter_jsonl(ids_path, lambda r: r["step"] <= state["step"])
    if args.log_ids:
        os.makedirs(os.path.dirname(ids_path), exist_ok=True)
    metrics = open(metrics_path, "a", buffering=1) if ctx.is_leader else None
    ids_log = open(ids_path, "a", buffering=1) if args.log_ids else None

    def emit(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")

    def evaluate() -> float:
        engine.eval()
        total = 0.0
        mine = torch.from_numpy(eval_rows[ctx.rank:: ctx.world].astype(np.int64))
        with torch.no_grad():
            for i in range(0, len(mine), micro):
                ids = mine[i: i + micro].to(engine.device)  # the held-out rows start on the CPU
                logits = engine(input_ids=ids).logits
                total += float(per_sample_lm_loss(logits, ids).sum())
        engine.train()
        return ctx.sum([total])[0] / len(eval_rows)

    # the starting point (the pretrained model's loss, for a fine-tune): what pruning has to improve on
    initial_eval = evaluate() if resume_tag is None else None
    if ctx.is_leader:
        if resume_tag is None:
            emit({"type": "run", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "argv": sys.argv, "world": ctx.world, "nodes": ctx.world // ctx.local_world,
                  "threads_per_rank": torch.get_num_threads(), "params": n_params, "data": meta,
                  "ted": ted.to_dict(), "scorer": scorer_cfg.to_dict(), "deepspeed": ds_config, "initial_eval_loss": initial_eval,
                  "torch": torch.__version__, "deepspeed_version": deepspeed.__version__, **git_state()})
        if args.model is None:
            shutil.copyfile(os.path.join(data_dir, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    ctx.log(f"{ctx.world} rank(s) on {ctx.world // ctx.local_world} node(s); {n} training windows of "
            f"{args.seq_len} tokens, {len(eval_rows)} held out; {n_params / 1e6:.2f}M parameters; "
            f"ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}; TED {ted.to_dict()}; "
            f"scorer {scorer_cfg}" + (f"; held-out loss before training {initial_eval:.4f}" if initial_eval is not None else ""))

    def kill_point(phase: str, n: int) -> None:
        if args.kill_at == f"{phase}:{n}" and args.kill_rank in (None, ctx.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint() -> None:
        tag = f"step{state['step']}"
        # merges every rank's scores so far (collective), persists, copies the table into the tag
        ted_state = protocol.checkpoint(os.path.join(ckpt_dir, tag), loader)
        ctx.barrier()
        kill_point("save", state["step"])
        # DeepSpeed's rank 0 writes `latest` once its own files are saved, before the other ranks'
        # are: a rank killed then (its launcher SIGKILLed, say) left `latest` naming a torn
        # checkpoint that no resume could load. Written here once save_checkpoint's closing
        # barrier says every rank's files are complete.
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={
            "ted_protocol": ted_state, "train": dict(state), "ted": ted.to_dict()}, save_latest=False)
        if ctx.is_leader:
            with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
                f.write(tag)
            os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
        if ctx.is_leader and args.keep_checkpoints > 0:
            tags = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("step")), key=lambda d: int(d[4:]))
            for old in tags[: -args.keep_checkpoints]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)

    epoch_rows: list[dict[str, Any]] = []
    if os.path.exists(metrics_path) and ctx.is_leader:
        with open(metrics_path) as f:
            epoch_rows = [r for r in map(json.loads, f) if r["type"] == "epoch"]
    t_run = time.time()
    for epoch in range(state["epoch"], args.epochs):
        kill_point("epoch", epoch)
        # collective: merge scores, freeze and broadcast the mask
        steps_this_epoch = protocol.start_epoch(epoch)["steps"]
        mask = ds.table.masks[epoch]
        kill_point("frozen", epoch)
        fresh_epoch = not (state["epoch"] == epoch and (state["epoch_micro"] > 0 or state["epoch_trained"] > 0))
        if fresh_epoch:
            state.update(epoch=epoch, epoch_trained=0, epoch_micro=0)
        pruned = ~np.unpackbits(mask.keep, bitorder="little", count=n).astype(bool)
        pruned &= ds.table.scored
        igd = None
        if reading in ("d", "s") and pruned.any():
            igd = predicted_igd(torch.from_numpy(ds.table.score_array()[pruned]), engine.get_lr()[0] or 0.0, n,
                                reading)
        bar = tqdm(total=steps_this_epoch, initial=state["epoch_micro"], desc=f"epoch {epoch}",
                   disable=not ctx.is_leader, dynamic_ncols=True, leave=True, file=sys.stderr,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
        t_epoch = time.time()
        t_step = time.time()
        window_loss, window_count = 0.0, 0  # this optimizer step's loss sum (on the device) and samples
        for batch in loader:
            # this rank's device, not always cuda:0; the loader pins its batches on a GPU host, so the
            # copies do not block the host
            ids = batch["input_ids"].to(engine.device, non_blocking=True)
            # with the inputs: a host copy queued after the forward would wait for it on a GPU
            weighted = {"ted_id": batch["ted_id"], "ted_weight": batch["ted_weight"].to(engine.device, non_blocking=True)}
            logits = engine(input_ids=ids).logits
            per_sample = per_sample_lm_loss(logits, ids)
            engine.backward(protocol.loss(per_sample, weighted))  # weighted by ted_weight
            protocol.score(backward_scale=deepspeed_loss_scale(engine) / gas)  # the engine divides by GAS
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the rate this step applies
            engine.step()
            window_loss = window_loss + per_sample.detach().sum()  # read once per optimizer step
            count = len(ids) * ctx.world  # every rank trains equal batches (streaming pads equal shares)
            window_count += count
            state["epoch_micro"] += 1
            state["epoch_trained"] += count
            state["trained"] += count
            step_done = boundary
            if ids_log is not None:
                ids_log.write(json.dumps({"epoch": epoch, "step": state["step"] + 1,
                                          "ids": batch["ted_id"].tolist()}) + "\n")
            if step_done:
                state["step"] += 1
                dt = time.time() - t_step
                t_step = time.time()
                row = {"type": "step", "step": state["step"], "epoch": epoch,
                       "loss": ctx.sum_on_device(window_loss) / window_count, "lr": lr,
                       "samples_per_s": window_count / dt, "tokens_per_s": window_count * args.seq_len / dt}
                window_loss, window_count = 0.0, 0
                emit(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                if args.save_every and state["step"] % args.save_every == 0:
                    checkpoint()
                if args.kill_after_step and state["step"] == args.kill_after_step:
                    if ids_log is not None:
                        ids_log.flush()
                    ctx.barrier()
                    os.kill(os.getpid(), signal.SIGKILL)
                kill_point("step", state["step"])
            bar.update(1)
        bar.close()
        protocol.end_epoch()  # the scores still buffered on the device reach the table
        micro_steps = ctx.gather(state["epoch_micro"])
        if len(set(micro_steps)) != 1:
            raise RuntimeError(f"epoch {epoch}: ranks ran different numbers of micro-steps {micro_steps}")
        eval_loss = evaluate()
        row = {"type": "epoch", "epoch": epoch, "num_samples": n, "kept": mask.kept, "pruned": n - mask.kept,
               "trained": state["epoch_trained"], "micro_steps_per_rank": micro_steps[0],
               "saved_so_far": 1 - state["trained"] / ((epoch + 1) * n), "predicted_igd": igd,
               "reading": reading, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
               "seconds": time.time() - t_epoch, "step": state["step"]}
        emit(row)
        epoch_rows.append(row)
        ctx.log(f"epoch {epoch}: kept {mask.kept}/{n}, trained {state['epoch_trained']} samples in "
                f"{micro_steps[0]} micro-steps per rank, saved so far {row['saved_so_far']:.1%}, held-out loss "
                f"{eval_loss:.4f} (ppl {row['eval_ppl']:.1f}), predicted IGD {igd}")
        state.update(epoch=epoch + 1, epoch_trained=0, epoch_micro=0)
    ds.save_table()
    total = args.epochs * n
    ctx.log(f"done in {time.time() - t_run:.0f} s: trained on {state['trained']} of {total} sample-iterations "
            f"({1 - state['trained'] / total:.1%} saved)")
    if ctx.is_leader:
        emit({"type": "summary", "trained": state["trained"], "sample_iterations_full": total,
              "saved": 1 - state["trained"] / total, "final_eval_loss": epoch_rows[-1]["eval_loss"] if epoch_rows else None,
              "seconds": time.time() - t_run, "step": state["step"]})
        with open(metrics_path) as f:
            steps = [r for r in map(json.loads, f) if r["type"] == "step"]
        title = (f"{os.path.basename(os.path.abspath(out))}: policy {ted.policy}, target {ted.target}, "
                 f"reading {reading}, {ctx.world} rank(s)")
        path = plot(out, epoch_rows, steps, title)
        ctx.log(f"metrics: {metrics_path}; plot: {path}")
        metrics.close()
    if ids_log is not None:
        ids_log.close()
    ctx.barrier()
    if ctx.is_local_leader:
        unlink_deepspeed_shm()
    engine.destroy()
    ctx.dist.destroy_process_group()
    return 0


def run() -> int:
    """main(), with the refusals a user acts on (another job holds the folder, a shard is missing
    or damaged) as one line naming the folder or shard instead of a traceback per rank."""
    try:
        return main()
    except Exception as err:
        from ted_stream.loaders.upstream import ShardError
        from ted_stream.table import TableError

        if not isinstance(err, (ShardError, TableError)):
            raise
        print(f"train_llm: rank {os.environ.get('RANK', '0')}: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(run())
