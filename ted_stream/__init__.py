"""ted_stream: progressive TED data pruning for streaming loaders."""
from .config import TEDConfig
from .loaders.streaming import TEDStreamingDataset
from .schedule import pruned_fraction
from .table import EpochMask, ScoreTable, TableError

__all__ = ["TEDConfig", "TEDStreamingDataset", "ScoreTable", "EpochMask", "TableError", "pruned_fraction"]
__version__ = "0.1.0"
