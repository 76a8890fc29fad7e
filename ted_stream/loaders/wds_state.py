"""The score table a ``TEDWebDataset`` state was taken with, kept beside the live table.

A resume point says where in the epoch to go on, but the next epochs' masks follow from the scores
recorded up to that point: a live table that is behind (a kill lost the scores since the last
save) or ahead (the run went on after the state was taken) prunes another set. So every state
names a copy of the table as it was, ``<table folder>/states/table-<digest>.tedt``, named by its
content (a state taken twice on one table costs one copy), and loading a state whose table is not
the live one makes that copy the live table. The newest ``KEEP`` copies are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np

from ..table import ScoreTable, copy_atomic

STATES = "states"
KEEP = 8  # copies kept per table folder: the states a loop may go back to


def table_digest(table: ScoreTable) -> str:
    """What the next masks depend on: scores, their epochs and the frozen masks (by CRC)."""
    h = hashlib.sha256()
    for part in (table.scores, table.updated):
        h.update(np.ascontiguousarray(part).view(np.uint8).data)
    h.update(repr(sorted((e, m.crc) for e, m in table.masks.items())).encode())
    return h.hexdigest()[:16]


def snapshot_name(digest: str) -> str:
    """The copy's path relative to the table's folder (stored in the state: the folder may move)."""
    return f"{STATES}/table-{digest}.tedt"


def keep_snapshot(table_path: str, digest: str) -> None:
    """Copy the saved table into its content-named place (once), then drop all but the newest KEEP."""
    path = os.path.join(os.path.dirname(table_path), snapshot_name(digest))
    if os.path.exists(path):
        os.utime(path)  # taken again: as recent as a new copy
    else:
        copy_atomic(table_path, path)
    folder = os.path.dirname(path)
    copies = sorted((os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tedt")), key=os.path.getmtime)
    for old in copies[:-KEEP]:
        with contextlib.suppress(FileNotFoundError):  # another node's writer may share the folder
            os.unlink(old)
