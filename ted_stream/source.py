"""PruningSource: what a training loop needs of a pruning dataset, whatever its format.

``TEDStreamingDataset`` (MDS shards, ``loaders/streaming.py``) and ``TEDWebDataset`` (indexed tar
shards, ``loaders/wds.py``) implement it; ``TEDProtocol`` and the Trainer integration use nothing
else, so a third format is one new loader module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .config import TEDConfig
from .mask import EpochMask
from .pruner import Pruner
from .table import ScoreTable


@runtime_checkable
class PruningSource(Protocol):
    """A dataset whose epochs skip the samples the TED policy prunes."""

    ted: TEDConfig
    pruner: Pruner  # its table's scores and masks; ``pruner.leader``: whether this process writes the node's copy

    @property
    def batch_size(self) -> Any:
        """The per-rank micro-batch: each epoch is partitioned by it (None or 0: not set)."""

    @property
    def num_samples(self) -> int:
        """Samples in the dataset, pruned or not."""

    @property
    def unpruned_rank_samples(self) -> int:
        """Samples this rank reads in an epoch that skips nothing (a Trainer sizes its schedule by it)."""

    @property
    def table(self) -> ScoreTable: ...

    @property
    def table_path(self) -> str: ...

    @property
    def loader_class(self) -> type:
        """The DataLoader that keeps this dataset's position for an exact resume (``state_dict`` /
        ``load_state_dict``), built as ``loader_class(dataset, batch_size=dataset.batch_size, ...)``."""

    def upcoming_epoch(self) -> int:
        """The epoch the loader iterates next: a loaded checkpoint's epoch until it is iterated."""

    def start_epoch(self, epoch: int) -> EpochMask:
        """Freeze the keep-mask of ``epoch`` on every rank (collective); a frozen epoch keeps its mask."""

    def rank_samples(self, epoch: int) -> int:
        """Samples this rank reads in the frozen ``epoch``."""

    def record(self, ids: Any, scores: Any) -> None:
        """Fold per-sample scores, keyed by the batch's ``ted_id``, into the table."""

    def save_table(self) -> None:
        """Merge every rank's scores and persist the table (collective)."""

    def load_table(self, path: str) -> None:
        """Replace the table by the one at ``path``, e.g. a checkpoint's copy (collective)."""

    def next_epoch_state(self, state: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The loader's ``state`` moved to the start of ``epoch``, whose mask is not frozen yet."""

    def check_world(self, rank: int, world_size: int) -> None:
        """ValueError if the dataset partitions its epochs for another rank or world size."""


ID_KEY, WEIGHT_KEY = "ted_id", "ted_weight"


def add_ted_keys(sample: dict[str, Any], sample_id: int, weight: float) -> dict[str, Any]:
    """``sample`` with its global id and loss weight under ``ted_id`` / ``ted_weight``; a sample
    that already has a column of either name is refused rather than silently overwritten."""
    for key in (ID_KEY, WEIGHT_KEY):
        if key in sample:
            raise ValueError(
                f"sample {sample_id} already has a column named {key!r} (value {sample[key]!r}): ted_stream "
                f"adds {ID_KEY!r} and {WEIGHT_KEY!r} to every sample it serves to a TED loop; rename that "
                "column in the shards"
            )
    sample[ID_KEY] = sample_id
    sample[WEIGHT_KEY] = weight
    return sample


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without ``ted_id`` / ``ted_weight``: what ``model(**inputs)`` takes."""
    return {key: value for key, value in batch.items() if key not in (ID_KEY, WEIGHT_KEY)}


def require_source(dataset: Any, name: str) -> PruningSource:
    """``dataset`` if it is a ``PruningSource``, else TypeError naming ``name``."""
    if not isinstance(dataset, PruningSource):
        raise TypeError(
            f"{name} is a {type(dataset).__name__}: expected a TEDStreamingDataset or a TEDWebDataset "
            "(a ted_stream.source.PruningSource)"
        )
    return dataset
