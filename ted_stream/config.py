"""TEDConfig: every pruning knob, validated when it is built; the scorer settings of a config block.

Imports nothing heavy, so a launcher can check a whole config before it loads torch.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

POLICIES = ("ted", "random", "random-dynamic", "infobatch")
RAMPS = ("cubic", "linear")
READINGS = ("d", "s", "abs_s", "sqnorm", "loss")
# The JSON type each annotation accepts. bool is an int subclass, so it is refused explicitly:
# "rescale": "false" or "target": true must not pass as a truthy string or the number 1.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "float": ((numbers.Real,), "a number"),
    "int": ((numbers.Integral,), "an integer"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "Union[int, str]": ((numbers.Integral, str), 'an integer or "shard"'),
}


def _unwrap(annotation: str) -> tuple[bool, str]:
    """(whether ``annotation`` is Optional, the type inside it)."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return True, annotation[len("Optional[") : -1]
    return False, annotation


def _type_error(value: Any, annotation: str) -> Optional[str]:
    """What ``value`` should have been for ``annotation`` ("float", "Optional[int]", ...), or None."""
    optional, base = _unwrap(annotation)
    if value is None and optional:
        return None
    kinds, words = _TYPES[base]
    if isinstance(value, kinds) and (base == "bool" or not isinstance(value, bool)):
        return None
    return words + (" or null" if optional else "")


@dataclass(frozen=True)
class TEDConfig:
    """How much to prune, when, and by which rule.

    target: pruned fraction of the dataset once the ramp is done (for ``infobatch``: the
        probability r of dropping a below-mean sample, so the saved fraction is lower).
    epochs: total number of epochs; needed only for ``tail_epochs``.
    warmup_epochs: leading epochs on all data (every sample gets a score).
    ramp_epochs: epochs over which the pruned fraction rises from 0 to ``target``.
    tail_epochs: final epochs on all data (annealing), counted back from ``epochs``.
    ramp: ``cubic`` (fast early, gentle near the target) or ``linear``.
    policy: ``ted`` (prune lowest scores), ``random`` (one fixed draw), ``random-dynamic``
        (a new draw per epoch) or ``infobatch`` (drop a random r of the below-mean scores).
    ema: weight of a new score in the per-sample moving average (1 = keep only the last).
    explore: the random share of the selection. The pruned samples are drawn at random from a
        pool of the lowest scores, of size pruned / (1 - explore) but never more than
        pruned + explore * (candidates - pruned), so at least (1 - explore) of the kept samples
        are kept for their scores at every target (0 = hard selection of the lowest scores).
        The re-admitted part of the pool gets trained and re-scored, so stale scores refresh.
    alpha: how far the pruned samples concentrate in that low-score pool. The pool loses
        alpha * pruned + (1 - alpha) * its proportional share, the other candidates the rest,
        both at random; with ``rescale`` each side's kept samples are weighted by its size / its
        kept count (inverse inclusion probabilities). alpha = 1 prunes only from the pool;
        alpha = 0 prunes every candidate with the same probability: random pruning at the same
        loss scale, so the score decides how far a mask departs from random. Default 0.5, the
        best measured in the issue-23 grids (docs/quality.md).
    trim_top: share of each epoch's pruned count taken from the *highest* scores (outliers,
        likely label noise) instead of the lowest; 0 prunes only from the bottom.
    monotone: once pruned, a sample stays pruned (otherwise re-selected every epoch).
    rescale: weight kept samples up so the pruned region keeps its loss mass: the kept part of
        the ``ted`` pool by pool / kept, every kept sample of a ``random`` policy by n / kept
        (the same total loss scale, for comparisons at a matched step size).
    max_weight: cap on that weight.
    seed: seed of every random choice the policy makes.
    block: samples per pruning block (0 = per sample), or ``"shard"``: one block per shard, as the
        loader's index lays them out (shards of any sizes). Every policy then scores, ranks and
        prunes whole blocks of contiguous sample ids (a block's score is the mean of its
        samples'), so a pruned block's shard region is never read: with ``"shard"`` (or a number
        = samples per shard, for shards of equal counts written in id order), a cold epoch
        downloads about the kept fraction of the bytes. Coarser choices cost selection quality
        (docs/performance.md).
    """

    target: float = 0.3
    epochs: Optional[int] = None
    warmup_epochs: int = 1
    ramp_epochs: int = 2
    tail_epochs: int = 0
    ramp: str = "cubic"
    policy: str = "ted"
    ema: float = 0.5
    explore: float = 0.5
    alpha: float = 0.5
    trim_top: float = 0.0
    monotone: bool = False
    rescale: bool = True
    max_weight: float = 3.0
    seed: int = 0
    block: Union[int, str] = 0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TEDConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        for f in fields(self):  # types first: the range checks below assume numbers and strings
            value = getattr(self, f.name)
            expected = _type_error(value, str(f.type))
            if expected:
                raise bad(f.name, expected)
            base = _unwrap(str(f.type))[1]
            if value is not None and base in ("int", "float"):  # 0 and 0.0, np.int64(3) and 3: one run
                object.__setattr__(self, f.name, int(value) if base == "int" else float(value))

        if not 0.0 <= self.target < 1.0:
            raise bad("target", "a fraction in [0, 1)")
        for name in ("warmup_epochs", "ramp_epochs", "tail_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "an integer >= 0")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise bad("epochs", "None or an integer >= 1")
        if self.tail_epochs and self.epochs is None:
            raise bad("tail_epochs", "0 unless `epochs` is set (the tail is counted back from it)")
        if self.epochs is not None and self.warmup_epochs + self.tail_epochs > self.epochs:
            raise bad("warmup_epochs", f"warmup_epochs + tail_epochs <= epochs ({self.epochs})")
        if self.ramp not in RAMPS:
            raise bad("ramp", f"one of {RAMPS}")
        if self.policy not in POLICIES:
            raise bad("policy", f"one of {POLICIES}")
        if not 0.0 < self.ema <= 1.0:
            raise bad("ema", "a weight in (0, 1]")
        if not 0.0 <= self.explore < 1.0:
            raise bad("explore", "a fraction in [0, 1)")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", "a fraction in [0, 1]")
        if not 0.0 <= self.trim_top <= 1.0:
            raise bad("trim_top", "a fraction in [0, 1]")
        if not self.max_weight >= 1.0:
            raise bad("max_weight", "a number >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if self.block != "shard" and (isinstance(self.block, str) or self.block < 0):
            raise bad("block", 'an integer >= 0 (samples per pruning block; 0 = per sample) or "shard"')
        if self.block != "shard":  # np.int64(3) and 3: one run
            object.__setattr__(self, "block", int(self.block))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TEDConfig:
        """Build from a plain mapping (e.g. the ``"ted"`` block of a DeepSpeed config)."""
        if not isinstance(values, Mapping):
            raise ValueError(f"TED config {values!r} is invalid: expected a mapping of field names to values")
        odd = [k for k in values if not isinstance(k, str)]
        if odd:
            raise ValueError(
                f"TED config key(s) {odd} are not strings; expected field names, some of "
                f"{sorted(f.name for f in fields(cls))}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TED config key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_identity(self) -> dict[str, Any]:
        """The fields that decide which samples an epoch keeps (the policy and its schedule).

        A table records this for every mask it freezes; a run with another identity may not
        reuse those masks. ``epochs`` only matters through the tail, so without one a resumed
        run may extend training.
        """
        identity = self.to_dict()
        if not self.tail_epochs:
            del identity["epochs"]
        if self.alpha == 1.0:  # the rule of tables frozen before alpha existed: the same identity
            del identity["alpha"]
        if not self.block:  # per-sample selection, as every table frozen before blocks existed
            del identity["block"]
        return identity


@dataclass(frozen=True)
class ScorerSettings:
    """The ``"scorer"`` sub-block of a ``"ted"`` config block: how ``TEDProtocol`` scores.

    Checked when built (ValueError naming the field): a wrong type here would otherwise surface
    only once the model is built, minutes into a launch. The defaults are the measured default
    (``launch/bench_scorer.py``): every linear layer, 16 rows each, reading ``d``.

    layers: layer-name patterns of the ``TaylorScorer`` (a string is one pattern).
    rows: rows sampled per layer; None takes every row (exact, and costly).
    reading: the per-sample value recorded, one of ``READINGS``.
    ref_ema: the scorer's reference-gradient moving average, in [0, 1).
    seed: seed of the row sample.
    """

    layers: tuple[str, ...] = ("*",)
    rows: Optional[int] = 16
    reading: str = "d"
    ref_ema: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        layers: Any = self.layers
        if isinstance(layers, str):
            layers = (layers,)
        if not (isinstance(layers, (list, tuple)) and layers and all(isinstance(x, str) for x in layers)):
            raise self._bad("layers", "a layer-name pattern or a non-empty list of them (strings)")
        object.__setattr__(self, "layers", tuple(layers))
        for name, annotation in (("rows", "Optional[int]"), ("reading", "str"), ("ref_ema", "float"), ("seed", "int")):
            expected = _type_error(getattr(self, name), annotation)
            if expected:
                raise self._bad(name, expected)
        if self.rows is not None and self.rows < 1:
            raise self._bad("rows", "null or an integer >= 1")
        if self.reading not in READINGS:
            raise self._bad("reading", f"one of {READINGS}")
        if not 0.0 <= self.ref_ema < 1.0:
            raise self._bad("ref_ema", "a number in [0, 1)")
        if self.seed < 0:
            raise self._bad("seed", "an integer >= 0")
        object.__setattr__(self, "ref_ema", float(self.ref_ema))

    def _bad(self, name: str, expected: str) -> ValueError:
        return ValueError(f"scorer.{name}={getattr(self, name)!r} is invalid: expected {expected}")

    @classmethod
    def from_dict(cls, block: Any) -> ScorerSettings:
        """Settings from a ``"scorer"`` JSON object (None: the defaults); an instance is returned as is."""
        if isinstance(block, ScorerSettings):
            return block
        if block is None:
            block = {}
        names = sorted(f.name for f in fields(cls))
        if not isinstance(block, Mapping):
            raise ValueError(f"scorer={block!r} is invalid: expected an object of {names}")
        unknown = sorted(map(str, set(block) - set(names)))
        if unknown:
            raise ValueError(f"unknown scorer key(s) {unknown}; expected some of {names}")
        return cls(**block)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``from_dict`` reads it back)."""
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


def read_block(block: Any) -> tuple[TEDConfig, ScorerSettings]:
    """(TEDConfig, scorer settings) from a ``"ted"`` config block (a JSON object with an optional
    ``"scorer"`` sub-block); ValueError naming the field for any unknown key or wrong type."""
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise ValueError(f'the "ted" block must be a JSON object, got {type(block).__name__}')
    block = dict(block)
    scorer = ScorerSettings.from_dict(block.pop("scorer", None))
    return TEDConfig.from_dict(block), scorer


def apply_overrides(block: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Set keys of a ``"ted"`` block from ``KEY=VALUE`` strings (a launcher's ``--ted`` options):
    ``scorer.KEY`` sets a key of the scorer sub-block; a value is read as JSON when it parses
    (``target=0.2``, ``rescale=false``), else kept as a string (``policy=random``). Returns
    ``block``, changed in place; ValueError for an item without ``=``. ``read_block`` and
    ``split_config`` validate the result."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value  # a bare string
        if key.startswith("scorer."):
            block.setdefault("scorer", {})[key[len("scorer.") :]] = parsed
        else:
            block[key] = parsed
    return block


def split_config(
    config: Union[str, os.PathLike, Mapping[str, Any]], epochs: Optional[int] = None
) -> tuple[dict[str, Any], TEDConfig, ScorerSettings]:
    """(the config without its ``"ted"`` block, TEDConfig, ScorerSettings) from a DeepSpeed JSON
    config file or an already loaded dict, validated before anything heavy is imported.

    ``epochs``: the run's epoch count; it fills ``ted.epochs`` and must agree with it when both are
    set. The returned config is what ``deepspeed.initialize`` or ``TrainingArguments(deepspeed=...)``
    accepts. Raises ValueError naming the file and the bad key.
    """
    where = ""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        where = f"{path}: "
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the config {path}: {e}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}the config must be a JSON object, got {type(config).__name__}")
    rest = dict(config)
    block = rest.pop("ted", None)
    if block is not None and not isinstance(block, Mapping):
        raise ValueError(f'{where}"ted" must be a JSON object, got {type(block).__name__}')
    block = dict(block or {})
    if epochs is not None:
        if block.get("epochs") is not None and block["epochs"] != epochs:
            raise ValueError(
                f'{where}"ted.epochs" = {block["epochs"]!r} but the run trains {epochs} epochs; '
                "drop one of them or make them agree"
            )
        block["epochs"] = epochs
    try:
        ted, scorer = read_block(block)
    except ValueError as e:
        raise ValueError(f'{where}invalid "ted" block: {e}') from None
    return rest, ted, scorer
