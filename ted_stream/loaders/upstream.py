"""mosaicml-streaming's private state, touched here and nowhere else in ted_stream.

``TEDStreamingDataset`` derives from ``UpstreamDataset`` and reads streaming's internals only
through its members; ``TEDProtocol`` reaches streaming's checkpoint format only through
``epoch_start_state``. Checked by tests/test_compat.py against the versions pyproject.toml allows
(see docs/api.md, "Streaming versions"): a streaming release that renames one of these fields
breaks here, in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Optional

from streaming import StreamingDataset
from streaming.base.dataset import _ShardState


class ShardError(RuntimeError):
    """A shard of the epoch could not be downloaded, decompressed or read."""


class UpstreamDataset(StreamingDataset):
    """``StreamingDataset`` with the private state TED needs behind named members."""

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Private hook, overridden: the one call each worker makes at every epoch start, before
        # streaming's barrier in _get_work lets any worker of the node yield a sample.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.epoch_begins(epoch)
        return epoch, sample_in_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Upstream ends an epoch early, without raising, when a shard fails in its download
        # threads: a missing or damaged shard would silently shorten the epoch. Raise instead,
        # naming the shard, once upstream's threads have stopped.
        self._background_error: Optional[ShardError] = None
        yield from super().__iter__()
        if self._background_error is not None:
            raise self._background_error
        if self._event.is_set():  # private: upstream's "a thread failed" flag
            it = self._iterator  # private: upstream's per-epoch iteration state
            shard = self._shard_name(int(it.sample_ids[min(it.yield_index, it.total - 1)]))
            raise ShardError(
                f"the epoch ended after {it.yield_index} of this worker's {it.total} samples: a "
                f"background thread failed at or before shard {shard} (its traceback is in the log)"
            )

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            # Upstream leaves a failed shard PREPARING in shared memory, and every other worker
            # waits for it to turn LOCAL forever. Mark it LOCAL: their wait ends, and their own read
            # finds its file missing, prepares it again and fails as loudly.
            self._shard_states[shard_id] = _ShardState.LOCAL  # private: the node's shard states
            error = ShardError(
                f"shard {self._shard_name_of(shard_id)} could not be prepared ({type(err).__name__}: {err}): "
                "expected a complete shard as written (is it missing, truncated or damaged at its remote?)"
            )
            error.__cause__ = err
            if hasattr(self, "_event"):  # iterating: stop upstream's threads, as upstream does on failure
                self._event.set()  # private: upstream's "a thread failed" flag
            if blocking:  # get_item, in the iterating thread: raise there
                raise error from err
            # A download thread (they call it non-blocking): a thread that raises never reports its
            # exit, and upstream's end of epoch waits for that report forever. __iter__ raises it.
            self._background_error = error

    def _shard_name(self, sample_id: int) -> str:
        return self._shard_name_of(self.spanner[sample_id][0])  # private: sample id -> shard id

    def _shard_name_of(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw, zipped = self.shards[shard_id].file_pairs[0]
        name = (zipped or raw).basename
        return os.path.join(stream.remote or stream.local, stream.split or "", name)

    def epoch_begins(self, epoch: int) -> None:
        """Runs in every worker as ``epoch`` begins, before any worker of the node yields from it."""

    @property
    def node_leader(self) -> bool:
        """Whether this rank is the first of its node, as streaming counts nodes (LOCAL_WORLD_SIZE)."""
        return self._unique_rank_world.rank_of_node == 0  # private: streaming's own node detection

    @property
    def local_leader(self) -> bool:
        """Whether this rank leads its node (writes the node's files)."""
        return self._unique_rank_world.is_local_leader  # private: streaming's own node detection

    @property
    def global_rank(self) -> int:
        return self._unique_rank_world.rank  # private: the rank streaming detected (env or torch.distributed)

    @property
    def num_ranks(self) -> int:
        """Ranks an epoch is partitioned over (after streaming's replication)."""
        return self._parallel_rank_world.num_ranks  # private: replication divides the detected world

    def resumed_epoch(self, epoch: int) -> int:
        """The epoch streaming runs when it starts ``epoch``: a loaded checkpoint's epoch while one
        is pending in shared memory, else ``epoch``."""
        return self._resume(self._parallel_rank_world, epoch)[0]  # private: reads the pending checkpoint


def epoch_start_state(state: dict[str, Any], epoch: int) -> dict[str, Any]:
    """streaming's checkpoint ``state`` (``state_dict``'s keys) moved to the start of ``epoch``."""
    return dict(state, epoch=epoch, sample_in_epoch=0)
