"""TEDStreamingDataset: mosaicml-streaming's StreamingDataset that skips pruned samples.

The filter sits in ``resample_streams``, the one place every batching method asks which samples
make up an epoch, so upstream partitioning, shuffling, padding and mid-epoch resumption run
unchanged on the kept samples.
"""
from __future__ import annotations

import logging
import os
from math import ceil
from typing import Any, Mapping, Optional, Union

import numpy as np
from numpy.typing import NDArray
from streaming import StreamingDataset

from .. import dist
from ..config import TEDConfig
from ..fingerprint import index_fingerprint
from ..policy import select
from ..schedule import pruned_fraction
from ..table import FILENAME, EpochMask, ScoreTable

logger = logging.getLogger(__name__)


def _local_world_size_from_deepspeed() -> None:
    # The deepspeed launcher sets LOCAL_SIZE only; streaming counts nodes from LOCAL_WORLD_SIZE
    # and, without it, takes every rank for a node of its own (streaming issue 717).
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


class TEDStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose epochs skip the samples the TED policy prunes.

    Takes every ``StreamingDataset`` keyword argument, plus:
        ted: a ``TEDConfig`` (or a mapping of its fields); default ``TEDConfig()``.
        table_dir: folder of the score table; default ``<local>/<split>/ted`` beside
            ``index.json`` (required when there are several streams).
        groups: optional, one integer per sample in global sample-id order (e.g. the class
            label): the ``ted`` policy then prunes the same fraction of every group. It must be
            the same on every rank.

    Each sample gains ``ted_id`` (its global sample id, the key for ``record``) and
    ``ted_weight`` (its loss weight this epoch: 1 unless the policy rescales).
    """

    def __init__(self, *, ted: Union[TEDConfig, Mapping[str, Any], None] = None,
                 table_dir: Optional[str] = None, groups: Any = None, **kwargs: Any) -> None:
        if ted is None:
            ted = TEDConfig()
        elif isinstance(ted, Mapping):
            ted = TEDConfig.from_dict(ted)
        elif not isinstance(ted, TEDConfig):
            raise TypeError(f"ted={ted!r} is invalid: expected a TEDConfig, a mapping or None")
        _local_world_size_from_deepspeed()
        super().__init__(**kwargs)
        self.ted = ted
        self.groups = groups
        index_dirs = [os.path.join(s.local, s.split or "") for s in self.streams]
        if table_dir is None:
            if len(index_dirs) > 1:
                raise ValueError(f"{len(index_dirs)} streams need an explicit table_dir: "
                                 "the table covers their mixture, not one of them")
            table_dir = os.path.join(index_dirs[0], "ted")
        self.table_path = os.path.join(table_dir, FILENAME)
        fingerprint = index_fingerprint(index_dirs)
        if os.path.exists(self.table_path):
            self.table = ScoreTable.load(self.table_path, fingerprint)
            self.table.ema = ted.ema
        else:
            self.table = ScoreTable(self.num_samples, fingerprint, ted.ema, path=self.table_path)
        self.table.bind(ted.run_identity())  # refuses masks frozen under another configuration
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._epoch: Optional[int] = None  # the epoch last frozen or resumed (main process)
        self._iter_epoch: Optional[int] = None  # the epoch this copy is iterating (workers)
        self._iter_mask: Optional[EpochMask] = None  # and its mask (None: all data, weight 1)
        self._kept_sizes: dict[int, int] = {}

    @property
    def groups(self) -> Optional[NDArray[np.integer]]:
        """One integer per sample (e.g. its class), or None; settable before ``start_epoch``."""
        return self._groups

    @groups.setter
    def groups(self, groups: Any) -> None:
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (self.num_samples,) or not np.issubdtype(groups.dtype, np.integer):
                raise ValueError(f"groups has shape {groups.shape} and dtype {groups.dtype}: expected "
                                 f"({self.num_samples},) integers, one group per sample")
        self._groups = groups

    # ---- the pruning hooks into upstream -------------------------------------------------------
    def resample_streams(self, epoch: int, stream_id: Optional[int] = None
                         ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        units, ids = super().resample_streams(epoch, stream_id)
        mask = self._mask_for(epoch)
        if mask is None:
            return units, ids
        keep = mask.keeps(ids)
        owner = np.repeat(np.arange(len(units)), units)
        kept_units = np.bincount(owner[keep], minlength=len(units))
        units, ids = kept_units[kept_units > 0].astype(np.int64), ids[keep]
        if stream_id is None:
            self.epoch_size = len(ids)  # what random batching partitions over
        return units, ids

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Runs at the start of every epoch in every worker: resolve the epoch's mask once here,
        # as a persistent worker may have to read it from disk.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._iter_epoch = epoch
        self._iter_mask = self._mask_for(epoch, strict=False)
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        mask = self._iter_mask if self._iter_epoch is not None else self.table.masks.get(self._epoch)
        sample["ted_id"] = int(sample_id)
        sample["ted_weight"] = float(mask.weights([sample_id])[0]) if mask is not None else 1.0
        return sample

    def _mask_for(self, epoch: int, strict: bool = True) -> Optional[EpochMask]:
        """The frozen mask of ``epoch``; None means all data."""
        mask = self.table.masks.get(epoch)
        if mask is None and os.path.exists(self.table_path):
            # A persistent DataLoader worker holds a copy made before start_epoch: read the
            # masks that start_epoch persisted.
            self.table.masks.update(ScoreTable.load(self.table_path, self.table.fingerprint).masks)
            mask = self.table.masks.get(epoch)
        if mask is None and strict and pruned_fraction(self.ted, epoch) > 0:
            raise RuntimeError(f"epoch {epoch} prunes {pruned_fraction(self.ted, epoch):.0%} of the data "
                               f"but has no frozen keep-mask: call start_epoch({epoch}) on every rank "
                               "before iterating it")
        return mask

    # ---- public API --------------------------------------------------------------------------
    def record(self, ids: Any, scores: Any) -> None:
        """Fold per-sample scores into the table (ids are the ``ted_id`` of the batch).

        Under torch.distributed each rank records its own samples; ``sync`` (called by
        ``start_epoch``) merges them so every rank holds the same table.
        """
        ids, scores = self.table.checked(_to_numpy(ids), _to_numpy(scores))
        if dist.active():
            self._pending.append((ids, scores))
        else:
            self.table.record(ids, scores)

    def sync(self) -> None:
        """Merge every rank's recorded scores into every rank's table (collective)."""
        if not dist.active():
            return
        ids = np.concatenate([p[0] for p in self._pending]) if self._pending else np.empty(0, np.int64)
        vals = np.concatenate([p[1] for p in self._pending]) if self._pending else np.empty(0, np.float32)
        self._pending = []
        for rank_ids, rank_vals in dist.all_gather_records(ids, vals):
            self.table.record(rank_ids, rank_vals)

    def start_epoch(self, epoch: int) -> EpochMask:
        """Freeze the keep-mask of ``epoch`` (collective under torch.distributed).

        Rank 0 computes it from its table snapshot and broadcasts it, so every rank and node
        holds the bit-identical mask. An epoch already frozen (a resumed run) keeps its mask.
        The table, mask included, is persisted by each node's local leader.
        """
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"start_epoch: epoch={epoch!r} is invalid: expected an integer >= 0")
        epoch = int(epoch)
        self.sync()
        self.table.epoch = epoch
        mask = self.table.masks.get(epoch)
        if mask is None and dist.rank() == 0:
            mask = select(self.ted, self.table, epoch, self._granule(), self.groups)
        if dist.active():
            mask = self._broadcast_mask(epoch, mask)
        self.table.masks[epoch] = mask
        self._epoch = epoch
        self.save_table()  # nothing left to merge: sync above
        logger.info("epoch %d: keeping %d of %d samples", epoch, mask.kept, self.table.num_samples)
        return mask

    def save_table(self) -> None:
        """Merge every rank's scores and persist the table atomically (collective under
        torch.distributed: call it on every rank, e.g. when checkpointing; each node's local
        leader writes)."""
        self.sync()
        if self._unique_rank_world.rank_of_node == 0:
            self.table.save(self.table_path)

    def kept_ids(self, epoch: int) -> NDArray[np.int64]:
        """Global ids of the samples kept in a frozen ``epoch``."""
        mask = self._mask_for(epoch, strict=False)
        if mask is None:
            raise KeyError(f"epoch {epoch} has no frozen keep-mask (frozen: {sorted(self.table.masks)})")
        return np.flatnonzero(np.unpackbits(mask.keep, bitorder="little", count=mask.num_samples))

    def __len__(self) -> int:
        """Samples per rank in the current epoch (the last frozen or resumed one)."""
        epoch = self._epoch if self._epoch is not None else self.next_epoch
        if epoch not in self._kept_sizes:
            # The main process holds every mask it froze or resumed: no disk read on this hot path.
            if epoch not in self.table.masks:
                return self.length
            self._kept_sizes[epoch] = len(self.resample_streams(epoch)[1])
        return ceil(self._kept_sizes[epoch] / self._parallel_rank_world.num_ranks)

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        state = super().state_dict(num_samples, from_beginning)
        mask = self.table.masks.get(state["epoch"])
        state["ted"] = {"fingerprint": self.table.fingerprint["digest"], "epoch": state["epoch"],
                        "mask_crc": None if mask is None else mask.crc}
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        obj = dict(obj)
        ted = obj.pop("ted", None)
        if ted is not None:
            if ted["fingerprint"] != self.table.fingerprint["digest"]:
                raise ValueError(f"checkpoint was taken on dataset {ted['fingerprint'][:12]}, "
                                 f"this dataset is {self.table.fingerprint['digest'][:12]}")
            mask = self.table.masks.get(ted["epoch"])
            crc = None if mask is None else mask.crc
            if ted["mask_crc"] is not None and crc != ted["mask_crc"]:
                found = "no mask" if mask is None else f"mask CRC {crc:#010x}"
                raise ValueError(f"cannot resume epoch {ted['epoch']}: the checkpoint's keep-mask has "
                                 f"CRC {ted['mask_crc']:#010x} but the table at {self.table_path} holds "
                                 f"{found}; resume with the table saved alongside the checkpoint")
            self._epoch = ted["epoch"]
        super().load_state_dict(obj)

    # ---- helpers -----------------------------------------------------------------------------
    def _granule(self) -> int:
        return self._parallel_rank_world.num_ranks * (self.batch_size or 1)

    def _broadcast_mask(self, epoch: int, mask: Optional[EpochMask]) -> EpochMask:
        n = self.table.num_samples
        if dist.rank() == 0:
            boost = mask.boost if mask.boost is not None else np.empty(0, np.uint8)
            weight = np.frombuffer(np.float64(mask.boost_weight).tobytes(), np.uint8)
            payload = np.concatenate([mask.keep, boost, weight])
        else:
            payload = None
        data = dist.broadcast_bytes(payload)
        nbits = (n + 7) // 8
        boost = data[nbits:-8] if len(data) - 8 > nbits else None
        return EpochMask(epoch, data[:nbits].copy(), None if boost is None else boost.copy(),
                         float(np.frombuffer(data[-8:].tobytes(), np.float64)[0]), n)


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
