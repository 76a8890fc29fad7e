"""Side-by-side LLM comparison of pruning policies under launch/train_llm.py (issue 5, LLM part).

    .venv/bin/python launch/bench_llm.py                 # seed 0 for all policies, then seed 1
    .venv/bin/python launch/bench_llm.py --seeds 0       # one seed
    .venv/bin/python launch/bench_llm.py --smollm2       # also the short SmolLM2-135M fine-tune
    .venv/bin/python launch/bench_llm.py --report-only   # rewrite docs/quality_llm.md from finished runs

One `deepspeed --num_gpus 2 launch/train_llm.py ...` command per run, the same harness for every
policy (default scratch model, news corpus, ZeRO-2, 4 epochs; checkpoints off). Resumable: a run
whose folder already holds a metrics.jsonl with a `summary` row is skipped. After every run its
metrics.jsonl is copied to docs/runs/llm_bench/<run>.jsonl and docs/quality_llm.md is rewritten.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join("runs", "llm_bench")
DOC_RUNS = os.path.join("docs", "runs", "llm_bench")
DOC = os.path.join("docs", "quality_llm.md")
INFOBATCH_R = 0.8  # InfoBatch's r (drop probability of a below-mean-loss sample); tuned to TED's saved fraction

# name -> --ted overrides
POLICIES = [
    ("all", ["target=0"]),
    ("random", ["policy=random-dynamic"]),
    ("infobatch", ["policy=infobatch", f"target={INFOBATCH_R}", "scorer.reading=loss"]),
    ("ted", []),
]
BASE_PORT = 29710


def deepspeed_bin() -> str:
    return os.path.join(ROOT, ".venv", "bin", "deepspeed")


def run_command(name: str, ted: list[str], seed: int, port: int, extra: list[str] = ()) -> list[str]:
    cmd = [".venv/bin/deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train_llm.py"]
    for t in ted + [f"seed={seed}"]:
        cmd += ["--ted", t]
    cmd += ["--seed", str(seed), "--save-every", "0", "--data-root", f"{RUNS}/data",
            "--table-dir", f"{RUNS}/{name}_s{seed}/ted", "--out", f"{RUNS}/{name}_s{seed}"]
    return cmd + list(extra)


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


def execute(name: str, cmd: list[str], port: int) -> None:
    folder = cmd[cmd.index("--out") + 1]
    if finished(folder):
        print(f"[bench_llm] skip {name}: {folder} is finished", flush=True)
    else:
        print(f"[bench_llm] run {name}: {shlex.join(cmd)}", flush=True)
        os.makedirs(folder, exist_ok=True)
        t = time.time()
        with open(os.path.join(folder, "stdout.log"), "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        clean_shm(port)
        print(f"[bench_llm] {name}: rc {rc} in {time.time() - t:.0f} s", flush=True)
        if rc != 0 or not finished(folder):
            print(f"[bench_llm] {name} FAILED; see {folder}/stdout.log", flush=True)
            return
        with open(os.path.join(folder, "command.txt"), "w") as f:
            f.write(shlex.join(cmd) + "\n")
    os.makedirs(DOC_RUNS, exist_ok=True)
    src = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(src):
        # step rows make the files large; keep run/epoch/summary rows (the step losses are in runs/)
        rows = [r for r in read_rows(src) if r["type"] != "step"]
        with open(os.path.join(DOC_RUNS, f"{os.path.basename(folder)}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def summarize(path: str) -> dict:
    rows = read_rows(path)
    run = next(r for r in rows if r["type"] == "run")
    epochs = [r for r in rows if r["type"] == "epoch"]
    summ = next((r for r in rows if r["type"] == "summary"), None)
    argv = run["argv"]
    return {"argv": argv, "epochs": epochs, "summary": summ, "started": run["started"],
            "saved": summ["saved"] if summ else None, "loss": epochs[-1]["eval_loss"] if epochs else None,
            "ppl": epochs[-1]["eval_ppl"] if epochs else None, "seconds": summ["seconds"] if summ else None,
            "policy": run["ted"]["policy"], "target": run["ted"]["target"], "reading": run["scorer"]["reading"]}


def write_doc(seeds: list[int], smollm2_cmd: list[str] | None, notes: str = "") -> None:
    import statistics as st

    res: dict[str, dict[int, dict]] = {}
    cmds: list[str] = []
    for name, ted in POLICIES:
        for seed in seeds:
            p = os.path.join(DOC_RUNS, f"{name}_s{seed}.jsonl")
            cmds.append(shlex.join(run_command(name, ted, seed, BASE_PORT + 10 * seed + POLICIES.index((name, ted)))))
            if os.path.exists(p):
                res.setdefault(name, {})[seed] = summarize(p)
    full = res.get("all", {})
    lines = ["# LLM pruning: all data vs random vs InfoBatch vs TED (issue 5, LLM part)", ""]
    lines += [f"Generated by `launch/bench_llm.py` on {_dt.date.today().isoformat()}. Machine: 2 CPU cores, no GPU, "
              "24 GiB, shared with another benchmark (a single-threaded Fashion-MNIST grid) running the whole "
              "time, so wall times are noisy. Same harness for every run: `launch/train_llm.py` defaults (scratch "
              "Llama, 0.92M parameters, BPE 2048, 400 news documents -> 3,520 windows of 128 tokens, 64 held-out "
              "windows, ZeRO-2 on 2 CPU ranks x 8, AdamW lr 2e-3 with 30-step warm-up, 4 epochs, schedule "
              "1 warm-up epoch + 2-epoch cubic ramp), checkpoints off (`--save-every 0`). The seed sets model "
              "init, shuffle and the policy's draws (`--seed S --ted seed=S`).", ""]
    lines += ["Policies: **all** = `--ted target=0`; **random** = `policy=random-dynamic` (new draw each epoch, "
              "same schedule and target 0.4 as TED); **InfoBatch** = `policy=infobatch`, score = the per-sample "
              f"loss (`scorer.reading=loss`), r = {INFOBATCH_R} ramped by the same schedule, kept below-mean "
              "samples up-weighted by 1/(1-r) (the policy always rescales); r chosen so its *measured* saved fraction lands "
              "near TED's; **TED** = the defaults (reading `d`, target 0.4).", ""]
    lines += ["| policy | seed(s) | measured saved | final held-out loss (nats/token) | final ppl | "
              "Δ ppl vs all data | training s |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, _ in POLICIES:
        runs = res.get(name, {})
        for seed, r in sorted(runs.items()):
            ref = full.get(seed)
            d = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%" if ref else "n/a"
            lines.append(f"| {name} | {seed} | {100 * r['saved']:.1f}% | {r['loss']:.4f} | {r['ppl']:.2f} | {d} | "
                         f"{r['seconds']:.0f} |")
        common = [s for s in runs if s in full]
        if len(runs) > 1 and common:
            mppl = st.mean(runs[s]["ppl"] for s in common)
            fppl = st.mean(full[s]["ppl"] for s in common)
            msaved = st.mean(runs[s]["saved"] for s in common)
            lines.append(f"| **{name} (mean)** | {','.join(map(str, sorted(common)))} | {100 * msaved:.1f}% | "
                         f"{st.mean(runs[s]['loss'] for s in common):.4f} | {mppl:.2f} | "
                         f"{100 * (mppl / fppl - 1):+.2f}% | |")
        if name != "all" and common:
            dd = [100 * (runs[s]["ppl"] / full[s]["ppl"] - 1) for s in common]
            sv = [runs[s]["saved"] for s in common]
            verdicts.append((name, dd, sv))
    lines.append("")
    lines.append("Per-epoch held-out loss (nats/token):")
    lines.append("")
    for name, _ in POLICIES:
        for seed, r in sorted(res.get(name, {}).items()):
            ep = ", ".join(f"{e['eval_loss']:.3f}" for e in r["epochs"])
            kept = ", ".join(str(e["kept"]) for e in r["epochs"])
            lines.append(f"- {name} seed {seed}: {ep} (kept per epoch {kept})")
    lines.append("")
    lines.append("## Target: held-out perplexity within 1% of all data at >= 30% saved")
    lines.append("")
    for name, dd, sv in verdicts:
        met = all(abs(x) <= 1.0 or x < 0 for x in dd) and all(s >= 0.30 for s in sv)
        lines.append(f"- **{name}**: saved {', '.join(f'{100 * s:.1f}%' for s in sv)}, Δ ppl "
                     f"{', '.join(f'{x:+.1f}%' for x in dd)} -> target **{'met' if met else 'NOT met'}**.")
    lines.append("")
    if notes:
        lines += [notes, ""]
    lines += ["## Commands (one per run, from the repository root)", "", "```bash"] + cmds + ["```", ""]
    lines += ["Per-run files (run/epoch/summary rows of each metrics.jsonl; the step rows stay in runs/): "
              "`docs/runs/llm_bench/<policy>_s<seed>.jsonl`.", ""]
    sm = os.path.join(DOC_RUNS, "smollm2_s0.jsonl")
    lines += ["## Fine-tuning the pretrained SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", ""]
    if smollm2_cmd:
        lines += ["```bash", shlex.join(smollm2_cmd), "```", ""]
    if os.path.exists(sm):
        r = summarize(sm)
        lines += ["| epoch | kept | held-out loss | ppl | s |", "|---|---|---|---|---|"]
        for e in r["epochs"]:
            lines.append(f"| {e['epoch']} | {e['kept']}/{e['num_samples']} | {e['eval_loss']:.4f} | "
                         f"{e['eval_ppl']:.2f} | {e['seconds']:.0f} |")
        lines += ["", f"Measured saved fraction {100 * (r['saved'] or 0):.1f}%, training {r['seconds']:.0f} s.", ""]
    else:
        lines += ["Not run (see the notes above or the final report).", ""]
    with open(DOC, "w") as f:
        f.write("\n".join(lines))


SMOLLM2_CONFIG = os.path.join(RUNS, "smollm2_zero2.json")


def smollm2_command(port: int) -> list[str]:
    return [".venv/bin/deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train_llm.py",
            "--model", "smollm2", "--config", SMOLLM2_CONFIG, "--max-docs", "20", "--seq-len", "128",
            "--max-eval", "32", "--epochs", "3", "--lr", "1e-4", "--save-every", "0",
            "--ted", "warmup_epochs=1", "--ted", "ramp_epochs=1",
            "--data-root", f"{RUNS}/data", "--table-dir", f"{RUNS}/smollm2_s0/ted", "--out", f"{RUNS}/smollm2_s0"]


def make_smollm2_config() -> None:
    """zero2.json with a 3-step warm-up (a ~20-step fine-tune never reaches the peak of a 30-step one)."""
    with open(os.path.join(ROOT, "launch", "configs", "zero2.json")) as f:
        cfg = json.load(f)
    cfg["scheduler"]["params"]["warmup_num_steps"] = 3
    os.makedirs(os.path.join(ROOT, RUNS), exist_ok=True)
    with open(os.path.join(ROOT, SMOLLM2_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="+", default=None, help="policy names to run (default all)")
    ap.add_argument("--smollm2", action="store_true", help="run the SmolLM2-135M fine-tune after the grid")
    ap.add_argument("--smollm2-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--notes", default="", help="free text added to the report")
    args = ap.parse_args()
    os.chdir(ROOT)
    sm_cmd = smollm2_command(BASE_PORT + 99)
    if not args.report_only and not args.smollm2_only:
        for seed in args.seeds:  # seed 0 for every policy first, then seed 1
            for i, (name, ted) in enumerate(POLICIES):
                if args.only and name not in args.only:
                    continue
                port = BASE_PORT + 10 * seed + i
                execute(f"{name}_s{seed}", run_command(name, ted, seed, port), port)
                write_doc(args.seeds, sm_cmd, args.notes)
    if (args.smollm2 or args.smollm2_only) and not args.report_only:
        make_smollm2_config()
        execute("smollm2_s0", sm_cmd, BASE_PORT + 99)
    write_doc(args.seeds, sm_cmd, args.notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
