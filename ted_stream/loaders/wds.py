"""TEDWebDataset: TED pruning over WebDataset tar shards, without rewriting or converting them.

Two ways to read the same indexed shards (``ted-stream index``), one score table and one mask:

* the exact path: a map-style dataset with random access by sample id (one ``pread`` of the
  sample's byte span; pruned samples are never read) and ``sampler``, which deals each epoch's
  kept ids over ranks, shuffled by (seed, epoch), every rank padded to the same count with kept ids
  only; DataLoader workers fetch whole batches of that order, in order, so a checkpoint resumes
  exactly mid-epoch;
  ``TEDWebLoader`` is that DataLoader with its position, saved and restored like mosaicml-streaming's
  ``StreamingDataLoader`` (what ``TEDProtocol``, ``launch/train_llm.py`` and the Trainer integration use);
* the streaming path: ``wds_shards()`` and ``wds_select()``, stages of a webdataset pipeline that
  deal the shards over ranks x workers and drop the pruned samples by id before decoding. Tar
  shards are read front to back there, so pruned samples' bytes are still read (not decoded),
  unless ``wds_read()`` replaces ``tarfile_to_samples()`` (local shards: only kept spans are read);
  every worker of every rank yields the same count (the largest share, padded with its own kept
  samples), so every rank gets the same number of batches.

Why not webdataset's ``wids`` for the exact path: webdataset 1.0.2 no longer ships it (it moved to
its own package), and the manifest already holds each sample's byte span, so a reader is a
``pread`` plus a tar-header check: no second index format, no extra dependency.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from math import ceil
from typing import Any, Optional, Union

import numpy as np
import torch.distributed
import torch.utils.data

from .. import dist
from ..config import TEDConfig
from ..policy import select
from ..pruner import HasPruner, Pruner, as_config
from ..source import add_ted_keys
from ..table import FILENAME, EpochMask
from .wds_index import CorruptSample, ManifestError, Shards, WdsIndex
from .wds_state import KEEP, keep_snapshot, snapshot_name, table_digest
from .wds_stream import report, stream_stats

STATE_FORMAT = "ted_stream/wds-state"
_SUBSTITUTES = 16  # kept samples tried in place of a corrupt one before giving up


class CorruptSampleWarning(UserWarning):
    """A sample could not be read or decoded; it was replaced by another kept sample."""


class TEDWebDataset(HasPruner, torch.utils.data.Dataset):
    """Pruned, exactly resumable access to indexed WebDataset tar shards.

    Args:
        shards: the indexed shards: a brace pattern (``data/shard-{000000..000009}.tar``), a list
            of paths, or their folder; checked against the manifest (ManifestError names a shard
            added, removed or changed since indexing).
        ted: a ``TEDConfig`` (or a mapping of its fields); default ``TEDConfig()``.
        table_dir: folder of the score table; default ``<shard folder>/ted``.
        decode: ``fn(raw_sample) -> sample`` on the exact path (e.g. ``webdataset.autodecode.Decoder``);
            default: raw bytes per field. A sample it fails on is reported like a corrupt one.
        batch_size: per-rank batch size; the kept count is rounded up to ranks x batch_size so
            that ranks rarely need padding.
        shuffle, seed: the epoch order is a permutation by (seed, epoch), else sample-id order.
        rank, world_size: default: torch.distributed's, or 0 and 1.
        groups: one integer per sample (e.g. its class): class-balanced ``ted`` selection.
        rehash: check every shard's SHA-256 at open, not only those whose mtime changed.
    """

    def __init__(
        self,
        shards: Shards,
        *,
        ted: Union[TEDConfig, Mapping[str, Any], None] = None,
        table_dir: Optional[str] = None,
        decode: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        groups: Optional[Sequence[int]] = None,
        rehash: bool = False,
    ):
        self._files: dict[str, Any] = {}  # open shard files of this process (first: __del__ closes them)
        self.index = WdsIndex.open(shards, rehash=rehash)
        self.ted = as_config(ted)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
        if world_size is None:
            world_size = torch.distributed.get_world_size() if dist.active() else 1
        self.world_size = world_size
        self.rank = dist.rank() if rank is None else rank
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is invalid: expected 0 <= rank < world_size={self.world_size}")
        self.pruner = Pruner(
            os.path.join(table_dir or os.path.join(self.index.folder, "ted"), FILENAME),
            self.index.fingerprint,
            self.ted,
        )
        n = self.index.num_samples
        self.groups = None if groups is None else np.asarray(groups)
        if self.groups is not None and (self.groups.shape != (n,) or not np.issubdtype(self.groups.dtype, np.integer)):
            raise ValueError(
                f"groups has shape {self.groups.shape} and dtype {self.groups.dtype}: expected ({n},) "
                "integers, one group per sample"
            )
        self.decode, self.batch_size, self.shuffle, self.seed = decode, batch_size, shuffle, seed
        self._epoch: Optional[int] = None  # the epoch last frozen (or resumed)
        self._resume: Optional[tuple[int, int]] = None  # (epoch, samples this rank already consumed)
        self._served: Optional[int] = None  # the epoch the sampler last began to serve
        self._order: dict[int, np.ndarray] = {}  # the last epoch asked for -> this rank's ids, in order
        self._reported: Optional[int] = None  # the epoch whose streaming figures this process reported

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files stay with their process (spawned workers reopen)
        return state

    @property
    def num_samples(self) -> int:
        return self.index.num_samples

    def start_epoch(self, epoch: int) -> EpochMask:
        """Freeze the keep-mask of ``epoch`` (collective under torch.distributed: rank 0 runs the
        policy, every rank receives the same bits; the table is persisted) and make it the epoch
        the sampler and the pipeline stages serve. A frozen epoch keeps its mask (resume)."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"start_epoch: epoch={epoch!r} is invalid: expected an integer >= 0")
        granule = self.world_size * self.batch_size
        shards = np.asarray(self.index.starts[:-1])  # each shard's first sample id: block="shard"
        mask = self.pruner.freeze(int(epoch), lambda table, e: select(self.ted, table, e, granule, self.groups, shards))
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # a checkpoint of another epoch says nothing about this one
        self._epoch = int(epoch)
        return mask

    def upcoming_epoch(self) -> int:
        """The epoch the sampler serves next: a loaded checkpoint's epoch until it is served, else
        the one after the epoch last served (0 at first)."""
        if self._resume is not None:
            return self._resume[0]
        return 0 if self._served is None else self._served + 1

    def load_table(self, path: str) -> None:
        """Replace the table by the one at ``path`` (a checkpoint's copy: the live table may be
        ahead of it). A collective under torch.distributed; call it before ``load_state_dict``."""
        self.pruner.replace(path)
        self._order = {}

    def record(self, ids: Any, scores: Any) -> None:
        """Fold per-sample scores (keyed by the batch's ``ted_id``) into the table."""
        self.pruner.record(ids, scores)

    def save_table(self) -> None:
        """Merge every rank's scores and persist the table (collective: call on every rank)."""
        self.pruner.save()

    def kept_ids(self, epoch: int) -> np.ndarray:
        """Sorted global ids kept in ``epoch``; KeyError if it was never frozen."""
        return np.flatnonzero(self._keep_bools(epoch))

    def _mask(self, epoch: int) -> EpochMask:
        mask = self.pruner.mask(epoch)
        if mask is None:
            raise KeyError(
                f"epoch {epoch} has no frozen keep-mask (frozen: {sorted(self.table.masks)}): "
                f"call start_epoch({epoch}) before reading it"
            )
        return mask

    def _weight(self, epoch: int, sample_id: int) -> float:
        return self._mask(epoch).weight_of(sample_id)

    def _keep_bools(self, epoch: int) -> np.ndarray:
        return self._mask(epoch).bools()

    def _current_epoch(self) -> int:
        if self._epoch is None:
            raise RuntimeError(
                "no epoch started: call start_epoch(epoch) before iterating (every epoch, "
                "like DistributedSampler.set_epoch)"
            )
        return self._epoch

    # ---- the exact path ----------------------------------------------------------------------
    def rank_ids(self, epoch: int) -> np.ndarray:
        """This rank's sample ids of ``epoch``, in the order they are served.

        The kept ids, permuted by (seed, epoch), are padded to a multiple of world_size by
        repeating the first ones of the order (kept ids only), then dealt round-robin to ranks.
        """
        if epoch not in self._order:
            order = self.kept_ids(epoch)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            per_rank = -(-len(order) // self.world_size)
            self._order = {epoch: np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]}
        return self._order[epoch]

    def rank_samples(self, epoch: int) -> int:
        """Samples this rank serves in ``epoch`` (frozen)."""
        return len(self.rank_ids(epoch))

    @property
    def unpruned_rank_samples(self) -> int:
        """This rank's samples in an epoch that skips nothing."""
        return ceil(self.num_samples / self.world_size)

    @property
    def loader_class(self) -> type:
        """``TEDWebLoader``, the exact path's loader, which saves and restores the position in the epoch."""
        return TEDWebLoader

    @property
    def sampler(self) -> EpochSampler:
        """The sampler of the exact path: ``DataLoader(ds, batch_size=..., sampler=ds.sampler)``."""
        return EpochSampler(self)

    def __len__(self) -> int:
        """Samples addressable by id (all of them); ``len(ds.sampler)`` is this rank's epoch."""
        return self.num_samples

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> dict[str, Any]:
        """The sample with ``ted_id`` and ``ted_weight``; ``index`` is a sample id (weighted by the
        current epoch, if any) or the sampler's ``(epoch, sample id)``.

        A sample that cannot be read or decoded is reported (CorruptSampleWarning naming its shard
        and key) and replaced by the next kept sample of that epoch, so the epoch goes on and every
        rank still yields the same count.
        """
        epoch, sample_id = index if isinstance(index, tuple) else (self._epoch, int(index))
        mask = self._mask(epoch) if epoch is not None else None
        try:
            sample = self._load(sample_id)
        except CorruptSample as error:
            if mask is None or epoch is None:
                raise
            sample_id, sample = self._substitute(error, epoch)
        return add_ted_keys(sample, sample_id, mask.weight_of(sample_id) if mask is not None else 1.0)

    def _load(self, sample_id: int) -> dict[str, Any]:
        sample = self.index.read(sample_id, self._files)
        if self.decode is None:
            return sample
        try:
            return self.decode(sample)
        except Exception as e:  # the user's decoder on damaged bytes: any exception type
            raise CorruptSample(
                sample["__shard__"], sample["__key__"], sample_id, f"decode failed: {type(e).__name__}: {e}"
            ) from e

    def _substitute(self, error: CorruptSample, epoch: int) -> tuple[int, dict[str, Any]]:
        kept = self.kept_ids(epoch)
        start = int(np.searchsorted(kept, error.sample_id, side="right"))
        for sample_id in kept[(start + np.arange(min(_SUBSTITUTES, len(kept)))) % len(kept)]:
            try:
                sample = self._load(int(sample_id))
            except CorruptSample:
                continue
            warnings.warn(
                f"{error}; replaced by kept sample {sample_id} for epoch {epoch}", CorruptSampleWarning, stacklevel=3
            )
            return int(sample_id), sample
        raise RuntimeError(
            f"{error}; and the next {_SUBSTITUTES} kept samples fail too: the shards "
            f"in {self.index.folder} look damaged (open them with rehash=True to check every "
            "shard's digest)"
        ) from error

    def state_dict(self, samples_in_epoch: int) -> dict[str, Any]:
        """A JSON-serialisable resume point: ``samples_in_epoch`` is how many samples this rank
        has taken from its loader in the current epoch (the same on every rank).

        It carries the score table: the table is saved with every rank's scores so far (a
        collective, as ``save_table``) and copied beside it (see ``wds_state``); the state names
        that copy, which ``load_state_dict`` makes the live table again."""
        epoch = self._current_epoch()
        total = len(self.rank_ids(epoch))
        if not 0 <= samples_in_epoch <= total:
            raise ValueError(
                f"samples_in_epoch={samples_in_epoch} is invalid: epoch {epoch} serves {total} samples per rank"
            )
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.index.fingerprint["digest"],
            "epoch": epoch,
            "samples_in_epoch": int(samples_in_epoch),
            "mask_crc": self._mask(epoch).crc,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "table": self._table_snapshot(),
        }

    def _table_snapshot(self) -> dict[str, str]:
        self.save_table()  # the scores recorded so far decide the next masks: they go with the state
        digest = table_digest(self.table)
        if self.pruner.leader:
            keep_snapshot(self.table_path, digest)
        return {"digest": digest, "file": snapshot_name(digest)}

    def _restore_table(self, saved: dict[str, str]) -> None:
        """Make the table the state was taken with the live one, unless it already is."""
        live = table_digest(self.table)
        if live == saved["digest"]:
            return
        path = os.path.join(os.path.dirname(self.table_path), saved["file"])
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"the state was taken with the score table {path} (digest {saved['digest']}), which is "
                f"missing, and the live table {self.table_path} holds other scores (digest {live}): "
                f"expected that copy (keep the table folder with the states; it keeps the newest {KEEP}), "
                "or load the checkpoint's own copy with load_table() before load_state_dict()"
            )
        self.load_table(path)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``: the next ``start_epoch(state["epoch"])`` keeps its frozen mask and
        the sampler skips what was consumed; the table the state was taken with becomes the live
        one (a collective when it is not already). Refuses another dataset, another order (world
        size, seed, shuffle) or a table whose mask of that epoch differs."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TEDWebDataset state: format={state.get('format')!r}, expected {STATE_FORMAT!r}")
        if state["fingerprint"] != self.index.fingerprint["digest"]:
            raise ValueError(
                f"checkpoint was taken on dataset {state['fingerprint'][:12]}, these shards are "
                f"{self.index.fingerprint['digest'][:12]}"
            )
        for key in ("world_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={state[key]!r}, this dataset {getattr(self, key)!r}: "
                    "the epoch order depends on it, so the resume would not be exact"
                )
        if "table" in state:  # absent in states saved before they carried the table
            self._restore_table(state["table"])
        epoch = state["epoch"]
        mask = self.pruner.mask(epoch)
        # mask_crc None: a checkpoint taken at the start of an epoch not yet frozen (next_epoch_state)
        if state["mask_crc"] is not None and (mask is None or mask.crc != state["mask_crc"]):
            found = "no mask" if mask is None else f"mask CRC {mask.crc:#010x}"
            raise ValueError(
                f"cannot resume epoch {epoch}: the checkpoint's keep-mask has CRC "
                f"{state['mask_crc']:#010x} but the table at {self.table_path} holds {found}; "
                "resume with the table saved alongside the checkpoint"
            )
        self._resume = (epoch, int(state["samples_in_epoch"]))
        self._epoch = epoch

    def next_epoch_state(self, state: dict[str, Any], epoch: int) -> dict[str, Any]:
        """``state`` moved to the start of ``epoch``, whose mask is not frozen yet: for a checkpoint
        taken at the end of the epoch before, in loops that stop on an empty epoch."""
        return dict(state, epoch=epoch, samples_in_epoch=0, mask_crc=None)

    def check_world(self, rank: int, world_size: int) -> None:
        """ValueError unless the dataset deals its epochs to ``rank`` of ``world_size``."""
        if (self.rank, self.world_size) != (rank, world_size):
            raise ValueError(
                f"TEDWebDataset(rank={self.rank}, world_size={self.world_size}) but the Trainer runs "
                f"rank {rank} of {world_size}: expected the same (create the dataset after "
                "TrainingArguments, which sets up torch.distributed, or pass rank= and world_size=)"
            )

    def _resume_offset(self, epoch: int) -> int:
        """Samples of ``epoch`` this rank consumed before a loaded checkpoint (0 without one)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0

    # ---- the streaming path (webdataset pipeline stages) -------------------------------------
    def _slot(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return self.rank * workers + worker, self.world_size * workers

    def _kept_per_shard(self, epoch: int) -> np.ndarray:
        cumulative = np.concatenate([[0], np.cumsum(self._keep_bools(epoch))])
        return cumulative[self.index.starts[1:]] - cumulative[self.index.starts[:-1]]

    def _slot_shards(self, epoch: int, slots: int) -> list[np.ndarray]:
        """Each rank x worker slot's shards in reading order, for ``epoch``.

        Shards are dealt by their kept counts this epoch (largest first, each to the slot with the
        fewest kept samples so far), so that the slots' counts, and hence the padding the
        streaming path needs, stay close; ties and each slot's reading order follow a
        permutation by (seed, epoch).
        """
        shards = len(self.index.shards)
        if shards < slots:
            raise ValueError(
                f"{shards} shards cannot be dealt to {slots} ranks x workers: expected at least "
                "one shard per worker of every rank (use fewer workers or more shards)"
            )
        order = np.arange(shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(shards)
        kept = self._kept_per_shard(epoch)
        load = np.zeros(slots, np.int64)
        dealt: list[list[int]] = [[] for _ in range(slots)]
        for position in np.argsort(-kept[order], kind="stable"):
            slot = int(np.argmin(load))
            dealt[slot].append(position)
            load[slot] += kept[order[position]]
        return [order[np.sort(np.array(d, dtype=np.int64))] for d in dealt]

    def _slot_counts(self, epoch: int, dealt: list[np.ndarray]) -> list[int]:
        """Kept samples in ``epoch`` of each slot's shards (``dealt``, from ``_slot_shards``)."""
        per_shard = self._kept_per_shard(epoch)
        return [int(per_shard[s].sum()) for s in dealt]

    def wds_stats(self, num_workers: int) -> dict[str, Any]:
        """The streaming path's figures for the current epoch with ``num_workers`` DataLoader
        workers per rank (0: the main process): samples ``kept`` by the mask, ``served`` (every
        worker serves the largest worker's count), ``repeats``, and the fractions ``saved`` (real)
        and ``saved_by_mask``. Logged once per epoch by rank 0's first worker, see ``wds_stream``."""
        epoch = self._current_epoch()
        dealt = self._slot_shards(epoch, self.world_size * max(1, num_workers))
        return stream_stats(epoch, self.num_samples, self._slot_counts(epoch, dealt))

    def wds_shards(self) -> Callable[[], Iterator[dict[str, str]]]:
        """First stage of a webdataset pipeline: this rank's and worker's shards for the current
        epoch (see ``_slot_shards``), as ``{"url": path}``."""

        def source() -> Iterator[dict[str, str]]:
            slot, slots = self._slot()
            for s in self._slot_shards(self._current_epoch(), slots)[slot]:
                yield {"url": os.path.join(self.index.folder, self.index.shards[s]["name"])}

        return source

    def wds_read(self) -> Callable[[Iterator[dict[str, str]]], Iterator[dict[str, Any]]]:
        """In place of ``webdataset.tarfile_to_samples()`` when the shards are local files: reads
        only the samples kept this epoch, one ``pread`` of each one's byte span (headers checked),
        and yields them as webdataset's raw samples (``__key__``, ``__url__``, field bytes), in tar
        order. Follow it with ``wds_select()`` as usual. A corrupt sample is reported
        (CorruptSampleWarning) and skipped; ``wds_select`` pads the worker's count."""

        def read(sources: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
            keep = self._keep_bools(self._current_epoch())
            for source in sources:
                url = source["url"]
                for sample_id in self.index.shard_ids(os.path.basename(url)):
                    if not keep[sample_id]:
                        continue
                    try:
                        raw = self.index.read(sample_id, self._files)
                    except CorruptSample as error:
                        warnings.warn(f"{error}; skipped", CorruptSampleWarning, stacklevel=2)
                        continue
                    del raw["__shard__"]
                    raw["__url__"] = url
                    yield raw

        return read

    def wds_select(self) -> Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]]:
        """The stage after ``webdataset.tarfile_to_samples()`` and before decoding: drops the
        samples pruned this epoch by id and adds ``ted_id``/``ted_weight`` (decode with
        ``partial=True`` so webdataset's decoder leaves them alone).

        Every worker of every rank yields the same count: the largest kept count of any worker's
        shards; a worker with fewer kept samples repeats its own first kept samples (held raw, in
        memory, until its shards end). With ``webdataset.batched(b)`` every worker, so every rank,
        then forms the same number of batches (the last one partial unless ``partial=False``).
        That needs ``wds_shards()``'s dealing: a sample of a shard dealt to another worker raises
        RuntimeError. Rank 0's first worker reports the epoch's real saving (``wds_stats``).
        """

        def select(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            epoch = self._current_epoch()
            keep = self._keep_bools(epoch)
            slot, slots = self._slot()
            dealt = self._slot_shards(epoch, slots)
            counts = self._slot_counts(epoch, dealt)
            quota = max(counts)
            mine = {self.index.shards[s]["name"] for s in dealt[slot]}
            if slot == 0 and self._reported != epoch:
                self._reported = epoch
                report(stream_stats(epoch, self.num_samples, counts))
            repeats: list[dict[str, Any]] = []
            served = 0
            for sample in samples:
                name = os.path.basename(sample["__url__"])
                if name not in mine:
                    raise self._undealt(name, slot, slots, epoch, mine)
                sample_id = self.index.sample_id(name, sample["__key__"])
                if sample_id is None:
                    raise ManifestError(
                        f"shard {name} holds key {sample['__key__']!r}, which is not in the "
                        f"manifest of {self.index.folder}: re-run ted-stream index"
                    )
                if not keep[sample_id]:
                    continue
                add_ted_keys(sample, sample_id, self._weight(epoch, sample_id))
                if len(repeats) < max(1, quota - counts[slot]):  # one spare: a sample a handler skips
                    repeats.append(dict(sample))
                yield sample
                served += 1
            if served < quota and not repeats:
                raise RuntimeError(
                    f"rank {self.rank}, worker slot {slot}: no kept sample was read from its "
                    f"shards in epoch {epoch}, so nothing to pad its {quota} samples with "
                    "(every one pruned or unreadable); use fewer workers or more shards"
                )
            for i in range(quota - served):  # also covers samples a webdataset handler skipped
                yield dict(repeats[i % len(repeats)])

        return select

    def _undealt(self, shard: str, slot: int, slots: int, epoch: int, dealt: set[str]) -> RuntimeError:
        return RuntimeError(
            f"wds_select(): rank {self.rank}, worker slot {slot} of {slots} read shard {shard}, which is "
            f"not among the shards wds_shards() deals it in epoch {epoch} ({sorted(dealt)}): expected "
            "ds.wds_shards() as the pipeline's first stage (not a shard list of your own, nor "
            "split_by_node/split_by_worker), since the padding to equal counts per worker assumes its dealing"
        )


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, sample id)`` for this rank's share of the current epoch (see
    ``TEDWebDataset.rank_ids``), from the resume point after ``load_state_dict``."""

    def __init__(self, dataset: TEDWebDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        ds = self.dataset
        epoch = ds._current_epoch()
        ids = ds.rank_ids(epoch)[ds._resume_offset(epoch) :]
        ds._resume = None  # consumed: the next pass over the loader is a new epoch's
        ds._served = epoch
        return ((epoch, int(i)) for i in ids)

    def __len__(self) -> int:
        epoch = self.dataset._current_epoch()
        return len(self.dataset.rank_ids(epoch)) - self.dataset._resume_offset(epoch)


class TEDWebLoader(torch.utils.data.DataLoader):
    """The exact path's ``DataLoader``: ``dataset.sampler`` in batches of ``dataset.batch_size``,
    keeping its position in the epoch so that a checkpoint resumes exactly, like
    mosaicml-streaming's ``StreamingDataLoader``: ``state_dict()`` (JSON-serialisable) and
    ``load_state_dict(state)``. Takes ``DataLoader``'s other keyword arguments (``collate_fn``,
    ``num_workers``, ...)."""

    dataset: TEDWebDataset

    def __init__(self, dataset: TEDWebDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, TEDWebDataset):
            raise TypeError(f"dataset is a {type(dataset).__name__}: expected a TEDWebDataset")
        fixed: list[str] = sorted(k for k in ("sampler", "batch_sampler", "shuffle", "drop_last") if k in kwargs)
        if kwargs.get("batch_size", dataset.batch_size) != dataset.batch_size:
            fixed.insert(0, f"batch_size={kwargs['batch_size']} (the dataset's is {dataset.batch_size})")
        if fixed:
            raise ValueError(
                f"TEDWebLoader got {', '.join(fixed)}: expected none of them (the dataset's batch_size and "
                "sampler decide the order, and no kept sample is dropped)"
            )
        kwargs.pop("batch_size", None)
        super().__init__(dataset, batch_size=dataset.batch_size, sampler=dataset.sampler, **kwargs)
        self._position: tuple[Optional[int], int] = (None, 0)  # (epoch, samples this rank took from it)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator over DataLoader's iterator
        ds = self.dataset
        epoch = ds._current_epoch()
        done, total = ds._resume_offset(epoch), len(ds.rank_ids(epoch))
        self._position = (epoch, done)
        for batch in super().__iter__():  # consecutive batches of this rank's order, the last one short
            done = min(done + ds.batch_size, total)
            self._position = (epoch, done)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The resume point: the current epoch and the samples this rank took from it."""
        ds = self.dataset
        epoch, done = self._position
        current = ds._current_epoch()
        return ds.state_dict(done if epoch == current else ds._resume_offset(current))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (see ``TEDWebDataset.load_state_dict``)."""
        self.dataset.load_state_dict(state)
        self._position = (None, 0)
