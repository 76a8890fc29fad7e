"""Step `scorer` of launch/gpu_check.sh: TaylorScorer's cost at SmolLM2-135M's shape (bf16, 16 x 1,024
tokens) under plain PyTorch and DeepSpeed ZeRO-2, and its exactness against an fp32 oracle.

    python launch/gpu_scorer.py --device cuda --out scorer.json [--budget-s 80]
    python launch/gpu_scorer.py --device cpu --tiny --out scorer.json     # the CPU rehearsal

1. Exactness: a small Llama (fp32), scores of each mask against exact per-sample gradients on the
   same rows (one backward per sample); then the default mask on the same model in bf16 against
   the fp32 oracle (Spearman rank agreement; issue 22's bar: >= 0.99).
2. Cost: LlamaForCausalLM of SmolLM2-135M's shape, random init and random tokens (the cost does not
   depend on the weights). Engines: ``torch`` (fp32 master weights, bf16 autocast, fused AdamW,
   clipping 1.0) and ``deepspeed`` (ZeRO-2, 1 rank, launch/configs/zero2_bf16.json). A step as
   TEDProtocol runs it: forward, per-sample loss, backward of the weighted mean, the scorer, the
   optimizer; scores buffered on the device and copied to the host every 16 steps. Modes
   interleaved in rotated rounds after a warm-up, synchronised around every step; median ms per
   step and its ratio to ``off``. Issue 22's target: the default mask <= 1.05x.
The JSON is rewritten after every phase: a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ted_stream.config import ScorerSettings, split_config  # noqa: E402

DEFAULT = ScorerSettings()
from ted_stream.scorer import TaylorScorer, per_sample_lm_loss  # noqa: E402

RESULT: dict = {"errors": []}
MODES = {"off": None,
         "default (every linear layer, 16 rows)": (DEFAULT.layers, DEFAULT.rows),
         "every linear layer, 64 rows": (("*",), 64), "lm_head, 256 rows": (("lm_head",), 256)}
SMOLLM2 = dict(vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv=3, tied=True)
TINY = dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2, tied=True)


def save(path: str) -> None:
    RESULT["elapsed_s"] = round(time.time() - T0, 1)
    with open(path + ".tmp", "w") as f:
        json.dump(RESULT, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def llama(shape: dict, max_pos: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
        max_position_embeddings=max_pos, tie_word_embeddings=shape["tied"], attn_implementation="sdpa"))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = (v.double().argsort().argsort().double() for v in (x, y))
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def oracle(model, ids, selection) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients on the selected rows (one backward per sample), G = their mean."""
    mods = dict(model.named_modules())
    rows = []
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        per_sample_lm_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1])[0].backward()
        parts = []
        for name, r in selection.items():
            m = mods[name]
            r = r.to(m.weight.device)
            parts.append(m.weight.grad[r].flatten().double())
            if m.bias is not None:
                parts.append(m.bias.grad[r].double())
        rows.append(torch.cat(parts))
    model.zero_grad(set_to_none=True)
    g = torch.stack(rows)
    s = g @ g.mean(0)
    sq = (g * g).sum(1)
    return {"s": s, "sqnorm": sq, "d": sq - s}


def exactness(dev: torch.device, tiny: bool) -> dict:
    shape = dict(vocab=1000, hidden=128, inter=384, layers=2, heads=4, kv=2, tied=False)
    seq, batch, big = (32, 4, 8) if tiny else (128, 4, 32)
    out: dict = {"model": f"Llama {shape}, fp32, eval()", "batch": f"{batch} x {seq} random tokens"}
    model = llama(shape, seq, seed=1).to(dev).eval()
    ids = torch.randint(0, shape["vocab"], (batch, seq), generator=torch.Generator().manual_seed(2)).to(dev)
    for name, spec in MODES.items():
        if spec is None:
            continue
        scorer = TaylorScorer(model, layers=spec[0], rows=spec[1], seed=DEFAULT.seed)
        model.zero_grad(set_to_none=True)
        loss = per_sample_lm_loss(model(input_ids=ids).logits, ids)
        loss.mean().backward()
        sc = scorer.compute(1.0 / len(ids), loss=loss)
        selection = scorer.selection
        scorer.remove()
        ref = oracle(model, ids, selection)
        row = {f"max_rel_err_{k}": rel_err(getattr(sc, k), ref[k]) for k in ("s", "sqnorm", "d")}
        row["pass_1e-4"] = all(v <= 1e-4 for v in row.values())
        out[name] = row
    # the default mask on the model in bf16 (what a bf16 run records) against the fp32 oracle
    layers, rows = MODES["default (every linear layer, 16 rows)"]
    ids = torch.randint(0, shape["vocab"], (big, seq), generator=torch.Generator().manual_seed(3)).to(dev)
    bf = llama(shape, seq, seed=1).to(dev).eval().to(torch.bfloat16)
    scorer = TaylorScorer(bf, layers=layers, rows=rows, seed=DEFAULT.seed)
    per_sample_lm_loss(bf(input_ids=ids).logits, ids).mean().backward()
    sc = scorer.compute(1.0 / len(ids))
    selection = scorer.selection
    scorer.remove()
    ref = oracle(llama(shape, seq, seed=1).to(dev).eval(), ids, selection)
    row = {**{f"max_rel_err_{k}": rel_err(getattr(sc, k), ref[k]) for k in ("s", "sqnorm", "d")},
           **{f"spearman_{k}": spearman(getattr(sc, k).cpu(), ref[k].cpu()) for k in ("s", "sqnorm", "d")}}
    row["spearman_target_met"] = all(row[f"spearman_{k}"] >= 0.99 for k in ("s", "sqnorm", "d"))
    out[f"bf16 default mask vs the fp32 oracle ({big} x {seq} tokens)"] = row
    return out


class TorchEngine:
    name = "torch: fp32 master weights, bf16 autocast, fused AdamW, clipping 1.0"

    def __init__(self, shape, seq, micro, dev):
        self.dev, self.micro = dev, micro
        self.module = llama(shape, seq).to(dev).train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        fused = {"fused": True} if dev.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01, **fused)

    def step(self, ids, scorer, buf):
        w = torch.ones(len(ids), device=self.dev)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16):
            logits = self.module(input_ids=ids).logits
        per_sample = per_sample_lm_loss(logits, ids)
        (per_sample * w).mean().backward()
        if scorer is not None:
            buf.append(scorer.compute(w / len(ids), loss=per_sample).d.detach())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self):
        pass


class DeepSpeedEngine:
    name = "deepspeed: ZeRO-2, bf16, 1 rank (launch/configs/zero2_bf16.json)"

    def __init__(self, shape, seq, micro, dev):
        import deepspeed

        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
        with open(os.path.join(HERE, "configs", "zero2_bf16.json")) as f:
            ds_config, _, _ = split_config(json.load(f), 4)
        ds_config["train_micro_batch_size_per_gpu"] = micro
        ds_config["optimizer"]["params"]["lr"] = ds_config["scheduler"]["params"]["warmup_max_lr"] = 1e-4
        self.gas = int(ds_config.get("gradient_accumulation_steps", 1))
        model = llama(shape, seq)  # fp32, as train_llm.build_model: DeepSpeed casts and places it
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                              if p.requires_grad], config=ds_config)
        self.module = self.engine.module

    def step(self, ids, scorer, buf):
        from ted_stream.protocol import deepspeed_loss_scale

        e = self.engine
        w = torch.ones(len(ids), device=ids.device)
        per_sample = per_sample_lm_loss(e(input_ids=ids).logits, ids)
        e.backward((per_sample * w).mean())
        if scorer is not None:
            buf.append(scorer.compute(w * deepspeed_loss_scale(e) / (len(ids) * self.gas), loss=per_sample).d.detach())
        e.step()

    def close(self):
        self.engine.destroy()


def time_engine(eng, data, dev, args, deadline) -> dict:
    report = {"engine": eng.name, "micro_batch": len(data[0]),
              "modes": {m: {"ms": [], "peak_alloc_mib": 0.0, "status": "ok"} for m in MODES}}
    res = report["modes"]
    k = [0]

    def run(mode, untimed, timed):
        spec = MODES[mode]
        scorer = None if spec is None else TaylorScorer(eng.module, layers=spec[0], rows=spec[1],
                                                        seed=DEFAULT.seed)
        buf: list = []
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            for i in range(untimed + timed):
                k[0] += 1
                ids = data[k[0] % len(data)]
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                eng.step(ids, scorer, buf)
                if len(buf) >= 16:  # TEDProtocol's flush: one host copy per 16 micro-steps
                    torch.cat(buf).float().cpu()
                    buf.clear()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= untimed:
                    res[mode]["ms"].append((time.perf_counter() - t) * 1e3)
            if dev.type == "cuda":
                res[mode]["peak_alloc_mib"] = max(res[mode]["peak_alloc_mib"],
                                                  torch.cuda.max_memory_allocated(dev) / 2**20)
        except Exception as e:  # one mode's failure (an OOM) must not end the others
            res[mode]["status"] = f"{type(e).__name__}: {e}"[:400]
            RESULT["errors"].append(f"{eng.name} / {mode}: {traceback.format_exc()[-1500:]}")
        finally:
            if scorer is not None:
                scorer.remove()

    for mode in MODES:
        run(mode, args.warmup, 0)
    order = list(MODES)
    for r in range(args.rounds):
        if time.time() > deadline:
            report["cut_short"] = f"stopped before round {r + 1} of {args.rounds}: --budget-s"
            break
        for mode in order[r % len(order):] + order[: r % len(order)]:
            if res[mode]["status"] == "ok":
                run(mode, 1, args.steps)
        report["rounds_done"] = r + 1
    off = statistics.median(res["off"]["ms"]) if res["off"]["ms"] else None
    for v in res.values():
        if v["ms"]:
            v["median_ms"] = round(statistics.median(v["ms"]), 3)
            v["n"] = len(v["ms"])
            v["ratio_to_off"] = round(v["median_ms"] / off, 4) if off else None
        v["ms"] = [round(x, 2) for x in v["ms"]]
        v["peak_alloc_mib"] = round(v["peak_alloc_mib"], 1)
    default = res["default (every linear layer, 16 rows)"].get("ratio_to_off")
    report["default_target_met"] = None if default is None else default <= 1.05
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    ap.add_argument("--engines", default="torch,deepspeed")
    ap.add_argument("--budget-s", type=float, default=80.0, help="start no round after this (from the start)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    shape = TINY if args.tiny else SMOLLM2
    if args.tiny:
        args.micro, args.seq, args.rounds, args.steps, args.warmup = 2, 32, 2, 2, 1
    import transformers

    RESULT.update(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                  cuda=torch.version.cuda, transformers=transformers.__version__, argv=sys.argv,
                  shape={**shape, "name": "tiny" if args.tiny else "SmolLM2-135M"}, seq=args.seq,
                  scorer_defaults=DEFAULT.to_dict())
    save(args.out)
    t = time.time()
    try:
        RESULT["exactness"] = exactness(dev, args.tiny)
    except Exception:
        RESULT["errors"].append("exactness: " + traceback.format_exc()[-2000:])
    RESULT["exactness_s"] = round(time.time() - t, 1)
    save(args.out)
    print(json.dumps(RESULT.get("exactness"), indent=1), flush=True)
    deadline = T0 + args.budget_s
    RESULT["engines"] = {}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for i, which in enumerate(engines):
        # each engine gets its share of what is left, so the second is not starved
        share = time.time() + (deadline - time.time()) / (len(engines) - i)
        eng = None
        t = time.time()
        try:
            g = torch.Generator().manual_seed(0)
            data = [torch.randint(0, shape["vocab"], (args.micro, args.seq), generator=g).to(dev) for _ in range(4)]
            eng = (TorchEngine if which == "torch" else DeepSpeedEngine)(shape, args.seq, args.micro, dev)
            RESULT["engines"][which] = time_engine(eng, data, dev, args, share)
        except Exception:
            RESULT["errors"].append(f"{which}: " + traceback.format_exc()[-2500:])
        if which in RESULT["engines"]:
            RESULT["engines"][which]["seconds"] = round(time.time() - t, 1)
            for m, v in RESULT["engines"][which]["modes"].items():
                print(f"{which:9s} {m:40s} {v.get('median_ms', float('nan')):9.2f} ms  "
                      f"x{v.get('ratio_to_off') or float('nan'):.3f}"
                      f"  peak {v['peak_alloc_mib']:8.0f} MiB  n={v.get('n', 0)}  {v['status']}", flush=True)
        if eng is not None:
            try:
                eng.close()
            except Exception:
                pass
        del eng
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save(args.out)
    for e in RESULT["errors"]:
        print("ERROR " + e, flush=True)
    return 0 if not RESULT["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
