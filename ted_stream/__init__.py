"""ted_stream: progressive TED data pruning for streaming loaders."""

from importlib import import_module
from typing import Any

from .config import TEDConfig, split_config
from .schedule import pruned_fraction
from .table import EpochMask, ScoreTable, TableError

# The loaders, the scorer and the protocol import streaming and torch (seconds): loaded on first
# use, so that `ted_stream.config` can check a launch config before anything heavy is imported.
_LAZY = {
    "TEDStreamingDataset": ".loaders.streaming",
    "TEDWebDataset": ".loaders.wds",
    "TEDWebLoader": ".loaders.wds",
    "TaylorScorer": ".scorer",
    "Scores": ".scorer",
    "last_layer_scores": ".scorer",
    "per_sample_ce": ".scorer",
    "per_sample_lm_loss": ".scorer",
    "predicted_igd": ".scorer",
    "TEDProtocol": ".protocol",
    "model_inputs": ".source",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ted_stream' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)


__all__ = [
    "TEDConfig",
    "split_config",
    "TEDProtocol",
    "model_inputs",
    "TEDStreamingDataset",
    "TEDWebDataset",
    "TEDWebLoader",
    "ScoreTable",
    "EpochMask",
    "TableError",
    "pruned_fraction",
    "TaylorScorer",
    "Scores",
    "last_layer_scores",
    "per_sample_ce",
    "per_sample_lm_loss",
    "predicted_igd",
]
__version__ = "0.1.0"
