"""ted_stream.integrations.hf: the Hugging Face Trainer with TED pruning, on a scratch 2-layer
Llama and 64 sequences of 16 tokens, as MDS shards (TEDStreamingDataset) and as indexed WebDataset
tar shards (TEDWebDataset, the exact path). Pruning happens and only kept samples are trained, the loss
is weighted by ted_weight, the learning-rate schedule ends with the last pruned epoch, and a run
resumed from a Trainer checkpoint (mid-epoch and at an epoch end) reproduces the uninterrupted
run's sample stream, table and weights. launch/train_hf.py on 2 CPU ranks under the Trainer's
DeepSpeed integration (ZeRO-2 by default; ZeRO-3 and plain DDP marked slow: `pytest -m slow`) prunes and
resumes."""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from ted_stream import TEDConfig, TEDStreamingDataset, TEDWebDataset  # noqa: E402
from ted_stream.integrations.hf import STATE_FILE, TEDTrainer  # noqa: E402
from ted_stream.loaders.wds import TEDWebLoader  # noqa: E402
from ted_stream.prepare import write_mds  # noqa: E402
from ted_stream.loaders.wds_index import MANIFEST, prepare_shards  # noqa: E402
from ted_stream.protocol import TABLE_FILE  # noqa: E402
from ted_stream.scorer import per_sample_lm_loss  # noqa: E402
from ted_stream.table import ScoreTable  # noqa: E402

N, SEQ, VOCAB, BATCH, GAS, EPOCHS, LR = 64, 16, 64, 4, 2, 3, 1e-2
CFG = TEDConfig(target=0.5, epochs=EPOCHS, warmup_epochs=1, ramp_epochs=1, explore=0.2, max_weight=2.0)
RESUME_STEPS = (10, 12)
FULL_UPDATES = N // BATCH // GAS  # 8 per unpruned epoch; 4 per epoch at half the data


def samples():
    rng = np.random.default_rng(0)
    # "doc" is a column the model does not take: the Trainer's remove_unused_columns drops it
    return ({"input_ids": rng.integers(0, VOCAB, SEQ).tolist(), "doc": i} for i in range(N))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "data"
    write_mds(samples(), str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def wds_corpus(tmp_path_factory):
    """The same samples as tar shards (one ``<key>.json`` member each) and their manifest."""
    folder = tmp_path_factory.mktemp("hf-wds") / "data"
    prepare_shards(samples(), str(folder), shard_bytes=16 << 10)
    assert len([n for n in os.listdir(folder) if n.endswith(".tar")]) > 1
    return str(folder)


def decode_json(raw):
    return json.loads(raw["json"])


def open_dataset(folder, table_dir, **kw):
    """The pruning dataset of ``folder``: tar shards with a manifest, or MDS."""
    if os.path.exists(os.path.join(folder, MANIFEST)):
        return TEDWebDataset(folder, table_dir=str(table_dir), decode=decode_json, batch_size=BATCH, seed=1,
                             ted=CFG, **kw)
    return TEDStreamingDataset(local=folder, table_dir=str(table_dir), batch_size=BATCH, shuffle=True,
                               shuffle_seed=1, ted=CFG, **kw)


def collate(samples):
    ids = torch.tensor([s["input_ids"] for s in samples])
    return {"input_ids": ids, "labels": ids.clone()}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ))


class Recording(TEDTrainer):
    """Records each training micro-batch's ids and weights, and checks its loss on the way."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ids: list[list[int]] = []
        self.weights: list[list[float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.ids.append(inputs["ted_id"].tolist())
            self.weights.append(inputs["ted_weight"].tolist())
            with torch.no_grad():
                expected = (per_sample_lm_loss(model(input_ids=inputs["input_ids"]).logits, inputs["labels"])
                            * inputs["ted_weight"]).mean()
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            torch.testing.assert_close(loss.detach(), expected)  # the per-sample loss, weighted
        return loss


def trainer(corpus, out, table_dir, **args) -> Recording:
    ds = open_dataset(corpus, table_dir)
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GAS,
        num_train_epochs=EPOCHS, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        **{"save_strategy": "steps", "save_steps": 2, **args})
    return Recording(model=tiny_llama(), args=targs, train_dataset=ds, data_collator=collate,
                     ted_scorer={"rows": 4})


def release(t: Recording) -> None:
    t.ted.scorer.remove()
    t.train_dataset = t._ted_loader = t.ted = t.callback_handler = None
    gc.collect()


class SaveAt(TrainerCallback):
    """A Trainer checkpoint after each of ``steps`` (optimizer steps), and no other."""

    def __init__(self, *steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps


@pytest.fixture(scope="module", params=["mds", "wds"])
def reference(request, tmp_path_factory):
    """The uninterrupted run, on MDS (a checkpoint every 2 optimizer steps) or tar shards
    (checkpoints at the steps the resume test starts from)."""
    corpus = request.getfixturevalue("corpus" if request.param == "mds" else "wds_corpus")
    root = tmp_path_factory.mktemp("ref")
    if request.param == "mds":
        t = trainer(corpus, root / "out", root / "table")
    else:
        t = trainer(corpus, root / "out", root / "table", save_strategy="no")
        t.add_callback(SaveAt(*RESUME_STEPS))
        assert isinstance(t.get_train_dataloader(), TEDWebLoader)  # the exact path's, handed over as is
    t.train()
    run = {"ids": t.ids, "weights": t.weights, "log": t.state.log_history, "root": root, "corpus": corpus,
           "table": ScoreTable.load(t.train_dataset.table_path), "ds_kept": {},
           "params": {k: v.clone() for k, v in t.model.state_dict().items()}}
    run["ds_kept"] = {e: t.train_dataset.kept_ids(e).tolist() for e in range(EPOCHS)}
    release(t)
    return run


def ted_rows(log):
    return [{k: v for k, v in r.items() if k.startswith("ted_")} for r in log if "ted_kept" in r]


def test_trainer_prunes_weights_and_schedules_by_epoch(reference):
    rows = ted_rows(reference["log"])
    kept = [r["ted_kept"] for r in rows]
    assert [r["ted_epoch"] for r in rows] == list(range(EPOCHS))
    assert kept[0] == N and kept[1] == kept[2] == N // 2
    assert [r["ted_trained"] for r in rows] == kept
    assert rows[-1]["ted_saved_so_far"] == pytest.approx(1 - sum(kept) / (EPOCHS * N))
    # only the kept samples, each once per epoch; the loader's length followed the pruned epochs
    bounds = np.cumsum([0] + [k // BATCH for k in kept])
    for e in range(EPOCHS):
        seen = sum(reference["ids"][bounds[e]:bounds[e + 1]], [])
        assert sorted(seen) == reference["ds_kept"][e]
    assert len(reference["ids"]) == bounds[-1]
    assert max(max(w) for w in reference["weights"]) > 1.0  # rescaled samples reached the loss
    # every sample scored in the warm-up
    assert reference["table"].scored.all()
    # the schedule follows epochs: linear decay reaches ~0 at the last of 16 real steps
    # (step-based, the 48 planned steps would still leave a third of the peak)
    steps = [r for r in reference["log"] if "learning_rate" in r and "loss" in r]
    assert len(steps) == sum(kept) // (BATCH * GAS) == 16
    lrs = [r["learning_rate"] for r in steps]
    assert lrs[-1] < 0.1 * LR and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert steps[-1]["epoch"] == pytest.approx(EPOCHS)  # state.epoch counts streaming's epochs
    assert os.path.exists(reference["root"] / "out" / "checkpoint-10" / TABLE_FILE)
    assert os.path.exists(reference["root"] / "out" / "checkpoint-10" / STATE_FILE)


@pytest.mark.parametrize("step", RESUME_STEPS, ids=["mid-pruned-epoch", "epoch-end"])
def test_resume_from_a_trainer_checkpoint_is_exact(reference, tmp_path, step):
    """Epoch 0 has 8 steps and epochs 1, 2 have 4: step 10 is inside epoch 1, step 12 its end
    (where the Trainer's own arithmetic, 12 // 8, would say epoch 1 with 4 steps done)."""
    out, table_dir = tmp_path / "out", tmp_path / "table"
    shutil.copytree(reference["root"] / "out" / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copytree(reference["root"] / "table", table_dir)  # the finished run's table: later scores, masks
    t = trainer(reference["corpus"], out, table_dir)
    t.train(resume_from_checkpoint=True)
    assert t.ids == reference["ids"][step * GAS:]
    resumed_rows = ted_rows(t.state.log_history)
    assert resumed_rows == [r for r in ted_rows(reference["log"]) if r["ted_epoch"] >= resumed_rows[0]["ted_epoch"]]
    final = ScoreTable.load(t.train_dataset.table_path)
    np.testing.assert_array_equal(final.scores, reference["table"].scores)
    for e in range(EPOCHS):
        np.testing.assert_array_equal(final.masks[e].keep, reference["table"].masks[e].keep)
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, reference["params"][k], rtol=1e-5, atol=1e-6)
    release(t)


def test_configuration_errors_name_the_value(corpus, wds_corpus, tmp_path):
    ds = TEDStreamingDataset(local=corpus, table_dir=str(tmp_path / "t"), batch_size=BATCH, ted=CFG)
    base = dict(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"TEDWebDataset\(batch_size=4\) but per_device_train_batch_size=8"):
        TEDTrainer(model=tiny_llama(), args=TrainingArguments(**base, per_device_train_batch_size=8,
                                                              num_train_epochs=3),
                   train_dataset=open_dataset(wds_corpus, tmp_path / "tw"))
    with pytest.raises(ValueError, match=r"TEDWebDataset\(rank=1, world_size=2\) but the Trainer runs rank 0 of 1"):
        TEDTrainer(model=tiny_llama(), args=TrainingArguments(**base, per_device_train_batch_size=BATCH,
                                                              num_train_epochs=3),
                   train_dataset=open_dataset(wds_corpus, tmp_path / "tw", rank=1, world_size=2))
    cases = [(dict(per_device_train_batch_size=8, num_train_epochs=3), "batch_size=4.*per_device_train_batch_size=8"),
             (dict(per_device_train_batch_size=BATCH, max_steps=5), "max_steps=5"),
             (dict(per_device_train_batch_size=BATCH, num_train_epochs=2.5), "num_train_epochs=2.5"),
             (dict(per_device_train_batch_size=BATCH, num_train_epochs=2), "epochs=2 but .*epochs=3")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            TEDTrainer(model=tiny_llama(), args=TrainingArguments(**base, **kw), train_dataset=ds)
    with pytest.raises(TypeError, match="is a list: expected a TEDStreamingDataset or a TEDWebDataset"):
        TEDTrainer(model=tiny_llama(), args=TrainingArguments(**base), train_dataset=[1, 2])


# ---- launch/train_hf.py on 2 CPU ranks --------------------------------------------------------
def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unlink_deepspeed_buffers(master_port: int) -> None:
    """DeepSpeed's CPU allreduce buffers (~66 MB each) of the job on ``master_port``: a run
    leaves them in /dev/shm."""
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_") and f"_{master_port}_" in name:
            os.unlink(os.path.join("/dev/shm", name))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max-docs", "20", "--max-samples", "64", "--seq-len", "32", "--vocab-size", "256", "--batch", "4",
        "--epochs", "3", "--hidden", "32", "--save-steps", "5", "--threads", "1"]
MODES = {"zero2": ["--deepspeed", os.path.join(ROOT, "launch", "configs", "hf_zero2.json")],
         "zero3": ["--deepspeed", os.path.join(ROOT, "launch", "configs", "hf_zero3.json")],
         "ddp": []}


def launch(out, mode, master_port, tmp, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(master_port), os.path.join(ROOT, "launch", "train_hf.py"),
           "--out", str(out), *MODES[mode], *TINY, *extra]
    try:  # no wall-clock limit of our own: a loaded 2-core machine may take minutes
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        unlink_deepspeed_buffers(master_port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("mode", [
    "zero2",
    pytest.param("zero3", marks=pytest.mark.slow),  # minutes on 2 cores: .ci/run runs them with -m slow
    pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_ranks_prune_and_resume_through_the_launcher(tmp_path, mode):
    """torchrun, 2 CPU ranks, the Trainer's DeepSpeed integration with a config file whose "ted"
    block the library reads (or plain DDP): streaming alone partitions the kept samples (each
    optimizer step takes 2 x 4 of them), and a run resumed from a mid-epoch checkpoint ends with
    the uninterrupted run's table and per-epoch figures."""
    (tmp_path / "tmp").mkdir()
    log = launch(tmp_path / "a", mode, port(), tmp_path / "tmp")
    rows = ted_rows(log)
    kept = [r["ted_kept"] for r in rows]
    assert kept[0] == 64 and kept[1] < 64 and kept[2] < 64, kept
    assert [r["ted_trained"] for r in rows] == kept
    assert log[-1]["step"] == sum(kept) // (2 * 4)  # neither re-sharded (fewer steps) nor duplicated (more)
    data = next((tmp_path / "a" / "data").iterdir())
    table = ScoreTable.load(str(data / "ted" / "table.tedt"))
    assert [table.masks[e].kept for e in range(3)] == kept

    if mode == "ddp":  # transformers 4.57 loads a CPU DDP run's optimizer state with map_location=args.device
        return        # ("cpu:0"), which torch.load refuses: the Trainer itself cannot resume there
    # resume from the mid-epoch checkpoint at step 10 in a copy holding the finished run's data and table
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "data")
    shutil.copytree(tmp_path / "a" / "checkpoint-10", tmp_path / "b" / "checkpoint-10")
    log_b = launch(tmp_path / "b", mode, port(), tmp_path / "tmp", "--resume")
    final = ScoreTable.load(str(next((tmp_path / "b" / "data").iterdir()) / "ted" / "table.tedt"))
    np.testing.assert_array_equal(final.scores, table.scores)
    assert ted_rows(log_b) == rows


def test_launcher_trains_on_a_wds_corpus(tmp_path, monkeypatch):
    """`python launch/train_hf.py --data-format wds`, in this process (one rank; the 2-rank path is
    the MDS launcher test's, and the loader is the one tested above): the news windows as tar
    shards with their manifest, pruned, each epoch trained on exactly its kept samples."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    spec = importlib.util.spec_from_file_location("train_hf", os.path.join(ROOT, "launch", "train_hf.py"))
    train_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_hf)
    threads = torch.get_num_threads()
    try:
        assert train_hf.main(["--out", str(tmp_path / "run"), "--data-format", "wds", *TINY, "--save-steps", "100"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = tmp_path / "run" / "data" / "news-bpe256-L32-D20-S64-wds"
    assert (data / MANIFEST).exists() and not (data / "index.json").exists()
    with open(tmp_path / "run" / "log.jsonl") as f:
        rows = ted_rows([json.loads(line) for line in f])
    table = ScoreTable.load(str(data / "ted" / "table.tedt"))
    assert [r["ted_kept"] for r in rows] == [table.masks[e].kept for e in range(3)]
    assert rows[0]["ted_kept"] == 64 and rows[1]["ted_kept"] < 64 and rows[2]["ted_kept"] < 64
    assert [r["ted_trained"] for r in rows] == [r["ted_kept"] for r in rows]
    with pytest.raises(SystemExit):
        train_hf.parse_args(["--data-format", "tfrecord"])


def test_trainer_wds_recipe_in_the_docs_runs(capsys):
    from test_protocol import recipe

    exec(compile(recipe("trainer-wds"), "docs/integrations.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "[64, 32, 32]"
    gc.collect()


def test_trainer_recipe_in_the_docs_runs(capsys):
    from test_protocol import recipe

    exec(compile(recipe("trainer"), "docs/integrations.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.findall(r"kept (\d+), saved so far (\d+)%", out) == [("64", "0"), ("32", "25"), ("32", "33")]
    gc.collect()


def test_deepspeed_recipe_in_the_docs_runs(tmp_path):
    """The DeepSpeed recipe as the script it is, under torchrun (one rank: the 2-rank path is
    test_two_ranks_prune_and_resume_through_the_launcher)."""
    from test_protocol import recipe

    script = tmp_path / "train.py"
    script.write_text(recipe("deepspeed"))
    master_port = port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), PYTHONPATH=ROOT)
    try:
        proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(master_port), str(script),
                               str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True)
    finally:
        unlink_deepspeed_buffers(master_port)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.strip().splitlines()[-1] == "[64, 32, 32]"


def test_missing_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import ted_stream.integrations.hf\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'ted_stream[hf]'" in out
