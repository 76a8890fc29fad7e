"""One job per table folder: an exclusive flock on ``<folder>/.ted-job.lock``, held while any
table of the process uses the folder, naming its holder (host, pid, command) for the next job.

The kernel drops the lock when the holder dies, kill -9 included, so a crash never leaves a
stale lock. flock serialises processes on one host; on network file systems that do not honour
it, two hosts are not kept apart (docs/reliability.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from typing import Any

from .table import TableError, current_umask

LOCKNAME = ".ted-job.lock"
_WAIT = 10.0  # seconds a newcomer waits for a holder that is exiting (a killed launcher's ranks)
# (pid, lock path) -> [fd, users]: one job may open the same table several times (train and
# resume in one process, a test): it holds the lock once. The pid tells a forked child apart.
_HELD: dict[tuple[int, str], list[int]] = {}


def claim(folder: str, owner: Any) -> None:
    """Hold the job lock of ``folder`` for as long as ``owner`` lives, or raise TableError naming
    the job that holds it."""
    path = os.path.realpath(os.path.join(folder, LOCKNAME))
    key = (os.getpid(), path)
    if key not in _HELD:
        try:
            fd = _acquire(path, folder)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return  # a folder this job cannot write holds no lock: no job can save a table there
        _HELD[key] = [fd, 0]
    _HELD[key][1] += 1
    weakref.finalize(owner, _release, key)


def holder_of(folder: str) -> dict[str, Any] | None:
    """What the lock file of ``folder`` says about its holder (None if there is none)."""
    try:
        with open(os.path.join(folder, LOCKNAME)) as f:
            return json.loads(f.read() or "null")
    except (FileNotFoundError, ValueError):
        return None


def _acquire(path: str, folder: str) -> int:
    os.makedirs(folder, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    deadline = time.monotonic() + _WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                holder = holder_of(folder) or {}
                raise TableError(
                    f"{folder} is in use by another job (host {holder.get('host')}, pid {holder.get('pid')}, "
                    f"since {holder.get('since')}: {holder.get('command')}); one job per table folder: "
                    "wait for it to end or stop it, or give this run another table_dir / --out"
                ) from None
            time.sleep(0.2)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def _release(key: tuple[int, str]) -> None:
    entry = _HELD.get(key)
    if entry is None or key[0] != os.getpid():
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _HELD[key]
        os.close(entry[0])  # releases the flock (the file stays: its holder line is harmless)
