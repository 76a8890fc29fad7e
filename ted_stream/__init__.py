"""ted_stream: progressive TED data pruning for streaming loaders."""
from .config import TEDConfig
from .loaders.streaming import TEDStreamingDataset
from .schedule import pruned_fraction
from .scorer import Scores, TaylorScorer, last_layer_scores, per_sample_ce, per_sample_lm_loss, predicted_igd
from .table import EpochMask, ScoreTable, TableError

__all__ = ["TEDConfig", "TEDStreamingDataset", "ScoreTable", "EpochMask", "TableError", "pruned_fraction",
           "TaylorScorer", "Scores", "last_layer_scores", "per_sample_ce", "per_sample_lm_loss",
           "predicted_igd"]
__version__ = "0.1.0"
