"""TEDStreamingDataset: mosaicml-streaming's StreamingDataset that skips pruned samples.

The filter sits in ``resample_streams``, the one place every batching method asks which samples
make up an epoch, so upstream partitioning, shuffling, padding and mid-epoch resumption run
unchanged on the kept samples. An epoch with nothing to skip returns upstream's arrays untouched:
the dataset then yields exactly what ``StreamingDataset`` yields.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from math import ceil
from typing import Any, Optional, Union

import numpy as np
import torch
from numpy.typing import NDArray
from streaming import StreamingDataLoader, StreamingDataset
from torch.utils.data import get_worker_info

from .. import dist
from .. import filter as sample_filters
from ..config import TEDConfig
from ..fingerprint import index_fingerprint
from ..mask import EpochMask, pack, unpack
from ..policy import PruningWarning, select, select_within
from ..pruner import HasPruner, Pruner, as_config
from ..schedule import pruned_fraction
from ..source import ID_KEY, WEIGHT_KEY, add_ted_keys
from ..table import FILENAME, ScoreTable
from . import remote
from .upstream import ShardError, UpstreamDataset, epoch_start_state

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _local_world_size_from_deepspeed() -> Iterator[None]:
    # The deepspeed launcher sets LOCAL_SIZE only; streaming counts nodes from LOCAL_WORLD_SIZE
    # and, without it, takes every rank for a node of its own (streaming issue 717). Streaming
    # reads it once, when the dataset detects its World: set it for that moment only, so no
    # other code of the process (a plain StreamingDataset built later) sees a changed environment.
    if "LOCAL_WORLD_SIZE" in os.environ or "LOCAL_SIZE" not in os.environ:
        yield
        return
    os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    try:
        yield
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]


_PREFIX_RETRIES = 8


def _init_upstream(ds: StreamingDataset, kwargs: dict[str, Any]) -> None:
    """``StreamingDataset.__init__``, retried when another job on this machine registered the same
    shared-memory prefix between streaming's check and its create (upstream's race: two datasets
    built at the same moment both see prefix N free). Only a single process can simply retry: in
    a distributed job the ranks would leave streaming's barriers out of step."""
    for attempt in range(_PREFIX_RETRIES + 1):
        try:
            StreamingDataset.__init__(ds, **kwargs)
            return
        except FileExistsError as err:
            if not str(err).rstrip("'").endswith("_locals"):
                raise
            if dist.active() or attempt == _PREFIX_RETRIES:
                raise RuntimeError(
                    f"streaming's shared-memory prefix {err.filename} was taken by another job "
                    "that started at the same moment on this machine (a race inside "
                    "mosaicml-streaming); start this job again"
                ) from err
            time.sleep(random.SystemRandom().uniform(0.05, 0.5))  # jitter, without touching the global seed


class TEDStreamingDataset(HasPruner, UpstreamDataset):
    """A ``StreamingDataset`` whose epochs skip the samples the TED policy prunes.

    Takes every ``StreamingDataset`` keyword argument, plus:
        ted: a ``TEDConfig`` (or a mapping of its fields); default ``TEDConfig()``.
        table_dir: folder of the score table, used as given; default: see ``table_home``
            (beside the first stream's ``index.json``, mirrored to its ``remote`` if any).
        groups: optional, one integer per sample in global sample-id order (e.g. the class
            label): the ``ted`` policy then prunes the same fraction of every group. It must be
            the same on every rank.
        sample_filter: optional static filter applied to every epoch: a keep-list of global
            sample ids, or a predicate ``fn(sample) -> bool`` evaluated once (cached beside the
            table). Pruning then acts on the samples it keeps.
        implicit_pruning: whether an epoch without ``start_epoch`` is pruned from the table file
            (the scores an earlier run or another process saved there); default True, and
            logged once per epoch with what it prunes and why, so the table is opened (and
            fetched from a remote) at construction. False iterates such epochs whole and opens
            the table only when the loop first needs it (``start_epoch``, ``record``, ``save_table``,
            ``load_table``, a checkpoint's state): until then no folder is created and nothing
            is downloaded.
        ted_keys: when samples gain ``ted_id`` (the global sample id, the key for ``record``) and
            ``ted_weight`` (the loss weight this epoch: 1 unless the policy rescales). ``"auto"``
            (default): once the loop has called ``start_epoch``, so a loop that never heard of TED
            gets upstream's samples unchanged (``model(**batch)`` keeps working); ``"always"``;
            ``"never"``. A shard column of either name is refused (ValueError) when they are added.
    """

    def __init__(
        self,
        *,
        ted: Union[TEDConfig, Mapping[str, Any], None] = None,
        table_dir: Optional[str] = None,
        groups: Any = None,
        sample_filter: Optional[sample_filters.SampleFilter] = None,
        implicit_pruning: bool = True,
        ted_keys: str = "auto",
        **kwargs: Any,
    ) -> None:
        ted = as_config(ted)
        if not isinstance(implicit_pruning, bool):
            raise ValueError(f"implicit_pruning={implicit_pruning!r} is invalid: expected True or False")
        if ted_keys not in TED_KEYS:
            raise ValueError(f"ted_keys={ted_keys!r} is invalid: expected one of {', '.join(TED_KEYS)}")
        self._implicit_pruning = implicit_pruning
        self._ted_keys = ted_keys
        self._loop_started = False  # start_epoch was called: a TED loop, which reads ted_id
        with _local_world_size_from_deepspeed():
            _init_upstream(self, kwargs)
        self.ted = ted
        self.groups = groups
        self._epoch_size_all = self.epoch_size  # upstream's, restored for epochs that keep all
        index_dirs = [os.path.join(s.local, s.split or "") for s in self.streams]
        self._fingerprint = index_fingerprint(index_dirs)
        self._table_remote: Optional[str] = None
        if table_dir is None:
            table_dir, self._table_remote = remote.table_home(self.streams, self._fingerprint["digest"])
        self._table_path = os.path.join(table_dir, FILENAME)
        self._download_timeout = kwargs.get("download_timeout", 60.0)
        self._pruner: Optional[Pruner] = None
        if implicit_pruning or sample_filter is not None:  # every rank reads the table from the start
            self._open_table()
        self._filter: Optional[EpochMask] = None  # static keep bits (epoch -1: every epoch)
        if sample_filter is not None:
            self._filter = EpochMask.from_bools(-1, self._resolve_filter(sample_filter, table_dir))
            if self._filter.kept == 0:
                raise ValueError(
                    f"sample_filter={sample_filter!r} keeps none of the {self.num_samples} "
                    "samples: expected a filter that keeps at least one"
                )
        self._epoch: Optional[int] = None  # the epoch last frozen or resumed (main process)
        self._iter_epoch: Optional[int] = None  # the epoch this copy is iterating (workers)
        self._iter_mask: Optional[EpochMask] = None  # and its mask (None: all data, weight 1)
        self._implicit: dict[int, EpochMask] = {}  # epochs frozen without start_epoch, from the file
        self._run_granule: Optional[int] = None  # the granule of the run a checkpoint came from
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
                raise ValueError(
                    f"groups has shape {groups.shape} and dtype {groups.dtype}: expected "
                    f"({self.num_samples},) integers, one group per sample"
                )
        self._groups = groups

    # ---- the pruning hooks into upstream -------------------------------------------------------
    def resample_streams(
        self, epoch: int, stream_id: Optional[int] = None
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        units, ids = super().resample_streams(epoch, stream_id)
        # generate_work calls this once per stream: reuse the mask resolved for this epoch.
        mask = self._iter_mask if epoch == self._iter_epoch else self._mask_for(epoch)
        if mask is None and self._filter is None:
            if stream_id is None:
                self.epoch_size = self._epoch_size_all
            return units, ids  # upstream's arrays, untouched: the drop-in case
        keep = np.ones(len(ids), bool)
        for m in (mask, self._filter):
            if m is not None:
                keep &= m.keeps(ids)
        owner = np.repeat(np.arange(len(units)), units)
        kept_units = np.bincount(owner[keep], minlength=len(units))
        units, ids = kept_units[kept_units > 0].astype(np.int64), ids[keep]
        if stream_id is None:
            self.epoch_size = len(ids)  # what random batching partitions over
        return units, ids

    def epoch_begins(self, epoch: int) -> None:
        # Every worker resolves the epoch's mask before a single sample of it is consumed (a
        # persistent worker reads it from disk).
        self._iter_epoch = epoch
        self._iter_mask = self._mask_for(epoch)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        try:
            sample = super().get_item(sample_id, retry)
        except ShardError:
            raise
        except Exception as err:  # a damaged shard file already in the cache fails here, unnamed
            if not 0 <= sample_id < self.num_samples:  # a bad index: upstream's own error says so
                raise
            raise ShardError(
                f"sample {sample_id} of shard {self._shard_name(sample_id)} could not be read "
                f"({type(err).__name__}: {err}): expected a complete shard as written (is its "
                "decompressed file in the local cache damaged or truncated? delete it to fetch it again)"
            ) from err
        if self._ted_keys == "never" or (self._ted_keys == "auto" and not self._loop_started):
            return sample  # upstream's sample, untouched
        if self._iter_epoch is not None:
            mask = self._iter_mask
        else:
            mask = None if self._epoch is None else self.table.masks.get(self._epoch)
        weight = 1.0 if mask is None or not mask.reweights else mask.weight_of(sample_id)
        sample = add_ted_keys(sample, int(sample_id), weight)
        if get_worker_info() is not None:  # in a DataLoader worker: see _WorkerSample
            sample = _WorkerSample(sample)
        return sample

    def _mask_for(self, epoch: int) -> Optional[EpochMask]:
        """The keep-mask of ``epoch``; None means all data. Never raises for a missing mask.

        In order: the mask frozen by ``start_epoch`` (in memory, or in the table file for a
        persistent worker whose copy predates it); else, for an epoch the schedule prunes, the
        mask frozen implicitly from the table *file*: every rank and worker reads the same file
        (it changes only in ``save_table``/``start_epoch``, which persist this mask first), so
        they all compute the same mask, without a collective. A file with no scores prunes nothing.
        A table not opened yet (``implicit_pruning=False``, no TED call so far) has frozen nothing.
        """
        if self._pruner is None:
            return None
        mask = self.table.masks.get(epoch)
        if mask is not None:
            return mask
        disk = self.pruner.load_file()
        if disk is None:
            return None
        mask = self.table.masks.get(epoch, self._implicit.get(epoch))
        if mask is None and self._implicit_pruning and pruned_fraction(self.ted, epoch) > 0 and disk.scored.any():
            mask = self._implicit[epoch] = self._select(disk, epoch)
            if get_worker_info() is None and mask.kept < self.num_samples:  # once per epoch, not per worker
                logger.warning(
                    "epoch %d: pruning %d of %d samples without start_epoch(%d): the score table %s holds "
                    "scores (%d samples scored), so the %s policy prunes this epoch from them. Pass "
                    "implicit_pruning=False to iterate such epochs whole, or give this run another table_dir",
                    epoch,
                    self.num_samples - mask.kept,
                    self.num_samples,
                    epoch,
                    self.table_path,
                    int(np.count_nonzero(disk.scored)),
                    self.ted.policy,
                )
        return mask

    def _select(self, table: ScoreTable, epoch: int) -> EpochMask:
        """The policy's mask; with a filter, the policy sees only the samples the filter keeps."""
        # Each shard's first sample id: the blocks of TEDConfig.block="shard".
        shards = np.cumsum(self.samples_per_shard) - self.samples_per_shard
        if self._filter is None:
            return select(self.ted, table, epoch, self._granule(), self.groups, shards)
        ids = np.flatnonzero(self._filter.bools())
        return select_within(self.ted, table, epoch, ids, self._granule(), self.groups, shards)

    # ---- where the table lives -----------------------------------------------------------------
    @property
    def pruner(self) -> Pruner:
        """The table's scores, masks and persistence, opened on first use (a collective under
        torch.distributed: every rank reaches it through the same call)."""
        if self._pruner is None:
            self._open_table()
        assert self._pruner is not None
        return self._pruner

    @pruner.setter
    def pruner(self, pruner: Pruner) -> None:
        self._pruner = pruner

    @property
    def table_path(self) -> str:
        return self._table_path

    def _open_table(self) -> None:
        # The durable remote copy, if any, wins over a local cache that may be stale or gone.
        if self._table_remote is not None:
            # uuid, not pid: pids repeat across the containers of a multi-node job
            remote.download_table(
                self._table_remote, self._table_path, self._fingerprint, self._download_timeout, uuid.uuid4().hex
            )
        # The node's copy is written by the local leader as streaming counts nodes (LOCAL_WORLD_SIZE).
        self._pruner = Pruner(self._table_path, self._fingerprint, self.ted, leader=self.node_leader)

    def _push_table(self) -> None:
        if self._table_remote is not None and self.global_rank == 0:
            remote.upload_table(self.table_path, self._table_remote)

    def _resolve_filter(self, spec: sample_filters.SampleFilter, table_dir: str) -> NDArray[np.bool_]:
        if not callable(spec):
            return sample_filters.keep_from_ids(spec, self.num_samples)
        path = sample_filters.cache_path(
            table_dir, self._fingerprint["digest"], sample_filters.predicate_identity(spec)
        )
        keep = None
        if dist.rank() == 0:
            keep = sample_filters.load_cached(path, self.num_samples)
            if keep is None:
                keep = sample_filters.evaluate(spec, self.num_samples, super().get_item)
        if dist.active():  # rank 0 evaluated it: every rank gets the same bits
            keep = unpack(dist.broadcast_bytes(None if keep is None else pack(keep)), self.num_samples)
        assert keep is not None  # rank 0 evaluated or loaded it, and every other rank received it
        if self.local_leader and not os.path.exists(path):
            sample_filters.save_cached(path, keep)
        return keep

    # ---- public API --------------------------------------------------------------------------
    def record(self, ids: Any, scores: Any) -> None:
        """Fold per-sample scores into the table (ids are the ``ted_id`` of the batch).

        Under torch.distributed each rank records its own samples; ``sync`` (called by
        ``start_epoch``) merges them so every rank holds the same table.
        """
        self.pruner.record(ids, scores)

    def sync(self) -> None:
        """Merge every rank's recorded scores into every rank's table (collective)."""
        self.pruner.sync()

    def upcoming_epoch(self) -> int:
        """The epoch streaming iterates next: its epoch counter, or a loaded checkpoint's epoch."""
        return self.resumed_epoch(self.next_epoch)

    def start_epoch(self, epoch: int) -> EpochMask:
        """Freeze the keep-mask of ``epoch`` (collective under torch.distributed).

        ``epoch`` must be the epoch streaming iterates next (``upcoming_epoch()``).
        Rank 0 computes the mask from its table snapshot and broadcasts it, so every rank and
        node holds the bit-identical mask. An epoch already frozen (a resumed run) keeps its mask.
        The table, mask included, is persisted by each node's local leader.
        """
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"start_epoch: epoch={epoch!r} is invalid: expected an integer >= 0")
        epoch = int(epoch)
        expected = self.upcoming_epoch()
        if epoch != expected:
            # A mask frozen for another epoch than the one iterated prunes the wrong samples
            # (and len() disagrees with what the loader yields).
            raise ValueError(
                f"start_epoch({epoch}) does not match the epoch streaming iterates next, "
                f"{expected}: epochs count from 0 and advance once per pass over the loader "
                f"(a loaded checkpoint resumes its own epoch); call start_epoch({expected})"
            )
        self._persist_current_mask(before=epoch)  # the epoch just iterated; before the collective
        mask = self.pruner.freeze(epoch, self._select)  # merges, selects, broadcasts, saves
        self._implicit.pop(epoch, None)
        self._kept_sizes.pop(epoch, None)  # with a filter, len() may have counted it unfrozen
        self._iter_epoch = None  # a resumed epoch may have been resolved before this freeze
        self._epoch = epoch
        self._loop_started = True
        self._push_table()
        logger.info("epoch %d: keeping %d of %d samples", epoch, mask.kept, self.table.num_samples)
        return mask

    def load_table(self, path: str) -> None:
        """Replace the table by the one at ``path``, e.g. the copy saved alongside a checkpoint
        (the live table may be ahead of it: resuming with it would count later scores twice).

        Each node's local leader copies it over the dataset's table file, then every rank reads
        that file. Scores recorded and not yet saved are dropped, and the masks and lengths cached
        from the replaced table are forgotten. A collective under torch.distributed; call it
        before iterating and before ``load_state_dict``.
        """
        self.pruner.replace(path)
        self._implicit.clear()
        self._kept_sizes.clear()
        self._iter_epoch, self._iter_mask = None, None

    def save_table(self) -> None:
        """Merge every rank's scores and persist the table atomically (collective under
        torch.distributed: call it on every rank, e.g. when checkpointing; each node's local
        leader writes; global rank 0 uploads it to the remote home, if any)."""
        self._persist_current_mask()  # before the collective: no rank reads the file after a write
        self.pruner.save()
        self._push_table()

    def _persist_current_mask(self, before: Optional[int] = None) -> None:
        # The epoch in progress (or just iterated) may have been frozen implicitly from the file
        # about to be overwritten: record its mask (all-keep where that froze nothing) so that it
        # survives. `before`: start_epoch's epoch, which it freezes itself.
        epoch = self.resumed_epoch(self.next_epoch - 1)
        if (
            epoch < 0
            or (before is not None and epoch >= before)
            or epoch in self.table.masks
            or pruned_fraction(self.ted, epoch) == 0
        ):
            return
        mask = self._mask_for(epoch)
        if mask is None:  # refused (implicit_pruning=False), or nothing was scored when the epoch began
            count = self.num_samples if self._filter is None else self._filter.kept
            requested = round(pruned_fraction(self.ted, epoch) * count)
            if self._implicit_pruning:
                warnings.warn(
                    f"epoch {epoch} was iterated without start_epoch({epoch}) while the table file "
                    f"held no scores, so it pruned none of the {requested} samples the schedule asks "
                    "for; persist recorded scores with save_table() (or call start_epoch) before "
                    "an epoch begins",
                    PruningWarning,
                    stacklevel=3,
                )
            mask = EpochMask.everything(epoch, self.num_samples, requested)
        self.table.masks[epoch] = mask

    def kept_ids(self, epoch: int) -> NDArray[np.int64]:
        """Global ids of the samples kept in ``epoch`` (static filter included)."""
        mask = self._mask_for(epoch)
        if mask is None and self._filter is None:
            raise KeyError(f"epoch {epoch} has no frozen keep-mask (frozen: {sorted(self.table.masks)})")
        keep = np.ones(self.num_samples, bool)
        for m in (mask, self._filter):
            if m is not None:
                keep &= m.bools()
        return np.flatnonzero(keep)

    def __len__(self) -> int:
        """Samples per rank in the current epoch (the last frozen or resumed one); upstream's
        length while nothing is skipped."""
        return self.rank_samples(self._epoch if self._epoch is not None else self.next_epoch)

    def rank_samples(self, epoch: int) -> int:
        """Samples per rank in ``epoch`` (its frozen mask, or the one it will be pruned by without
        ``start_epoch``); upstream's length while it skips nothing."""
        if epoch in self._kept_sizes:  # len() is asked often: read the table file once per epoch
            return ceil(self._kept_sizes[epoch] / self.num_ranks)
        if self._filter is None and (self._pruner is None or epoch not in self.table.masks):
            implicit = self._implicit_pruning and pruned_fraction(self.ted, epoch) > 0
            if not implicit or self._mask_for(epoch) is None:  # the drop-in case reads no file
                return self.length
        if epoch not in self._kept_sizes:
            self._kept_sizes[epoch] = len(self.resample_streams(epoch)[1])
        return ceil(self._kept_sizes[epoch] / self.num_ranks)

    @property
    def unpruned_rank_samples(self) -> int:
        """Upstream's per-rank length: this rank's samples in an epoch that skips nothing."""
        return self.length

    @property
    def loader_class(self) -> type:
        """streaming's ``StreamingDataLoader``, which saves and restores the position in the epoch."""
        return StreamingDataLoader

    def next_epoch_state(self, state: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The loader's ``state`` moved to the start of ``epoch``, whose mask is not frozen yet: for
        a checkpoint taken at the end of the epoch before, in loops that stop on an empty epoch."""
        return dict(epoch_start_state(state, epoch), ted=dict(state["ted"], epoch=epoch, mask_crc=None))

    def check_world(self, rank: int, world_size: int) -> None:
        """Nothing to check: streaming detects its ranks from the launcher's environment, as the
        trainer does, when the dataset is built."""

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        state = super().state_dict(num_samples, from_beginning)
        mask = self._mask_for(state["epoch"]) if state["epoch"] >= 0 else None
        state["ted"] = {
            "fingerprint": self._fingerprint["digest"],
            "epoch": state["epoch"],
            "mask_crc": None if mask is None else mask.crc,
            "granule": self._granule(),
        }
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        obj = dict(obj)
        ted = obj.pop("ted", None)
        if ted is not None:
            if self._pruner is None:  # a TED loop's checkpoint: its mask is checked against the table
                self._open_table()
            if ted["fingerprint"] != self._fingerprint["digest"]:
                raise ValueError(
                    f"checkpoint was taken on dataset {ted['fingerprint'][:12]}, "
                    f"this dataset is {self._fingerprint['digest'][:12]}"
                )
            mask = self._mask_for(ted["epoch"]) if ted["epoch"] >= 0 else None
            crc = None if mask is None else mask.crc
            if ted["mask_crc"] is not None and crc != ted["mask_crc"]:
                found = "no mask" if mask is None else f"mask CRC {crc:#010x}"
                raise ValueError(
                    f"cannot resume epoch {ted['epoch']}: the checkpoint's keep-mask has "
                    f"CRC {ted['mask_crc']:#010x} but the table at {self.table_path} holds "
                    f"{found}; resume with the table saved alongside the checkpoint"
                )
            self._epoch = ted["epoch"]
            # Elastic resume: later masks keep the rounding of the run that started, so they are
            # the masks an uninterrupted run would freeze, whatever the new number of ranks.
            self._run_granule = ted.get("granule")
        super().load_state_dict(obj)

    # ---- helpers -----------------------------------------------------------------------------
    def _granule(self) -> int:
        if self._run_granule is not None:
            return self._run_granule
        return self.num_ranks * (self.batch_size or 1)


TED_KEYS = ("auto", "always", "never")  # the values of ted_keys


class _WorkerSample(dict):
    """A sample read in a DataLoader worker; unpickled (in the main process) it is a plain dict.

    torch's ``default_collate`` builds a batch of these as a copy of the first sample, so the batch
    is one too. The worker pickles the batch to the main process, and torch moves *every* tensor
    in it through a shared-memory segment of its own whose file descriptor the main process
    fetches over a fresh authenticated socket connection to the worker: about 0.3-1 ms per tensor,
    whatever its size. The two small tensors the loader adds (``ted_id``, ``ted_weight``: 16 bytes
    per sample) would double or triple that per-batch cost (20-40 us per sample at batch 64, 2
    workers); here they travel as bytes inside the pickle instead and are rebuilt as the same
    tensors (same dtype, shape and values, in ordinary memory). Other keys are untouched.
    """

    __slots__ = ()

    def __copy__(self) -> _WorkerSample:
        return _WorkerSample(self)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        plain, packed = dict(self), []
        for key in (ID_KEY, WEIGHT_KEY):
            value = plain.get(key)
            if (
                type(value) is torch.Tensor
                and value.device.type == "cpu"
                and value.layout == torch.strided
                and not value.requires_grad
                and value.dtype in _NUMPY_DTYPES
            ):
                array = value.numpy()
                plain[key] = (array.tobytes(), array.dtype.str, array.shape)
                packed.append(key)
        return _plain_sample, (plain, tuple(packed))


_NUMPY_DTYPES = (torch.int64, torch.int32, torch.float64, torch.float32)


def _plain_sample(plain: dict[str, Any], packed: tuple[str, ...]) -> dict[str, Any]:
    for key in packed:
        data, dtype, shape = plain[key]
        plain[key] = torch.from_numpy(np.frombuffer(bytearray(data), dtype=dtype).reshape(shape))
    return plain
