"""The format-free half of a pruning loader: the score table and the collective steps around it.

``Pruner`` records scores, merges them across ranks, freezes an epoch's keep-mask (rank 0 runs the
policy, every rank receives the same bits) and persists the table. A loader adds only what its
format needs: which sample ids exist, how to read and order them, and how it selects (a static
filter, say). Both loaders hold one: ``TEDWebDataset`` and ``TEDStreamingDataset``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np
import torch

from . import dist, joblock, shard
from .config import TEDConfig
from .table import EpochMask, ScoreTable, TableError, copy_atomic

Selector = Callable[[ScoreTable, int], EpochMask]
"""``fn(table, epoch)``: the policy's keep-mask of ``epoch`` from ``table``'s scores."""


def as_config(ted: Any) -> TEDConfig:
    if ted is None:
        return TEDConfig()
    if isinstance(ted, TEDConfig):
        return ted
    if isinstance(ted, Mapping):
        return TEDConfig.from_dict(ted)
    raise TypeError(f"ted={ted!r} is invalid: expected a TEDConfig, a mapping or None")


def local_leader() -> bool:
    """Whether this process writes the node's copy of the table (local rank 0, or no torchrun)."""
    if not dist.active():
        return True
    return int(os.environ.get("LOCAL_RANK", dist.rank())) == 0


class HasPruner:
    """The table views of a loader whose scores and masks live in ``self.pruner``."""

    pruner: Pruner

    @property
    def table(self) -> ScoreTable:
        return self.pruner.table

    @property
    def table_path(self) -> str:
        return self.pruner.table_path


class Pruner:
    """Scores, masks and persistence of one dataset's ``ScoreTable`` at ``table_path``.

    An existing table must carry ``fingerprint`` (TableError otherwise) and be bound to the same
    run configuration (see ``ScoreTable.bind``). ``leader``: whether this process writes the node's
    copy of the table; default ``local_leader()`` (at construction, like the loaders' ranks).
    """

    def __init__(self, table_path: str, fingerprint: dict[str, Any], ted: TEDConfig, leader: Optional[bool] = None):
        self.ted = ted
        self.table_path = table_path
        self.leader = local_leader() if leader is None else leader
        self._claim_folder()
        self.table = self._open(fingerprint)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._holders: Optional[list[int]] = None  # ranks that receive the whole merged table

    def _claim_folder(self) -> None:
        """One job per table folder (``joblock``): global rank 0 claims it for the whole job and
        every rank raises the same TableError if another job holds it (a collective)."""
        folder = os.path.dirname(os.path.abspath(self.table_path))
        if not dist.active():
            joblock.claim(folder, self)
            return
        refusal = b""
        if dist.rank() == 0:
            try:
                joblock.claim(folder, self)
            except TableError as err:
                refusal = str(err).encode()
        refusal = bytes(dist.broadcast_bytes(np.frombuffer(refusal, np.uint8) if dist.rank() == 0 else None))
        if refusal:
            raise TableError(refusal.decode())

    def _open(self, fingerprint: dict[str, Any]) -> ScoreTable:
        """The table at ``table_path`` (a new one if there is none), bound to this run."""
        if os.path.exists(self.table_path):
            table = ScoreTable.load(self.table_path, fingerprint)
        else:
            table = ScoreTable(fingerprint["num_samples"], fingerprint, self.ted.ema, path=self.table_path)
        table.ema = self.ted.ema
        table.bind(self.ted.run_identity())
        return table

    def reload(self) -> None:
        """Replace the in-memory table by the file's; scores recorded but not yet merged are
        dropped, since they were recorded against the replaced table."""
        self.table = self._open(self.table.fingerprint)
        self._pending = []

    def replace(self, path: str) -> None:
        """Make the table at ``path`` (e.g. a checkpoint's copy) this one: the node's leader copies
        it over ``table_path``, then every rank reloads it (a collective under torch.distributed)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"load_table: {path} is missing: expected a score table file")
        if self.leader:  # the node's copy (nodes may each hold their own)
            copy_atomic(path, self.table_path)
        dist.barrier()
        self.reload()

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    def record(self, ids: Any, scores: Any) -> None:
        """Fold per-sample scores in (buffered until ``sync`` under torch.distributed)."""
        ids, scores = self.table.checked(_to_numpy(ids), _to_numpy(scores))
        if dist.active():
            self._pending.append((ids, scores))
        else:
            self.table.record(ids, scores)

    def sync(self) -> None:
        """Merge every rank's buffered scores (collective), sharded by id range (``shard``).

        Each record goes to the rank owning its id, which folds it into its slice of the table;
        the owners' slice deltas go to the ranks holding the whole table: each node's leader
        (which writes the node's file) and rank 0 (which freezes). Per rank that is its slice's
        records, not every rank's. The other ranks hold the whole merged table again after
        ``save``, which maps the node's file on every rank.
        """
        if not dist.active():
            return
        ids = np.concatenate([p[0] for p in self._pending]) if self._pending else np.empty(0, np.int64)
        vals = np.concatenate([p[1] for p in self._pending]) if self._pending else np.empty(0, np.float32)
        self._pending = []
        n, me = self.num_samples, dist.rank()
        bounds = shard.owner_bounds(n, torch.distributed.get_world_size())
        lo, hi = int(bounds[me]), int(bounds[me + 1])
        ids, vals, counts = shard.route(ids, vals, bounds, n)
        got_ids, got_vals = dist.all_to_all(ids, counts), dist.all_to_all(vals, counts)
        touched = shard.fold_owned(self.table, got_ids, got_vals, lo, hi)
        delta = shard.encode_delta(self.table.scores[lo:hi], self.table.updated[lo:hi], touched)
        if self._holders is None:  # once: leaders do not change
            self._holders = sorted(set(dist.all_gather_flags(self.leader)) | {0})
        for src, data in enumerate(dist.gather_at(delta, self._holders) or []):
            if src != me:
                shard.apply_delta(self.table, int(bounds[src]), int(bounds[src + 1]), data)

    def freeze(self, epoch: int, choose: Selector) -> EpochMask:
        """The keep-mask of ``epoch``, bit-identical on every rank (collective); persisted.

        Rank 0 runs ``choose`` on its merged table and sends the mask to the ranks that hold the
        whole table (each node's leader); the other ranks read it from the node's file, which
        ``save`` maps on every rank, so the mask crosses the network once per node, not per rank.
        A mask already in the table (a resumed run) is kept, never recomputed.
        """
        self.sync()
        self.table.epoch = epoch
        mask = self.table.masks.get(epoch)
        if mask is None and dist.rank() == 0:
            mask = choose(self.table, epoch)
        if dist.active():
            mask = self._to_holders(epoch, mask)
        if mask is not None:
            self.table.masks[epoch] = mask
        self.save()
        return self.table.masks[epoch]

    def save(self) -> None:
        """Merge scores (collective) and write the table atomically from each node's leader; then
        every rank maps the node's file: the whole merged table on every rank, one copy per node."""
        self.sync()
        if self.leader:
            self.table.save(self.table_path)
        if dist.active():
            dist.barrier()
            self.reload()

    def load_file(self) -> Optional[ScoreTable]:
        """The table file (None if there is none), whose frozen masks this table adopts: a
        persistent DataLoader worker's copy predates later freezes by the main process."""
        if not os.path.exists(self.table_path):
            return None
        disk = ScoreTable.load(self.table_path, self.table.fingerprint)
        for epoch, mask in disk.masks.items():
            self.table.masks.setdefault(epoch, mask)
        return disk

    def mask(self, epoch: int) -> Optional[EpochMask]:
        """The frozen mask of ``epoch``: in memory, else from the table file; None if it was
        never frozen."""
        if epoch not in self.table.masks:
            self.load_file()
        return self.table.masks.get(epoch)

    def _to_holders(self, epoch: int, mask: Optional[EpochMask]) -> Optional[EpochMask]:
        """Rank 0's ``mask`` on every rank of ``_holders`` (set by ``sync``); None elsewhere."""
        assert self._holders is not None  # sync ran first
        mine = mask.to_bytes() if dist.rank() == 0 and mask is not None else np.empty(0, np.uint8)
        got = dist.gather_at(mine, self._holders)
        return None if got is None else EpochMask.from_bytes(epoch, got[0], self.num_samples)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _to_numpy(x: Any) -> Any:
    if not hasattr(x, "detach"):
        return x
    x = x.detach().cpu()
    # numpy has no bfloat16 (nor float8): widen such scores to float32, which holds them exactly
    return (x.float() if x.is_floating_point() and x.dtype not in _NUMPY_FLOATS else x).numpy()
