"""What the streaming path really saves: the mask's saving less the repeats that equalise workers.

Every worker of every rank serves the largest worker's kept count (so every rank forms the same
number of batches); the others repeat their own kept samples to reach it. Those repeats are trained
on, so they undo part of the mask's saving. ``stream_stats`` counts them from the manifest and the
mask; ``report`` logs the figures once per epoch and warns (``RepeatWarning``) when the repeats
undo more than ``REPEAT_WARNING_SHARE`` of what the mask pruned.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("ted_stream.wds")

REPEAT_WARNING_SHARE = 0.1  # of the samples the mask prunes: repeats beyond it cost a noticeable part


class RepeatWarning(UserWarning):
    """The streaming path's repeats undo more than ``REPEAT_WARNING_SHARE`` of an epoch's saving."""


def stream_stats(epoch: int, num_samples: int, counts: Sequence[int]) -> dict[str, Any]:
    """The epoch's figures from each rank x worker slot's kept count (``counts``)."""
    kept, served = sum(counts), max(counts) * len(counts)
    return {
        "epoch": epoch,
        "slots": len(counts),
        "samples": num_samples,
        "kept": kept,
        "served": served,
        "repeats": served - kept,
        "saved": 1 - served / num_samples,
        "saved_by_mask": 1 - kept / num_samples,
    }


def report(stats: dict[str, Any]) -> None:
    """Log ``stats``; warn when the repeats undo more than REPEAT_WARNING_SHARE of the pruned
    samples (an epoch that prunes nothing has no saving to undo)."""
    pruned = stats["samples"] - stats["kept"]
    message = (
        f"epoch {stats['epoch']}, streaming path: {stats['served']} samples served for {stats['kept']} kept "
        f"of {stats['samples']} ({stats['repeats']} repeats equalise {stats['slots']} ranks x workers): "
        f"{stats['saved']:.1%} saved, {stats['saved_by_mask']:.1%} by the mask"
    )
    logger.info(message)
    if pruned and stats["repeats"] > REPEAT_WARNING_SHARE * pruned:
        warnings.warn(
            f"{message}; the repeats undo {stats['repeats'] / pruned:.0%} of the saving, more than "
            f"{REPEAT_WARNING_SHARE:.0%}: use more, smaller shards or fewer workers, or the exact path "
            "(ds.sampler), which repeats fewer than world_size samples",
            RepeatWarning,
            stacklevel=3,
        )
