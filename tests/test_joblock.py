"""One job per table folder: a second process is refused with the holder's name; the lock goes
with its holder, kill -9 included."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ted_stream import TEDConfig, TEDStreamingDataset, joblock
from ted_stream.table import TableError

HOLD = textwrap.dedent("""
    import sys
    from ted_stream import TEDConfig, TEDStreamingDataset
    ds = TEDStreamingDataset(local=sys.argv[1], batch_size=4, ted=TEDConfig())
    print("ready", flush=True)
    sys.stdin.read()  # hold the dataset until the test closes stdin (or kills us)
""")


def hold(corpus):
    p = subprocess.Popen([sys.executable, "-c", HOLD, corpus], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_second_job_is_refused_naming_the_holder(corpus, monkeypatch):
    monkeypatch.setattr(joblock, "_WAIT", 0.5)
    first = hold(corpus)
    try:
        with pytest.raises(TableError, match=rf"{corpus}/ted is in use by another job \(host .*, pid {first.pid}, "
                                             r"since .*\); one job per table folder"):
            TEDStreamingDataset(local=corpus, batch_size=4, ted=TEDConfig())
        assert joblock.holder_of(os.path.join(corpus, "ted"))["pid"] == first.pid
    finally:
        first.kill()  # kill -9: the kernel drops the lock with its holder
        first.wait()
    ds = TEDStreamingDataset(local=corpus, batch_size=4, ted=TEDConfig())
    assert joblock.holder_of(os.path.join(corpus, "ted"))["pid"] == os.getpid()
    again = TEDStreamingDataset(local=corpus, batch_size=4, ted=TEDConfig())  # one job, two datasets
    del ds, again


def test_the_lock_goes_with_the_last_dataset_of_the_process(corpus, monkeypatch):
    import gc

    monkeypatch.setattr(joblock, "_WAIT", 0.5)
    ds = TEDStreamingDataset(local=corpus, batch_size=4, ted=TEDConfig())
    del ds
    gc.collect()
    other = hold(corpus)  # another process can take the folder once this one let go of it
    other.send_signal(signal.SIGTERM)
    other.wait()


def test_a_folder_this_job_cannot_write_is_read_without_a_lock(tmp_path, monkeypatch):
    import errno

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(joblock.LOCKNAME):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    folder = tmp_path / "ro"
    joblock.claim(str(folder), object.__new__(type("Owner", (), {})))
    assert not [k for k in joblock._HELD if k[1].startswith(str(folder))]
    monkeypatch.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError, match="full"):  # any other failure is not swallowed
        joblock.claim(str(tmp_path / "other"), object.__new__(type("Owner", (), {})))
