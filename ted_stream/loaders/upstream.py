"""mosaicml-streaming's private state, touched here and nowhere else in ted_stream.

``TEDStreamingDataset`` derives from ``UpstreamDataset`` and reads streaming's internals only
through its members; ``TEDProtocol`` reaches streaming's checkpoint format only through
``epoch_start_state``. Checked by tests/test_compat.py against the versions pyproject.toml allows
(see docs/api.md, "Streaming versions"): a streaming release that renames one of these fields
breaks here, in one place.
"""

from __future__ import annotations

from typing import Any

from streaming import StreamingDataset


class UpstreamDataset(StreamingDataset):
    """``StreamingDataset`` with the private state TED needs behind named members."""

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Private hook, overridden: the one call each worker makes at every epoch start, before
        # streaming's barrier in _get_work lets any worker of the node yield a sample.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.epoch_begins(epoch)
        return epoch, sample_in_epoch

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
