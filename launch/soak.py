"""Kill-anywhere soak of launch/train_llm.py: SIGKILL one rank of a 2-rank job, resume, compare.

    .venv/bin/python launch/soak.py --trials 50 --out runs/soak          # results: runs/soak/soak.jsonl

One uninterrupted reference run, then per trial: the same job killed at a random point, then
``--resume``d, and compared with the reference. Kill points, drawn with ``--seed``:
  - time: a random rank, SIGKILLed from outside after a random share of the reference's duration
    (start-up, training, checkpoint saves, epoch boundaries, evaluation: wherever it lands; a
    draw that falls after the run's end is retried at half the delay, at most twice);
  - step:N / save:N / epoch:E / frozen:E: a random rank SIGKILLs itself at that point
    (train_llm.py --kill-at): after step N, inside step N's checkpoint (table saved, DeepSpeed's
    files not yet), before epoch E's score merge and mask freeze, right after it.
The deepspeed launcher tears the other rank down. Compared with the reference: every rank's (epoch, sample id)
stream (lost and duplicated samples counted per epoch and rank), the step losses, the final
table's masks and scores; and whether the killed run's DeepSpeed /dev/shm buffers were gone after
the resume (train_llm removes stale ones at start, whatever their port). Tiny job: 200 windows of
64 tokens, 3 epochs, ZeRO-2, a checkpoint every 4 steps. See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from provenance import git_state  # noqa: E402
from ted_stream.table import ScoreTable  # noqa: E402

SCRIPT = os.path.join(HERE, "train_llm.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
EPOCHS, N, SAVE_EVERY, MICRO = 3, 200, 4, 4
JOB = ["--config", os.path.join(HERE, "configs", "zero2.json"), "--max-docs", "20", "--max-samples", str(N),
       "--seq-len", "64", "--epochs", str(EPOCHS), "--vocab-size", "512", "--micro-batch", str(MICRO),
       "--threads", "1", "--hidden", "64", "--save-every", str(SAVE_EVERY), "--log-ids"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(run_dir: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in
         ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    tmp = os.path.join(run_dir, "tmp")  # streaming's file locks, per run
    os.makedirs(tmp, exist_ok=True)
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=tmp, OMP_NUM_THREADS="1")
    return e


def _rank_pid(session: int, rank: int) -> Optional[int]:
    """The pid of the training process of ``rank`` in the launcher's ``session``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/stat") as f:
                sid = int(f.read().rsplit(")", 1)[1].split()[3])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                is_rank = SCRIPT.encode() in f.read()
        except (OSError, ValueError, IndexError):
            continue
        if sid == session and is_rank and env.get(b"RANK") == str(rank).encode():
            return int(pid)
    return None


def launch(run_dir: str, data_root: str, *extra: str, kill_after_s: Optional[float] = None,
           kill_rank: int = 0, timeout: float = 900) -> tuple[int, str, int]:
    """Run the job with the deepspeed launcher, 2 ranks: (exit status, log tail, port)."""
    port = _free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), SCRIPT, "--out", run_dir, "--data-root", data_root, "--table-dir", os.path.join(run_dir, "ted"),
           *JOB, *extra]
    log_path = os.path.join(run_dir + ".log")
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=_env(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if kill_after_s is not None:
                deadline = time.time() + kill_after_s
                while time.time() < deadline and proc.poll() is None:
                    time.sleep(0.05)
                pid = _rank_pid(proc.pid, kill_rank) if proc.poll() is None else None
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the launcher and its ranks only
            proc.wait()
    with open(log_path) as f:
        return proc.returncode, f.read()[-3000:], port


def _jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def snapshot(run_dir: str) -> dict[str, Any]:
    ids = {r: _jsonl(os.path.join(run_dir, "ids", f"rank{r}.jsonl")) for r in range(2)}
    steps = {row["step"]: row["loss"] for row in _jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if row["type"] == "step"}
    table = ScoreTable.load(os.path.join(run_dir, "ted", "table.tedt"))
    return {"ids": ids, "steps": steps, "table": table}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    lost = duplicated = 0
    for rank in range(2):
        for epoch in range(EPOCHS):
            a = Counter(i for row in ref["ids"][rank] if row["epoch"] == epoch for i in row["ids"])
            b = Counter(i for row in got["ids"][rank] if row["epoch"] == epoch for i in row["ids"])
            lost += sum((a - b).values())
            duplicated += sum((b - a).values())
    same_order = all([(r["epoch"], r["step"], r["ids"]) for r in ref["ids"][k]] ==
                     [(r["epoch"], r["step"], r["ids"]) for r in got["ids"][k]] for k in range(2))
    losses = sorted(ref["steps"]) == sorted(got["steps"]) and all(
        abs(ref["steps"][s] - got["steps"][s]) <= 1e-6 * abs(ref["steps"][s]) for s in ref["steps"])
    t, u = ref["table"], got["table"]
    table = (sorted(t.masks) == sorted(u.masks) and np.array_equal(t.scores, u.scores)
             and all(np.array_equal(t.masks[e].keep, u.masks[e].keep) for e in t.masks))
    return {"lost": lost, "duplicated": duplicated, "same_order": same_order, "same_losses": losses,
            "same_table": table}


KINDS = ("time", "time", "step", "save", "epoch", "frozen")  # a third of the kills are timed


def kill_points(rng: random.Random, trials: int, ref_seconds: float,
                kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
    steps = EPOCHS * N // (2 * MICRO)  # at most: the epochs that prune have fewer
    saves = list(range(SAVE_EVERY, N // (2 * MICRO) + 1, SAVE_EVERY))  # checkpoints surely in epoch 0
    points = []
    for i in range(trials):
        kind = kinds[i % len(kinds)]
        rank = rng.randrange(2)
        if kind == "time":
            points.append({"kind": kind, "rank": rank, "after_s": round(rng.uniform(0.1, 0.95) * ref_seconds, 2)})
        else:
            n = {"step": lambda: rng.randrange(1, steps // 2), "save": lambda: rng.choice(saves),
                 "epoch": lambda: rng.randrange(1, EPOCHS), "frozen": lambda: rng.randrange(EPOCHS)}[kind]()
            points.append({"kind": kind, "rank": rank, "at": f"{kind}:{n}"})
    return points


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--kinds", default=",".join(KINDS), help="kill kinds, cycled through in this order")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_root = os.path.join(out, "data")
    ref_dir = os.path.join(out, "ref")
    if not os.path.exists(os.path.join(ref_dir, "ted", "table.tedt")):
        # A first run prepares the data (and builds DeepSpeed's ops): the reference's duration,
        # which scales the timed kills, is then that of a trial.
        for run_dir in (os.path.join(out, "warm"), ref_dir):
            t0 = time.time()
            rc, tail, _ = launch(run_dir, data_root)
            if rc != 0:
                print(tail, file=sys.stderr)
                return 1
        with open(os.path.join(out, "ref_seconds"), "w") as f:
            f.write(f"{time.time() - t0:.1f}")
    with open(os.path.join(out, "ref_seconds")) as f:
        ref_seconds = float(f.read())
    ref = snapshot(ref_dir)
    results_path = os.path.join(out, "soak.jsonl")
    done = len(_jsonl(results_path)) if os.path.exists(results_path) else 0
    points = kill_points(random.Random(args.seed), args.trials, ref_seconds, tuple(args.kinds.split(",")))
    for i, point in enumerate(points[done:], start=done):
        run_dir = os.path.join(out, f"trial{i}")
        t0 = time.time()
        if point["kind"] == "time":
            # Run times vary with the machine's load: a kill drawn after the end is retried earlier.
            for _ in range(3):
                rc_kill, _, port = launch(run_dir, data_root, kill_after_s=point["after_s"], kill_rank=point["rank"])
                if rc_kill != 0:
                    break
                shutil.rmtree(run_dir)
                point["after_s"] = round(point["after_s"] / 2, 2)
        else:
            rc_kill, _, port = launch(run_dir, data_root, "--kill-at", point["at"], "--kill-rank", str(point["rank"]))
        left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
        rc, tail, _ = launch(run_dir, data_root, "--resume")
        row = {"trial": i, **git_state(), **point, "killed_rc": rc_kill, "resume_rc": rc,
               "shm_left_by_kill": len(left),
               "shm_left_after_resume": sum(os.path.exists(os.path.join("/dev/shm", n)) for n in left)}
        if rc == 0:
            row.update(compare(ref, snapshot(run_dir)))
        else:
            row["log_tail"] = tail[-1500:]
        row["seconds"] = round(time.time() - t0, 1)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    rows = _jsonl(results_path)
    ok = [r for r in rows if r["resume_rc"] == 0]
    summary = {"trials": len(rows), "killed": sum(r["killed_rc"] != 0 for r in rows),
               "resumed": len(ok), "lost": sum(r["lost"] for r in ok),
               "duplicated": sum(r["duplicated"] for r in ok),
               "identical": sum(r["same_order"] and r["same_losses"] and r["same_table"] for r in ok),
               "shm_left_by_kill": sum(r["shm_left_by_kill"] for r in rows),
               "shm_left_after_resume": sum(r["shm_left_after_resume"] for r in rows)}
    print(json.dumps(summary))
    return 0 if summary["resumed"] == summary["identical"] == len(rows) and not summary["lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
