"""launch/train_llm.py: config errors before any heavy import, stale /dev/shm, safe checkpoint loading."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "train_llm.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_llm_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("ted,needle", [
    ({"rescale": "false"}, "TEDConfig.rescale='false' is invalid: expected true or false"),
    ({"target": "0.4"}, "TEDConfig.target='0.4' is invalid: expected a number"),
    ({"scorer": {"layers": 5}}, "scorer.layers=5 is invalid"),
    ({"scorer": {"rows": 2.5}}, "scorer.rows=2.5 is invalid"),
])
def test_ill_typed_config_fails_before_torch_is_imported(tmp_path, ted, needle):
    cfg = json.loads((ROOT / "launch" / "configs" / "zero2.json").read_text())
    cfg["ted"].update(ted)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    code = (f"import sys; sys.argv = ['train_llm']; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            f"import train_llm; rc = train_llm.main(['--config', {str(bad)!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, sorted(m for m in ('torch', 'streaming', 'deepspeed') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert needle in proc.stderr


HOLD = r"""
import mmap, os, sys, time
f = open(sys.argv[1], "r+b"); m = mmap.mmap(f.fileno(), 0)   # mapped, like DeepSpeed's buffer
g = open(sys.argv[2], "rb")                                   # only held open
print("ready", flush=True); sys.stdin.readline()
"""


def test_stale_shared_memory_is_removed_whatever_the_port_and_live_files_stay(tmp_path):
    mod = _module()
    uid = os.getuid()
    names = {"stale_ds": f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29511_0",  # another port than ours
             "live_ds": f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29600_0",
             "stale_streaming": "000042_locals", "live_streaming": "000043_barrier",
             "other": "not_ours.bin", "other_user": f"deepspeed_allreduce_buffer_{uid + 1}_x_1_0"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / names["live_ds"]),
                               str(tmp_path / names["live_streaming"])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        removed = mod.clean_stale_shm(str(tmp_path))
    finally:
        holder.communicate("done\n", timeout=600)
    assert sorted(removed) == sorted([names["stale_ds"], names["stale_streaming"]])
    left = set(os.listdir(tmp_path))
    assert left == {names["live_ds"], names["live_streaming"], names["other"], names["other_user"]}


class _FakeEngine:
    """What load_checkpoint_weights_only relies on: DeepSpeed reads every file via checkpoint_engine."""

    class _Reader:
        def load(self, path, map_location=None):
            import torch

            return torch.load(path, map_location=map_location, weights_only=False)  # DeepSpeed's default

    def __init__(self):
        self.checkpoint_engine = self._Reader()

    def load_checkpoint(self, ckpt_dir, tag):
        return tag, self.checkpoint_engine.load(os.path.join(ckpt_dir, tag, "state.pt"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a tampered checkpoint would carry: code that runs on unpickling
        return (open, (self.marker, "w"))


def test_checkpoints_load_weights_only_with_deepspeed_classes_allowed(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    mod = _module()
    good, evil = tmp_path / "good", tmp_path / "evil"
    good.mkdir(), evil.mkdir()
    torch.save({"w": torch.ones(3), "scaler": LossScaler(1.0), "stage": ZeroStageEnum.gradients,
                "train": {"epoch": 1}}, good / "state.pt")
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(3), "x": _Evil(str(marker))}, evil / "state.pt")
    _, state = mod.load_checkpoint_weights_only(_FakeEngine(), str(tmp_path), "good")
    assert state["stage"] == ZeroStageEnum.gradients and state["train"] == {"epoch": 1}
    with pytest.raises(Exception, match="Weights only load failed"):
        mod.load_checkpoint_weights_only(_FakeEngine(), str(tmp_path), "evil")
    assert not marker.exists()
    _FakeEngine().load_checkpoint(str(tmp_path), "evil")  # the control: DeepSpeed's default runs it
    assert marker.exists()


def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    """SIGKILL of the launcher must not leave ranks training into the same --out."""
    import signal
    import time

    rank = (f"import sys, time; sys.path.insert(0, {str(SCRIPT.parent)!r}); import train_llm; "
            "print(train_llm.die_with_launcher(poll=0.05), flush=True); time.sleep(600)")
    launcher = ("import os, subprocess, sys; "
                f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=sys.stdout, "
                "env={**os.environ, 'LOCAL_RANK': '0', 'RANK': '0'}); print(p.pid, flush=True); p.wait()")
    env = {k: v for k, v in os.environ.items() if k != "TED_SINGLE_PROCESS"}
    top = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, env=env)
    child = int(top.stdout.readline())
    assert top.stdout.readline().strip() == f"[{top.pid}]"  # the rank watches its launcher
    top.kill()
    top.wait()
    for _ in range(1200):  # the rank notices within its poll; generous for a busy machine
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped (by init)
                break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the rank kept running after its launcher was killed")
