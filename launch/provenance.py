"""What every benchmark result line records about how it was made: the commit, whether the code
had uncommitted changes, the machine, the date and the exact command."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:  # no git on this machine
        return ""


def git_state() -> dict[str, object]:
    """The commit the run imported and whether tracked code differed from it (docs/, where the
    results themselves are written, does not count). Call it before the run starts."""
    return {"commit": _git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"))}


def machine() -> str:
    try:
        import psutil
        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        memory = ""
    return f"{platform.machine()}, {os.cpu_count()} cores{memory}"


def provenance() -> dict[str, object]:
    """commit, dirty, machine, date and command of this process."""
    return {**git_state(), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}
