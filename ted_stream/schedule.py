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


def target_for_saved(cfg: TEDConfig, saved: float) -> float:
    """The ``target`` that makes the schedule of ``cfg`` prune ``saved`` of all sample-iterations
    over ``cfg.epochs`` (warm-up, ramp and tail included)."""
    if cfg.epochs is None:
        raise ValueError("target_for_saved needs TEDConfig.epochs")
    unit = TEDConfig(**{**cfg.to_dict(), "target": 0.5})
    mean_shape = sum(pruned_fraction(unit, e) for e in range(cfg.epochs)) / (0.5 * cfg.epochs)
    target = saved / mean_shape if mean_shape else float("inf")
    if not 0.0 <= target < 1.0:
        raise ValueError(
            f"saved={saved} is out of reach for this schedule: it needs target={target:.3f}, "
            "expected < 1; shorten warm-up/ramp/tail or lower saved"
        )
    return target
