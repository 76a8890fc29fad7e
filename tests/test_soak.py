"""The short variant of launch/soak.py: two kills of one rank of a 2-rank DeepSpeed job (inside a
checkpoint save, and at a random moment), each resumed and compared with an uninterrupted run; and
one trial of each fault of issue 24 item 8 (bad shards, a killed launcher with running or frozen
ranks, a second job on a live folder). Slow (the kills 2-4 minutes on 2 CPU cores, the faults
4-8: 12 start-ups of tens of seconds each), so marked `slow`: `.ci/run` runs it after the
default suite."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_kills_anywhere_lose_and_duplicate_nothing(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "launch" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = soak.main(["--trials", "2", "--kinds", "save,time", "--seed", "1", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "soak.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["save", "time"]
    assert rows[0]["killed_rc"] != 0  # the in-process kill always fires
    for r in rows:
        assert r["resume_rc"] == 0, r.get("log_tail")
        assert (r["lost"], r["duplicated"]) == (0, 0)
        assert r["same_order"] and r["same_losses"] and r["same_table"], r
        assert r["shm_left_after_resume"] == 0
    assert rc == 0


def test_shard_launcher_and_second_job_faults_end_loud_and_resume_identical(tmp_path, monkeypatch):
    """Issue 24 item 8: a corrupted, a truncated and a deleted shard each fail a start or a resume
    naming the shard, and after restoring it the resume is the uninterrupted run; the launcher
    killed then an immediate --resume (its ranks running: they stop; frozen: the resume is refused
    naming the holder); a second job on a live folder refused naming the holder."""
    spec = importlib.util.spec_from_file_location("soak", ROOT / "launch" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = soak.main(["--trials", "4", "--kinds", "shard,launcher,stuck,second", "--seed", "1", "--out", str(tmp_path)])
    rows = {r["kind"]: r for r in map(json.loads, (tmp_path / "soak.jsonl").read_text().splitlines())}
    for r in rows.values():
        assert r["resume_rc"] == 0, r.get("log_tail")
        assert (r["lost"], r["duplicated"]) == (0, 0)
        assert r["same_order"] and r["same_losses"] and r["same_table"], r
    faults = rows["shard"]["faults"]
    assert [(f["damage"], f["when"]) for f in faults] == [
        ("corrupt", "start"), ("truncate", "resume"), ("delete", "resume")]
    assert all(f["named"] for f in faults), faults
    assert rows["shard"]["killed_rc"] != 0
    for kind in ("launcher", "stuck"):
        assert rows[kind]["reached_step"] and rows[kind]["old_processes_after_resume"] == 0, rows[kind]
    assert rows["stuck"]["early_resume_rc"] != 0 and rows["stuck"]["early_resume_named_holder"], rows["stuck"]
    assert rows["second"]["second_rc"] != 0 and rows["second"]["second_named_holder"], rows["second"]
    assert rows["second"]["second_live"]  # refused while the first job ran, which then finished identical
    assert rc == 0
