"""launch/train_llm.py end to end: real launchers (deepspeed, torchrun, python), 2 CPU ranks,
ZeRO 1-3, pruning that really skips samples, exact kill-and-resume, a simulated second node, and
config validation, and the same windows as WebDataset tar shards (--data-format wds: pruning and
exact kill-and-resume on TEDWebDataset's exact path). Tiny model and data (200 windows of 64
tokens, 3 epochs) to stay fast. The ZeRO-3 kill-and-resume, the pretrained-folder fine-tune and the
WebDataset run take a minute or more each on 2 cores: marked `slow` (`.ci/run` runs them)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ted_stream.table import ScoreTable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "train_llm.py"
BIN = Path(sys.executable).parent
SHM = Path("/dev/shm")
EPOCHS = 3
N = 200  # training windows
TINY = ["--max-docs", "20", "--max-samples", str(N), "--seq-len", "64", "--epochs", str(EPOCHS),
        "--vocab-size", "512", "--micro-batch", "4", "--threads", "1", "--hidden", "64"]
TIMEOUT = 1800  # a hang guard sized for a busy 2-core machine, not a speed check


def _load_module():
    spec = importlib.util.spec_from_file_location("train_llm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp_path: Path, **extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                      "MASTER_ADDR", "MASTER_PORT")}
    tmp = tmp_path / "tmp"  # streaming's file locks land here, not in the shared /tmp
    tmp.mkdir(exist_ok=True)
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    e.update(extra)
    return e


def ds_buffers(port: int) -> list[Path]:
    return [p for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")]


def run(cmd: list, tmp_path: Path, port: int | None = None, check: bool = True, timeout: int = TIMEOUT,
        **extra) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(tmp_path, **extra), capture_output=True,
                              text=True, timeout=timeout)
    finally:  # a killed run cannot remove DeepSpeed's ~66 MB /dev/shm buffers itself
        if port is not None:
            for p in ds_buffers(port):
                p.unlink(missing_ok=True)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd[0]} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(port: int, *args) -> list:
    return [BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port,
            SCRIPT, *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def seen_ids(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / "ids" / f"rank{rank}.jsonl").read_text().splitlines()]


def by_epoch(rows: list[dict]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in rows:
        out.setdefault(r["epoch"], []).extend(r["ids"])
    return out


def assert_pruned_as_masked(out: Path, table_path: Path, world: int = 2) -> ScoreTable:
    """Kept counts from metrics.jsonl match the table's masks; no pruned id reached any rank."""
    table = ScoreTable.load(str(table_path))
    epochs = [r for r in metrics(out) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert epochs[0]["kept"] == N  # warm-up on all data
    assert all(r["kept"] < N for r in epochs[1:]), [r["kept"] for r in epochs]  # it really prunes
    assert epochs[-1]["saved_so_far"] > 0.15
    per_rank = [by_epoch(seen_ids(out, r)) for r in range(world)]
    for row in epochs:
        e = row["epoch"]
        keep = np.unpackbits(table.masks[e].keep, bitorder="little", count=N).astype(bool)
        assert row["kept"] == keep.sum() == table.masks[e].kept
        counts = {len(ids[e]) for ids in per_rank}
        assert len(counts) == 1, f"epoch {e}: ranks saw different numbers of samples {counts}"
        seen = np.concatenate([ids[e] for ids in per_rank])
        assert keep[seen].all(), f"epoch {e}: a pruned sample reached a rank"
        assert sorted(seen.tolist()) == np.flatnonzero(keep).tolist()  # every kept sample, once
        assert row["trained"] == len(seen)
    return table


def prepare_tiny(root: Path, fmt: str) -> Path:
    """The TINY corpus prepared in-process as train_llm.py would under ``root``; returns its folder."""
    sys.path.insert(0, str(ROOT / "launch"))
    import llm_data

    folder = root / llm_data.data_tag(None, 512, 64, 20, N, fmt)
    llm_data.prepare(str(folder), seq_len=64, vocab_size=512, max_docs=20, max_samples=N, fmt=fmt,
                     log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """The tiny dataset prepared once (in-process), shared read-only by the runs that pass
    --data-root and keep their table in their own run folder."""
    root = tmp_path_factory.mktemp("data")
    prepare_tiny(root, "mds")
    return root


# ---- configuration ---------------------------------------------------------------------------
def test_config_blocks_parse_and_ted_is_stripped():
    mod = _load_module()
    for path in sorted((ROOT / "launch" / "configs").glob("*.json")):
        raw = json.loads(path.read_text())
        ds, ted, scorer = mod.split_config(raw, epochs=4)
        assert "ted" not in ds and "ted" in raw
        assert ted.epochs == 4 and scorer.reading in mod.READINGS
    with pytest.raises(mod.ConfigError, match="targte"):
        mod.split_config({"ted": {"targte": 0.3}}, 3)
    with pytest.raises(mod.ConfigError, match="layer"):
        mod.split_config({"ted": {"scorer": {"layer": ["lm_head"]}}}, 3)
    with pytest.raises(mod.ConfigError, match="reading"):
        mod.split_config({"ted": {"scorer": {"reading": "igd"}}}, 3)
    with pytest.raises(mod.ConfigError, match="target"):
        mod.split_config({"ted": {"target": 1.5}}, 3)
    with pytest.raises(mod.ConfigError, match="epochs"):
        mod.split_config({"ted": {"epochs": 5}}, 3)
    _, ted, scorer = mod.load_config(mod.parse_args(["--ted", "target=0", "--ted", "policy=random",
                                                     "--ted", "scorer.reading=sqnorm"]))
    assert (ted.target, ted.policy, scorer.reading) == (0.0, "random", "sqnorm")
    with pytest.raises(mod.ConfigError, match="targte"):
        mod.load_config(mod.parse_args(["--ted", "targte=0.3"]))


def test_bad_ted_key_fails_before_training(tmp_path):
    cfg = json.loads((ROOT / "launch" / "configs" / "zero2.json").read_text())
    cfg["ted"]["warmup_epoch"] = 1  # typo of warmup_epochs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    proc = run([sys.executable, SCRIPT, "--config", bad, "--out", out, *TINY], tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert "warmup_epoch" in proc.stderr and "unknown TED config key" in proc.stderr
    assert not out.exists()  # nothing prepared, nothing trained


# ---- distributed runs ------------------------------------------------------------------------
def test_zero2_through_the_deepspeed_launcher_prunes(tmp_path):
    """The real launcher on a fresh run folder: rank 0 prepares the corpus, both ranks prune."""
    port, out = free_port(), tmp_path / "run"
    before = set(os.listdir(SHM))
    run([BIN / "deepspeed", "--num_gpus", "2", "--master_port", port, SCRIPT,
         "--config", ROOT / "launch" / "configs" / "zero2.json", "--out", out, "--save-every", "20",
         "--log-ids", *TINY], tmp_path)
    left = [n for n in set(os.listdir(SHM)) - before if n.startswith("deepspeed") and f"_{port}_" in n]
    assert not left, f"the run left {left} in /dev/shm"
    data = next((out / "data").iterdir())
    assert_pruned_as_masked(out, data / "ted" / "table.tedt")  # the table sits beside the shards
    rows = metrics(out)
    assert rows[0]["type"] == "run" and rows[0]["world"] == 2 and rows[0]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert "ted" not in rows[0]["deepspeed"]
    steps = [r for r in rows if r["type"] == "step"]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"] + 0.5 and epochs[1]["predicted_igd"] is not None
    assert epochs[0]["eval_loss"] < rows[0]["initial_eval_loss"]  # measured before the first step
    assert (out / "curves.png").stat().st_size > 0 and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == ["step20", "step40"]


@pytest.mark.slow  # a minute or more on 2 cores: .ci/run runs it with -m slow
def test_kill_and_resume_at_zero3_repeats_the_uninterrupted_run(tmp_path, shared_data):
    """SIGKILL right after step 10 (last checkpoint: step 8), then --resume: the same samples in
    the same order on each rank, the same masks and bit-identical scores."""
    common = ["--config", ROOT / "launch" / "configs" / "zero3.json", "--data-root", shared_data,
              "--save-every", "4", "--log-ids", *TINY]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(torchrun(free_port(), "--out", ref, "--table-dir", ref / "ted", *common), tmp_path)
    table = assert_pruned_as_masked(ref, ref / "ted" / "table.tedt")

    killed = run(torchrun(free_port(), "--out", cut, "--table-dir", cut / "ted", "--kill-after-step", "10",
                          *common), tmp_path, check=False)
    assert killed.returncode != 0
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step8"
    assert max(r["step"] for r in seen_ids(cut, 0)) == 10  # steps 9 and 10 ran, and will be redone
    proc = run(torchrun(free_port(), "--out", cut, "--table-dir", cut / "ted", "--resume", *common), tmp_path)
    assert "resumed from step8" in proc.stdout + proc.stderr

    for rank in range(2):
        assert seen_ids(cut, rank) == seen_ids(ref, rank)
    resumed = ScoreTable.load(str(cut / "ted" / "table.tedt"))
    assert sorted(resumed.masks) == sorted(table.masks) == list(range(EPOCHS))
    for e in table.masks:
        np.testing.assert_array_equal(resumed.masks[e].keep, table.masks[e].keep)
    np.testing.assert_array_equal(resumed.scores, table.scores)
    a = [r for r in metrics(ref) if r["type"] in ("step", "epoch")]
    b = [r for r in metrics(cut) if r["type"] in ("step", "epoch")]
    key = lambda r: (r["type"], r["step"], r.get("epoch"))
    assert [key(r) for r in a] == [key(r) for r in b]
    for ra, rb in zip(a, b):
        for field in ("loss", "kept", "trained", "eval_loss", "saved_so_far"):
            if field in ra:
                assert ra[field] == pytest.approx(rb[field], rel=1e-6), (field, ra, rb)


def _private_shm_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_shm_works(), reason="needs `unshare -m` (root) to give each node its own /dev/shm")
def test_two_simulated_nodes_share_one_mask(tmp_path):
    """Two torchrun 'nodes' of one rank each (LOCAL_WORLD_SIZE=1), each with its own /dev/shm, its
    own TMPDIR and its own local copy of the shards and table: both tables end identical."""
    port, out = free_port(), tmp_path / "run"
    args = ["--config", ROOT / "launch" / "configs" / "zero1.json", "--out", out,
            "--data-root", str(tmp_path / "node{node}"), "--save-every", "0", "--log-ids", *TINY]
    procs = []
    for node in range(2):
        tmp = tmp_path / f"tmp{node}"
        tmp.mkdir()
        inner = " ".join(f"'{a}'" for a in [BIN / "torchrun", "--nnodes", "2", "--node_rank", node,
                                            "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                                            "--master_port", port, SCRIPT, *args])
        procs.append(subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs /dev/shm && exec {inner}"], cwd=ROOT,
            env=env(tmp_path, TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-4000:] for log in logs)
    assert metrics(out)[0]["nodes"] == 2
    tables = [next((tmp_path / f"node{n}").iterdir()) / "ted" / "table.tedt" for n in range(2)]
    t0 = assert_pruned_as_masked(out, tables[0])
    t1 = ScoreTable.load(str(tables[1]))  # node 1's local leader persisted its own copy
    assert sorted(t0.masks) == sorted(t1.masks) == list(range(EPOCHS))
    for e in t0.masks:
        np.testing.assert_array_equal(t0.masks[e].keep, t1.masks[e].keep)
    np.testing.assert_array_equal(t0.scores, t1.scores)


@pytest.mark.slow  # a minute or more on 2 cores: .ci/run runs it with -m slow
def test_single_process_fine_tunes_a_hugging_face_folder(tmp_path, shared_data):
    """`python launch/train_llm.py --model FOLDER`: a world of one, a pretrained model and its own
    tokenizer (here a tiny Llama saved with save_pretrained, standing in for a real checkpoint)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok_json = next(Path(shared_data).iterdir()) / "tokenizer.json"
    folder = tmp_path / "tiny-llama"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_json), eos_token="<|endoftext|>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "2"]  # the last --epochs wins
    run([sys.executable, SCRIPT, "--model", folder, "--out", out, "--save-every", "0",
         "--config", ROOT / "launch" / "configs" / "zero1.json", *args], tmp_path)
    rows = metrics(out)
    assert rows[0]["world"] == 1 and rows[0]["data"]["model"] == str(folder)
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["kept"] for r in epochs][0] == N and epochs[1]["kept"] < N
    assert epochs[1]["trained"] == epochs[1]["kept"]


# ---- a WebDataset corpus: --data-format wds -----------------------------------------------------
def test_wds_corpus_holds_the_mds_windows(tmp_path, shared_data):
    """Both formats are prepared from the same windows, in the same order: the same sample ids."""
    from streaming import StreamingDataset

    import llm_data
    from ted_stream.loaders.wds_index import WdsIndex

    index = WdsIndex.open(str(prepare_tiny(tmp_path, "wds")))
    mds = StreamingDataset(local=str(next(Path(shared_data).iterdir())), batch_size=1)
    assert index.num_samples == mds.num_samples == N
    for i in range(N):
        assert llm_data.decode_window(index.read(i)) == {k: mds[i][k] for k in ("input_ids", "doc")}
    with pytest.raises(ValueError, match="data format 'tfrecord' is invalid: expected one of mds, wds"):
        llm_data.data_tag(None, 512, 64, 20, N, "tfrecord")


@pytest.mark.slow  # a minute or more on 2 cores: .ci/run runs it with -m slow
def test_wds_corpus_prunes_and_resume_repeats_the_uninterrupted_run(tmp_path):
    """--data-format wds on 2 ranks (ZeRO-2, torchrun): no pruned id reaches a rank, every kept id
    once per epoch; --resume from the checkpoint at step 28, inside the first pruned epoch, gives
    each rank the uninterrupted run's ids, masks, scores and losses from there on. (The run folder
    is set up as a kill after step 28 leaves it; the kill itself is the MDS test's.)"""
    data = tmp_path / "data"
    prepare_tiny(data, "wds")  # once, read-only: each run keeps its table in its own folder
    common = ["--data-format", "wds", "--data-root", data, "--save-every", "7", "--log-ids", *TINY]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(torchrun(free_port(), "--out", ref, "--table-dir", ref / "ted", "--keep-checkpoints", "0", *common),
        tmp_path)
    table = assert_pruned_as_masked(ref, ref / "ted" / "table.tedt")
    assert metrics(ref)[-1]["saved"] > 0.15
    ends = {r["epoch"]: r["step"] for r in metrics(ref) if r["type"] == "epoch"}
    assert ends[0] < 28 < ends[1]

    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step28", cut / "checkpoints" / "step28")
    (cut / "checkpoints" / "latest").write_text("step28")
    shutil.copytree(ref / "ids", cut / "ids")  # the resumed run drops the rows after its checkpoint
    shutil.copy(ref / "metrics.jsonl", cut / "metrics.jsonl")
    proc = run(torchrun(free_port(), "--out", cut, "--table-dir", cut / "ted", "--resume", *common), tmp_path)
    assert "resumed from step28: epoch 1, step 28" in proc.stdout + proc.stderr

    for rank in range(2):
        assert seen_ids(cut, rank) == seen_ids(ref, rank)
    resumed = ScoreTable.load(str(cut / "ted" / "table.tedt"))
    for e in range(EPOCHS):
        np.testing.assert_array_equal(resumed.masks[e].keep, table.masks[e].keep)
    np.testing.assert_array_equal(resumed.scores, table.scores)
    a = [r for r in metrics(ref) if r["type"] in ("step", "epoch")]
    b = [r for r in metrics(cut) if r["type"] in ("step", "epoch")]
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for field in ("loss", "kept", "trained", "eval_loss"):
            if field in ra:
                assert ra[field] == pytest.approx(rb[field], rel=1e-6), (field, ra, rb)
