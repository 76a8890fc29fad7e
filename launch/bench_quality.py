"""Quality benchmark: a grid of policy x saved fraction x seed, side by side in one harness.

Runs launch/train_classifier.py for each cell not yet in the results file (so a killed grid
resumes where it stopped), then writes docs/results/quality_<name>.md (mean +- std and measured saved
fraction per cell) and docs/results/quality_<name>.png (accuracy against saved fraction per policy).

    .venv/bin/python launch/bench_quality.py --task fashion --limit 20000 --epochs 8 --seeds 0 1 --levels 0.3 0.5
    .venv/bin/python launch/bench_quality.py --task rotten --epochs 6 --seeds 0 1 2 --levels 0.3 0.5
    .venv/bin/python launch/bench_quality.py --task rotten-ft --epochs 5 --levels 0.3 0.5 --ramp 1
    .venv/bin/python launch/bench_quality.py --task fashion --report-only   # rewrite the docs from the results
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from provenance import git_state

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# (name in the report, train_classifier.py arguments)
VARIANTS = {
    "full": ["--policy", "full"],
    # All data for fewer epochs at the pruned runs' sample-iterations, its schedule spanning them.
    "fewer epochs (same compute)": ["--policy", "fewer-epochs"],
    "random-dynamic": ["--policy", "random-dynamic", "--no-rescale"],
    # The same draw with every kept sample weighted n / kept: the loss scale the ted policy's
    # rescaling keeps, so a row against it says what selection adds at a fixed step size.
    "random (same loss scale)": ["--policy", "random-dynamic", "--rescale"],
    "infobatch": ["--policy", "infobatch"],
    "ted (d, reading 2)": ["--policy", "ted", "--reading", "d"],
    "ted (|s|)": ["--policy", "ted", "--reading", "abs_s"],
    "ted (s, reading 1)": ["--policy", "ted", "--reading", "s"],
    "grad-norm (control)": ["--policy", "grad-norm"],
    "loss (control)": ["--policy", "loss"],
    # Search beyond the first grid: a soft, InfoBatch-like pruning of the TED score (half of a
    # pool twice the pruned size is kept and up-weighted by 2).
    "ted (d, explore 0.3)": ["--policy", "ted", "--reading", "d", "--explore", "0.3"],
    "ted (d, explore 0.5)": ["--policy", "ted", "--reading", "d", "--explore", "0.5"],
    "grad-norm (explore 0.5)": ["--policy", "grad-norm", "--explore", "0.5"],
    "loss (explore 0.5)": ["--policy", "loss", "--explore", "0.5"],
    "ted (d, explore 0.7)": ["--policy", "ted", "--reading", "d", "--explore", "0.7"],
    # Issue 23: the alpha family, between random at the same loss scale (0) and the pool rule (1).
    "ted (d, explore 0.5, alpha 0.25)": ["--policy", "ted", "--reading", "d", "--explore", "0.5", "--alpha", "0.25"],
    "ted (d, explore 0.5, alpha 0.5)": ["--policy", "ted", "--reading", "d", "--explore", "0.5", "--alpha", "0.5"],
    "ted (d-fit, explore 0.5)": ["--policy", "ted", "--reading", "d-fit", "--explore", "0.5"],
    "ted (d-fit, explore 0.5, alpha 0.5)": ["--policy", "ted", "--reading", "d-fit", "--explore", "0.5", "--alpha", "0.5"],
    "ted (d, explore 0.5, trim-top 0.1)": ["--policy", "ted", "--reading", "d", "--explore", "0.5", "--trim-top", "0.1"],
    # Text (issue 15): prune a fifth of the pruned count from the highest scores (outliers,
    # likely label noise) as well as from the lowest.
    "ted (d, explore 0.5, trim-top 0.2)": ["--policy", "ted", "--reading", "d", "--explore", "0.5", "--trim-top", "0.2"],
    # Class-balanced selection (issue 5's search): the same fraction pruned from every class.
    "ted (d, balanced)": ["--policy", "ted", "--reading", "d", "--balance"],
    "ted (d, explore 0.5, balanced)": ["--policy", "ted", "--reading", "d", "--explore", "0.5", "--balance"],
}


def cell_key(variant: str, level: float, seed: int) -> str:
    return f"{variant}|{0.0 if variant == 'full' else level}|{seed}"


def load(path: str) -> dict[str, dict]:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[r["cell"]] = r
    return done


def run_grid(args: argparse.Namespace) -> None:
    done = load(args.results)
    for r in done.values():  # one results file is one harness: never mix run lengths or data sizes
        if (r["epochs_run"], r["limit"]) != (args.epochs, args.limit):
            raise SystemExit(f"{args.results} holds runs with epochs={r['epochs_run']} limit={r['limit']}, "
                             f"not epochs={args.epochs} limit={args.limit}; pass another --name")
    cells = []
    for seed in args.seeds:
        for level in args.levels:
            for variant in args.variants:
                key = cell_key(variant, level, seed)
                if key not in done and key not in [c[0] for c in cells]:
                    cells.append((key, variant, level, seed))
    print(f"{len(done)} cells done, {len(cells)} to run", flush=True)
    for i, (key, variant, level, seed) in enumerate(cells):
        cmd = [sys.executable, os.path.join(HERE, "train_classifier.py"), "--task", args.task, *VARIANTS[variant],
               "--target-saved", str(level), "--seed", str(seed), "--epochs", str(args.epochs),
               "--threads", str(args.threads)] + (["--limit", str(args.limit)] if args.limit else []) + args.passthrough
        t = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(f"FAILED {key}: {out.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(cell=key, variant=variant, level=level, command=" ".join(cmd[1:]),
                      date=time.strftime("%Y-%m-%d %H:%M"), **git_state())
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[{i + 1}/{len(cells)}] {key}: acc {result['test_acc']:.4f} saved {result['saved']:.3f} "
              f"({time.time() - t:.0f} s)", flush=True)


def report(args: argparse.Namespace) -> None:
    done = load(args.results)
    if not done:
        raise SystemExit(f"no results in {args.results}")
    groups = collections.defaultdict(list)
    for r in done.values():
        groups[(r["variant"], r["level"] if r["variant"] != "full" else 0.0)].append(r)
    levels = sorted({lv for (_, lv) in groups if lv > 0})
    full = [100 * r["test_acc"] for r in groups.get(("full", 0.0), [])]
    full_mean, full_std = (np.mean(full), np.std(full)) if full else (float("nan"), float("nan"))
    full_loss = [r["epochs"][-1]["test_loss"] for r in groups.get(("full", 0.0), [])]
    lines = [f"All data: **{full_mean:.2f} ± {full_std:.2f} %** accuracy, held-out loss "
             f"{np.mean(full_loss):.4f} ± {np.std(full_loss):.4f} nats ({len(full)} seeds).", "",
             *metric_table(groups, levels, "acc % (mean ± std) / Δ vs full / measured saved / n",
                           lambda r: 100 * r["test_acc"], full_mean, "{:.2f}"),
             "", "Held-out loss at the end (less noisy than accuracy on a small test set):", "",
             *metric_table(groups, levels, "loss (mean ± std) / Δ vs full / measured saved / n",
                           lambda r: r["epochs"][-1]["test_loss"], np.mean(full_loss), "{:.4f}")]
    if any(v == MATCHED for v, _ in groups):
        lines += ["", f"Against `{MATCHED}` with the same seed (what selection adds at a fixed loss scale; "
                  "held-out loss Δ < 0 and accuracy Δ > 0 favour the variant):", "",
                  *paired_table(done, levels)]
    any_r = next(iter(done.values()))
    # Early results predate the lr/batch fields; every cell of a grid runs the task's defaults.
    lr = next((r["lr"] for r in done.values() if r.get("lr")), "task default")
    batch = next((r["batch_size"] for r in done.values() if r.get("batch_size")), "task default")
    meta = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU (shared with other jobs). "
            f"Runs: {len(done)}; seeds {sorted({r['seed'] for r in done.values()})}; "
            f"{any_r['epochs_run']} epochs; training samples limited to: {any_r['limit'] or 'none'}; "
            f"lr {lr}, batch {batch}. Dates: {min(r['date'] for r in done.values())} to "
            f"{max(r['date'] for r in done.values())}. Commits: "
            + ", ".join(f"{c[:8]}{' (uncommitted changes)' if d else ''}: {k} runs"
                        for (c, d), k in collections.Counter((r.get("commit", "not recorded"), r.get("dirty", False))
                                                             for r in done.values()).items()) + ".")
    plot(groups, full_mean, full_std, args.plot, args.task)
    with open(args.table, "w") as f:
        f.write("\n".join([f"# Quality grid `{args.name or args.task}` "
                            f"(task `{args.task}`, by `launch/bench_quality.py`)", "",
                            f"Every run is one line of `{os.path.relpath(args.results, ROOT)}` with its exact "
                            "command, config, per-epoch test accuracy and date.", "", meta, "", *lines, ""]))
    print("\n".join([meta, "", *lines]))


MATCHED = "random (same loss scale)"


def paired_table(done: dict[str, dict], levels: list[float]) -> list[str]:
    """Per variant and level: mean ± std over seeds of (variant − matched random) in held-out
    loss and accuracy, and how many seeds the variant wins on held-out loss."""
    lines = ["| variant | " + " | ".join(f"saved {lv:.0%} target: Δ loss / Δ acc (points) / loss wins" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for variant in VARIANTS:
        if variant in ("full", MATCHED):
            continue
        cells = []
        for lv in levels:
            pairs = [(r, done[cell_key(MATCHED, lv, r["seed"])]) for r in done.values()
                     if r["variant"] == variant and r["level"] == lv and cell_key(MATCHED, lv, r["seed"]) in done]
            if not pairs:
                cells.append("–")
                continue
            dl = np.array([a["epochs"][-1]["test_loss"] - b["epochs"][-1]["test_loss"] for a, b in pairs])
            da = np.array([100 * (a["test_acc"] - b["test_acc"]) for a, b in pairs])
            saved = [np.mean([r["saved"] for r in side]) for side in zip(*pairs)]
            note = f" (saves {saved[0]:.0%}, random {saved[1]:.0%})" if abs(saved[0] - saved[1]) > 0.01 else ""
            cells.append(f"{dl.mean():+.4f} ± {dl.std():.4f} / {da.mean():+.2f} ± {da.std():.2f} / "
                         f"{int((dl < 0).sum())} of {len(pairs)}{note}")
        if any(c != "–" for c in cells):
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def metric_table(groups: dict, levels: list[float], header: str, value, reference: float, fmt: str) -> list[str]:
    """Markdown rows, one per variant that ran: mean ± std of ``value(run)``, Δ to ``reference``."""
    lines = ["| variant | " + " | ".join(f"saved {lv:.0%} target: {header}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for variant in VARIANTS:
        if variant == "full" or not any(v == variant for v, _ in groups):
            continue
        cells = []
        for lv in levels:
            rs = groups.get((variant, lv), [])
            if not rs:
                cells.append("–")
                continue
            x = np.array([value(r) for r in rs])
            saved = np.mean([r["saved"] for r in rs])
            cells.append(f"{fmt.format(x.mean())} ± {fmt.format(x.std())} / {'+' if x.mean() >= reference else '−'}"
                         f"{fmt.format(abs(x.mean() - reference))} / {saved:.1%} / {len(rs)}")
        name = variant.replace("|", "\\|")  # a literal pipe would split the markdown cell
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(groups, full_mean, full_std, path: str, task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhspan(full_mean - full_std, full_mean + full_std, color="grey", alpha=0.3, label="all data (±1 std)")
    for variant in VARIANTS:
        pts = sorted((np.mean([r["saved"] for r in rs]), np.mean([100 * r["test_acc"] for r in rs]),
                      np.std([100 * r["test_acc"] for r in rs])) for (v, lv), rs in groups.items()
                     if v == variant and lv > 0)
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=variant)
    ax.set_xlabel("measured saved fraction of sample-iterations")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy against data saved")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--task", choices=("fashion", "rotten", "rotten-ft", "news"), default="fashion")
    p.add_argument("--name", default=None, help="stem of the results and report files (default: the task)")
    p.add_argument("--report-only", action="store_true")
    # Other options (e.g. --ramp 1) go to every train_classifier.py run and into its recorded command.
    args, args.passthrough = p.parse_known_args()
    stem = os.path.join(ROOT, "docs", "results", f"quality_{args.name or args.task}")
    args.results, args.table, args.plot = f"{stem}_results.jsonl", f"{stem}.md", f"{stem}.png"
    if not args.report_only:
        run_grid(args)
    report(args)


if __name__ == "__main__":
    main()
