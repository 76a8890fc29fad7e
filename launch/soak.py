"""Kill-anywhere soak of launch/train_llm.py: SIGKILL one rank of a 2-rank job, resume, compare.

    .venv/bin/python launch/soak.py --trials 50 --out runs/soak          # results: runs/soak/soak.jsonl
    .venv/bin/python launch/soak.py --trials 20 --kinds shard,launcher,stuck,second --out runs/soak-faults

One uninterrupted reference run, then per trial: the same job killed at a random point, then
``--resume``d, and compared with the reference. Kill points, drawn with ``--seed``:
  - time: a random rank, SIGKILLed from outside after a random share of the reference's duration
    (start-up, training, checkpoint saves, epoch boundaries, evaluation: wherever it lands; a
    draw that falls after the run's end is retried at half the delay, at most twice);
  - step:N / save:N / epoch:E / frozen:E: a random rank SIGKILLs itself at that point
    (train_llm.py --kill-at): after step N, inside step N's checkpoint (table saved, DeepSpeed's
    files not yet), before epoch E's score merge and mask freeze, right after it.
The deepspeed launcher tears the other rank down. Faults beside the kills (docs/reliability.md says what each must do):
  - shard: the trial's own copy of the shards; one shard damaged (each of corrupt: 16 bytes
    flipped, truncate: cut to half, delete, in an order rotated per trial) fails a fresh start,
    then, after a killed run (an in-process kill point, as above) and on a fresh cache (the
    decompressed shards removed, as on another node), two resumes; each failed attempt must exit
    non-zero naming the shard, and the shard is restored before the next; the last resume must
    match the reference;
  - launcher: the `deepspeed` launcher SIGKILLed after a random step, `--resume` started at once
    (its ranks must stop and release the folder; the resume must not race them);
  - stuck: the same, with the ranks frozen (SIGSTOP) so they cannot notice: the immediate resume
    must be refused naming the old rank 0's host and pid; once they run again (SIGCONT) they stop,
    and the next resume must match the reference;
  - second: a second job started on the folder of a live one (paused meanwhile: the tiny job trains
    for seconds, a start-up takes tens) must be refused naming the holder's host and pid, and the
    live one must finish unharmed.
The corpus is written in small shards (SHARD_BYTES) so that a shard is a part of an epoch.
Compared with the reference: every rank's (epoch, sample id)
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
from typing import Any, Callable, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import llm_data  # noqa: E402
from provenance import git_state  # noqa: E402
from ted_stream.table import ScoreTable  # noqa: E402

SCRIPT = os.path.join(HERE, "train_llm.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
EPOCHS, N, SAVE_EVERY, MICRO = 3, 200, 4, 4
DOCS, SEQ, VOCAB = 20, 64, 512
SHARD_BYTES = 8 << 10  # ~30 windows a shard, 7 shards
JOB = ["--config", os.path.join(HERE, "configs", "zero2.json"), "--max-docs", str(DOCS), "--max-samples", str(N),
       "--seq-len", str(SEQ), "--epochs", str(EPOCHS), "--vocab-size", str(VOCAB), "--micro-batch", str(MICRO),
       "--threads", "1", "--hidden", "64", "--save-every", str(SAVE_EVERY), "--log-ids"]
DAMAGES = ("corrupt", "truncate", "delete")
TAG = llm_data.data_tag(None, VOCAB, SEQ, DOCS, N)  # the folder train_llm reads under --data-root


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


def _session_pids(session: int) -> list[int]:
    """The live processes of ``session`` (a launcher's, started in its own session)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(pid))
    return pids


def _steps_done(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return max([json.loads(line)["step"] for line in f if '"type": "step"' in line and line.endswith("\n")],
                       default=0)
    except FileNotFoundError:
        return 0


def wait_for_step(proc: subprocess.Popen, run_dir: str, step: int) -> bool:
    """Wait until the job has logged optimizer step ``step`` (False: it ended first)."""
    while proc.poll() is None:
        if _steps_done(run_dir) >= step:
            return True
        time.sleep(0.05)
    return False


def launch(run_dir: str, data_root: str, *extra: str, kill_after_s: Optional[float] = None,
           kill_rank: int = 0, timeout: float = 900, log_path: Optional[str] = None,
           during: Optional[Callable[[subprocess.Popen], None]] = None) -> tuple[int, str, int]:
    """Run the job with the deepspeed launcher, 2 ranks: (exit status, this run's log, port).
    ``during(proc)`` runs while the job does (a fault injected from outside)."""
    port = _free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), SCRIPT, "--out", run_dir, "--data-root", data_root, "--table-dir", os.path.join(run_dir, "ted"),
           *JOB, *extra]
    log_path = log_path or run_dir + ".log"
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=_env(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if during is not None:
                during(proc)
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
    with open(log_path, errors="replace") as f:
        f.seek(start)
        return proc.returncode, f.read(), port


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
FAULTS = ("shard", "launcher", "stuck", "second")  # --kinds may name these too


def kill_points(rng: random.Random, trials: int, ref_seconds: float,
                kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
    steps = EPOCHS * N // (2 * MICRO)  # at most: the epochs that prune have fewer
    saves = list(range(SAVE_EVERY, N // (2 * MICRO) + 1, SAVE_EVERY))  # checkpoints surely in epoch 0
    draw = {"step": lambda: rng.randrange(1, steps // 2), "save": lambda: rng.choice(saves),
            "epoch": lambda: rng.randrange(1, EPOCHS), "frozen": lambda: rng.randrange(EPOCHS)}
    points: list[dict[str, Any]] = []
    for i in range(trials):
        kind = kinds[i % len(kinds)]
        rank = rng.randrange(2)
        if kind == "time":
            points.append({"kind": kind, "rank": rank, "after_s": round(rng.uniform(0.1, 0.95) * ref_seconds, 2)})
        elif kind == "shard":
            turn = sum(p["kind"] == "shard" for p in points)  # each damage in turn at the start
            at = rng.choice(sorted(draw))
            points.append({"kind": kind, "rank": rank, "at": f"{at}:{draw[at]()}",
                           "damages": [DAMAGES[(turn + k) % len(DAMAGES)] for k in range(len(DAMAGES))],
                           "shards": [rng.randrange(1 << 16) for _ in DAMAGES]})
        elif kind in ("launcher", "stuck"):
            points.append({"kind": kind, "step": rng.randrange(1, steps // 2)})
        elif kind == "second":
            points.append({"kind": kind, "step": rng.randrange(1, 6)})  # early: the live job outlasts the refusal
        elif kind in draw:
            points.append({"kind": kind, "rank": rank, "at": f"{kind}:{draw[kind]()}"})
        else:
            raise SystemExit(f"--kinds: unknown kind {kind!r}: expected time, {', '.join(draw)} or {', '.join(FAULTS)}")
    return points


def damage(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # corrupt: 16 bytes flipped in the middle
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(16)
            f.seek(-len(chunk), os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in chunk))


def shard_faults(run_dir: str, pristine: str, point: dict[str, Any]) -> tuple[int, int, str, list[dict[str, Any]]]:
    """A damaged shard fails a fresh start, then (after a killed run) two resumes: (the kill's exit
    status, its port, the trial's data root, one row per failed attempt). The shard is restored
    after each attempt, so the caller's last resume runs on intact data."""
    root = run_dir + "-data"
    shutil.copytree(pristine, root)
    data = os.path.join(root, TAG)
    zips = sorted(n for n in os.listdir(data) if n.endswith(".mds.zstd"))
    faults = []

    def attempt(k: int, *extra: str) -> None:
        how, name = point["damages"][k], zips[point["shards"][k] % len(zips)]
        victim = os.path.join(data, name)
        # A fresh cache (a new node's copy): a local folder keeps each shard's decompressed .mds beside
        # its .mds.zstd, and reads (and checks) the .zstd only while the .mds is absent.
        for raw in os.listdir(data):
            if raw.endswith(".mds"):
                os.remove(os.path.join(data, raw))
        damage(victim, how)
        rc, log, _ = launch(run_dir, root, *extra)
        faults.append({"damage": how, "shard": name, "when": "resume" if extra else "start", "rc": rc,
                       "named": rc != 0 and f"shard {victim} could not be prepared" in log})
        if not faults[-1]["named"]:
            faults[-1]["log_tail"] = log[-1500:]
        shutil.copy2(os.path.join(pristine, TAG, name), victim)

    attempt(0)
    rc_kill, _, port = launch(run_dir, root, "--kill-at", point["at"], "--kill-rank", str(point["rank"]))
    attempt(1, "--resume")
    attempt(2, "--resume")
    return rc_kill, port, root, faults


def prepare(data_root: str, pristine: str) -> None:
    """The corpus in SHARD_BYTES shards (train_llm finds it prepared), and an untouched copy."""
    llm_data.SHARD_BYTES = SHARD_BYTES
    llm_data.prepare(os.path.join(data_root, TAG), seq_len=SEQ, vocab_size=VOCAB, max_docs=DOCS, max_samples=N,
                     max_eval=64, log=print)  # 64: train_llm's default --max-eval
    if not os.path.exists(pristine):
        shutil.copytree(data_root, pristine)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--kinds", default=",".join(KINDS), help="kill and fault kinds, cycled through in this order")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_root = os.path.join(out, "data")
    pristine = os.path.join(out, "pristine")
    ref_dir = os.path.join(out, "ref")
    prepare(data_root, pristine)
    if not os.path.exists(os.path.join(ref_dir, "ted", "table.tedt")):
        # Its duration scales the timed kills (a first run on a machine also builds DeepSpeed's ops:
        # a timed kill drawn after a trial's end is retried earlier).
        t0 = time.time()
        rc, tail, _ = launch(ref_dir, data_root)
        if rc != 0:
            print(tail[-3000:], file=sys.stderr)
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
        trial_root, row = data_root, {"trial": i, **git_state(), **point}
        if point["kind"] == "time":
            # Run times vary with the machine's load: a kill drawn after the end is retried earlier.
            for _ in range(3):
                rc_kill, _, port = launch(run_dir, data_root, kill_after_s=point["after_s"], kill_rank=point["rank"])
                if rc_kill != 0:
                    break
                shutil.rmtree(run_dir)
                point["after_s"] = round(point["after_s"] / 2, 2)
        elif point["kind"] == "shard":
            rc_kill, port, trial_root, row["faults"] = shard_faults(run_dir, pristine, point)
        elif point["kind"] == "launcher":
            def kill_launcher(proc: subprocess.Popen) -> None:
                row["reached_step"] = wait_for_step(proc, run_dir, point["step"])
                row["launcher_pid"] = proc.pid
                os.kill(proc.pid, signal.SIGKILL)  # the `deepspeed` runner only: its ranks must notice

            rc_kill, _, port = launch(run_dir, data_root, during=kill_launcher)
            row["old_processes_at_resume_start"] = len(_session_pids(row["launcher_pid"]))
        elif point["kind"] == "stuck":
            def kill_stuck(proc: subprocess.Popen) -> None:
                row["reached_step"] = wait_for_step(proc, run_dir, point["step"])
                row["launcher_pid"] = proc.pid
                os.killpg(proc.pid, signal.SIGSTOP)  # ranks that cannot notice (hung I/O, a debugger)
                row["holder"] = _rank_pid(proc.pid, 0)
                os.kill(proc.pid, signal.SIGKILL)

            rc_kill, _, port = launch(run_dir, data_root, during=kill_stuck)
            rc_early, log, _ = launch(run_dir, data_root, "--resume")
            row.update(early_resume_rc=rc_early,
                       early_resume_named_holder=f"host {socket.gethostname()}, pid {row['holder']}" in log)
            os.killpg(row["launcher_pid"], signal.SIGCONT)
            for _ in range(600):  # their watcher stops them within a second or two
                if not _session_pids(row["launcher_pid"]):
                    break
                time.sleep(0.1)
            row["old_processes_at_resume_start"] = len(_session_pids(row["launcher_pid"]))
        elif point["kind"] == "second":
            def second_job(proc: subprocess.Popen) -> None:
                if not wait_for_step(proc, run_dir, point["step"]):
                    return
                # The tiny job trains for seconds and a start-up takes tens: the live job is paused
                # (it keeps its lock, files and /dev/shm buffers) while the second one starts.
                os.killpg(proc.pid, signal.SIGSTOP)
                try:
                    holder = _rank_pid(proc.pid, 0)
                    rc2, log2, _ = launch(run_dir, data_root, log_path=run_dir + "-second.log", timeout=600)
                    row.update(second_rc=rc2, second_live=proc.poll() is None,
                               second_named_holder=f"host {socket.gethostname()}, pid {holder}" in log2)
                finally:
                    os.killpg(proc.pid, signal.SIGCONT)

            rc_kill = None
            rc, tail, port = launch(run_dir, data_root, during=second_job)
        else:
            rc_kill, _, port = launch(run_dir, data_root, "--kill-at", point["at"], "--kill-rank", str(point["rank"]))
        left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
        if point["kind"] != "second":
            rc, tail, _ = launch(run_dir, trial_root, "--resume")
        if point["kind"] in ("launcher", "stuck"):
            old = _session_pids(row["launcher_pid"])
            row["old_processes_after_resume"] = len(old)
            if old:
                os.killpg(row["launcher_pid"], signal.SIGKILL)  # our own session: the killed job's leftovers
        row.update(killed_rc=rc_kill, resume_rc=rc, shm_left_by_kill=len(left),
                   shm_left_after_resume=sum(os.path.exists(os.path.join("/dev/shm", n)) for n in left))
        if rc == 0:
            row.update(compare(ref, snapshot(run_dir)))
        else:
            row["log_tail"] = tail[-4000:]
        row["seconds"] = round(time.time() - t0, 1)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    rows = _jsonl(results_path)
    ok = [r for r in rows if r["resume_rc"] == 0]
    faults = [f for r in rows for f in r.get("faults", [])]
    seconds = [r for r in rows if r["kind"] == "second"]
    summary = {"trials": len(rows), "killed": sum(r["killed_rc"] not in (0, None) for r in rows),
               "resumed": len(ok), "lost": sum(r["lost"] for r in ok),
               "duplicated": sum(r["duplicated"] for r in ok),
               "identical": sum(r["same_order"] and r["same_losses"] and r["same_table"] for r in ok),
               "shm_left_by_kill": sum(r["shm_left_by_kill"] for r in rows),
               "shm_left_after_resume": sum(r["shm_left_after_resume"] for r in rows),
               "shard_faults": len(faults), "shard_faults_named": sum(f["named"] for f in faults),
               "launcher_kills": sum(r["kind"] in ("launcher", "stuck") for r in rows),
               "stuck_resumes_refused_naming_holder": sum(r.get("early_resume_rc", 0) != 0
                                                          and r.get("early_resume_named_holder", False) for r in rows),
               "launcher_processes_left_after_resume": sum(r.get("old_processes_after_resume", 0) for r in rows),
               "second_jobs": len(seconds),
               "second_refused_naming_holder": sum(r.get("second_rc", 0) != 0 and r.get("second_named_holder", False)
                                                   and r.get("second_live", False) for r in seconds)}
    print(json.dumps(summary))
    good = (summary["resumed"] == summary["identical"] == len(rows) and not summary["lost"]
            and summary["shard_faults_named"] == summary["shard_faults"]
            and summary["second_refused_naming_holder"] == summary["second_jobs"]
            and not summary["launcher_processes_left_after_resume"]
            and summary["stuck_resumes_refused_naming_holder"] == sum(r["kind"] == "stuck" for r in rows))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
