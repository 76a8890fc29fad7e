import json
import os
import subprocess
import sys

import numpy as np

from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream.cli import main
from ted_stream.table import EpochMask, ScoreTable

CLI = [sys.executable, "-m", "ted_stream.cli"]


def test_prepare_then_inspect(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}", "n": i}) + "\n" for i in range(50)))
    out = tmp_path / "mds"
    assert main(["prepare", str(corpus), str(out), "--shard-size", "500"]) == 0
    assert len([f for f in os.listdir(out) if f.endswith(".mds.zstd")]) > 1
    ds = TEDStreamingDataset(local=str(out), batch_size=5, ted=TEDConfig(target=0.4, warmup_epochs=1, ramp_epochs=0))
    ds.start_epoch(0)
    ids = [s["ted_id"] for s in ds]
    ds.record(ids, np.arange(len(ids), dtype=float))
    ds.start_epoch(1)
    del ds
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 50 and info["scored"] == 50 and info["fingerprint_matches"]
    digest = info["epochs"]["0"]["config"]
    assert info["epochs"]["0"] == {"kept": 50, "pruned": 0, "requested": None, "boost_weight": None, "base_weight": 1.0,
                                   "config": digest}
    assert info["epochs"]["1"]["pruned"] == 20 and info["epochs"]["1"]["config"] == digest
    assert info["configs"] == {digest: TEDConfig(target=0.4, warmup_epochs=1, ramp_epochs=0).run_identity()}
    # requested (what the schedule asked for) beside what was pruned, in both outputs
    table = ScoreTable.load(str(out / "ted" / "table.tedt"))
    m = table.masks[1]
    table.masks[1] = EpochMask(m.epoch, m.keep, m.boost, m.boost_weight, m.num_samples, requested=17)
    table.save()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"]["1"]["requested"] == 17
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"epoch 1: kept 30, pruned 20 (schedule asked for 17), config {digest}" in text
    assert f"config {digest}: " in text and '"target": 0.4' in text


def test_cli_errors_are_readable(tmp_path, capsys):
    text = tmp_path / "c.txt"
    text.write_text("one\n\ntwo\n")
    # The console entry point itself, once: exit status and output.
    r = subprocess.run(CLI + ["prepare", str(text), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0 and "wrote 2 samples" in r.stdout
    capsys.readouterr()
    assert main(["prepare", str(text), str(tmp_path / "o")]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1, 2]\n')
    assert main(["prepare", str(bad), str(tmp_path / "b")]) == 2
    assert "bad.jsonl:2: expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # no half-written dataset left behind
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    (tmp_path / "o" / "ted" / "table.tedt").write_bytes(b"garbage")
    assert main(["inspect", str(tmp_path / "o")]) == 2
    assert "not a ted_stream score table" in capsys.readouterr().err


def test_inspect_matches_a_webdataset_manifest(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i}\n" for i in range(20)))
    out = tmp_path / "wds"
    assert main(["prepare", str(corpus), str(out), "--format", "wds", "--shard-size", "4096"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "20 samples, 0 scored, fingerprint matches" in capsys.readouterr().out
    shard = sorted(out.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-512] + b"\1" * 512)  # same size, other bytes: another dataset
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint_matches"] is False
