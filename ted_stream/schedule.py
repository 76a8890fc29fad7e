"""Progressive schedule: the fraction of the dataset pruned in each epoch."""
from __future__ import annotations

from .config import TEDConfig


def pruned_fraction(cfg: TEDConfig, epoch: int) -> float:
    """Fraction to prune in ``epoch`` (0-based): 0 in warm-up and tail, a ramp, then ``target``.

    The ramp reaches the target at its last epoch; the cubic ramp is the gradual-pruning curve
    1 - (1 - t)^3, which prunes most while scores are fresh and slows near the target.
    """
    if epoch < 0:
        raise ValueError(f"epoch={epoch} is invalid: expected an integer >= 0")
    if epoch < cfg.warmup_epochs:
        return 0.0
    if cfg.epochs is not None and epoch >= cfg.epochs - cfg.tail_epochs:
        return 0.0
    if cfg.ramp_epochs == 0:
        return cfg.target
    t = min(1.0, (epoch - cfg.warmup_epochs + 1) / cfg.ramp_epochs)
    shape = 1.0 - (1.0 - t) ** 3 if cfg.ramp == "cubic" else t
    return cfg.target * shape
