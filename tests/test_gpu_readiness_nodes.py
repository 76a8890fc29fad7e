"""Many nodes, on one CPU: node leaders that share one table folder, NCCL's device before
torch.cuda.set_device, a barrier between a node leader's table save and any rank going on, a
checkpoint's table copy on every node, and two copies to one shared path by equal pids."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import make_corpus
from ted_stream import TEDConfig, TEDStreamingDataset
from ted_stream import dist as ted_dist
from ted_stream.protocol import TABLE_FILE, TEDProtocol
from ted_stream.table import copy_atomic
from ted_stream.table import FILENAME, ScoreTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_llm():
    spec = importlib.util.spec_from_file_location("train_llm", os.path.join(ROOT, "launch", "train_llm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_node_leaders_clear_one_shared_table(tmp_path, monkeypatch):
    mod = train_llm()
    shared = tmp_path / "ted"
    shared.mkdir()
    (shared / FILENAME).write_bytes(b"an earlier run's table")
    # node 0's leader is global rank 0, which claims the folder for the job (one process here: world 1)
    leaders = [SimpleNamespace(node=node, is_local_leader=True, is_leader=node == 0, world=1, barrier=lambda: None)
               for node in (0, 1)]
    args = argparse.Namespace(table_dir=str(shared))  # the job lock lives as long as the launcher's args
    # Both leaders saw the file before either removed it (exists-then-unlink raced here).
    real_exists = os.path.exists
    monkeypatch.setattr(mod.os.path, "exists", lambda p: p == str(shared / FILENAME) or real_exists(p))
    assert {mod.place_table(args, ctx, str(tmp_path), resume=False) for ctx in leaders} == {str(shared)}
    monkeypatch.undo()
    assert not (shared / FILENAME).exists()


@pytest.mark.parametrize("local_rank, current, count, expected", [
    ("3", 0, 8, 3),     # before torch.cuda.set_device: the launcher's LOCAL_RANK
    ("3", 5, 8, 5),     # set_device ran: its device
    ("3", 0, 1, 0),     # one visible GPU per rank (CUDA_VISIBLE_DEVICES per task)
    (None, 0, 8, 0),    # no launcher: the current device
])
def test_nccl_collectives_use_this_ranks_gpu(monkeypatch, local_rank, current, count, expected):
    monkeypatch.setattr(ted_dist.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert ted_dist.collective_device() == torch.device("cuda", expected)


def test_ranks_meet_after_the_node_leader_saved_the_frozen_mask(tmp_path, monkeypatch):
    cfg = TEDConfig(target=0.5, epochs=2, warmup_epochs=1, ramp_epochs=0)
    ds = TEDStreamingDataset(local=make_corpus(tmp_path / "data", 16), table_dir=str(tmp_path / "t"),
                             batch_size=4, ted=cfg)
    ted = TEDProtocol(ds, scorer={"reading": "loss"})
    on_disk_at_barrier = []
    monkeypatch.setattr(ted_dist, "barrier", lambda: on_disk_at_barrier.append(
        sorted(ScoreTable.load(ds.table_path).masks)))
    ted.start_epoch(0)
    assert on_disk_at_barrier == [[0]]


def test_every_node_leader_copies_the_table_into_its_checkpoint(tmp_path, monkeypatch):
    """--out on node-local disks: global rank 2, the leader of node 1, needs its own copy."""
    ds = TEDStreamingDataset(local=make_corpus(tmp_path / "data", 16), table_dir=str(tmp_path / "t"),
                             batch_size=4, ted=TEDConfig(target=0.5, epochs=1, warmup_epochs=1, ramp_epochs=0))
    ted = TEDProtocol(ds, scorer={"reading": "loss"})
    ted.start_epoch(0)
    monkeypatch.setattr(ted_dist, "rank", lambda: 2)
    ted.checkpoint(str(tmp_path / "node1" / "step4"))
    assert ScoreTable.load(str(tmp_path / "node1" / "step4" / TABLE_FILE)).masks.keys() == {0}


def test_two_writers_of_one_checkpoint_copy_with_the_same_pid(tmp_path, monkeypatch):
    """Two node leaders (the same pid in their containers) copy to one shared path at once."""
    src, dst = tmp_path / "table", tmp_path / "shared" / TABLE_FILE
    src.write_bytes(b"the table")
    dst.parent.mkdir()
    real_copy = shutil.copyfile
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    racing = []

    def copy_while_the_other_node_copies(a, b):
        real_copy(a, b)
        if not racing:  # the other leader runs its whole copy between this one's write and rename
            racing.append(b)
            copy_atomic(str(src), str(dst))

    monkeypatch.setattr(shutil, "copyfile", copy_while_the_other_node_copies)
    copy_atomic(str(src), str(dst))
    assert dst.read_bytes() == b"the table" and os.listdir(dst.parent) == [TABLE_FILE]
