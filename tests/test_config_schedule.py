import re
import subprocess
import sys

import pytest

from ted_stream import TEDConfig, pruned_fraction
from ted_stream.config import ScorerSettings, apply_overrides, read_block


@pytest.mark.parametrize("field,value", [
    ("target", 1.0), ("target", -0.1), ("warmup_epochs", -1), ("ramp_epochs", 1.5),
    ("ramp", "quadratic"), ("policy", "magic"), ("ema", 0.0), ("ema", 1.5),
    ("explore", 1.0), ("max_weight", 0.5), ("seed", -3), ("epochs", 0),
])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TEDConfig.{field}="):
        TEDConfig(**{field: value})


def test_tail_needs_epochs_and_must_fit():
    with pytest.raises(ValueError, match="tail_epochs"):
        TEDConfig(tail_epochs=1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TEDConfig(epochs=3, warmup_epochs=2, tail_epochs=2)


def test_from_dict_names_unknown_key():
    with pytest.raises(ValueError, match=r"\['tagret'\]"):
        TEDConfig.from_dict({"tagret": 0.3})
    assert TEDConfig.from_dict({"target": 0.4, "policy": "infobatch"}).policy == "infobatch"


def test_schedule_warmup_ramp_plateau_tail():
    cfg = TEDConfig(target=0.5, epochs=8, warmup_epochs=2, ramp_epochs=2, tail_epochs=1, ramp="linear")
    assert [pruned_fraction(cfg, e) for e in range(8)] == [0, 0, 0.25, 0.5, 0.5, 0.5, 0.5, 0]
    cubic = TEDConfig(target=0.5, warmup_epochs=1, ramp_epochs=2)
    # cubic: 1 - (1 - 1/2)^3 = 7/8 of the target after half the ramp
    assert pruned_fraction(cubic, 1) == pytest.approx(0.5 * 7 / 8)
    assert pruned_fraction(cubic, 2) == pytest.approx(0.5)
    assert pruned_fraction(cubic, 50) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="epoch=-1"):
        pruned_fraction(cfg, -1)


def test_target_for_saved_hits_the_saved_fraction():
    from ted_stream.schedule import target_for_saved

    cfg = TEDConfig(epochs=10, warmup_epochs=1, ramp_epochs=2, tail_epochs=1)
    t = target_for_saved(cfg, 0.5)
    tuned = TEDConfig(**{**cfg.to_dict(), "target": t})
    assert sum(pruned_fraction(tuned, e) for e in range(10)) / 10 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="out of reach"):
        target_for_saved(cfg, 0.8)


@pytest.mark.parametrize("field,value,expected", [
    ("rescale", "false", "true or false"), ("monotone", 1, "true or false"),
    ("target", "0.4", "a number"), ("target", True, "a number"), ("ema", None, "a number"),
    ("warmup_epochs", 1.0, "an integer"), ("epochs", "4", "an integer or null"), ("seed", False, "an integer"),
    ("policy", 3, "a string"), ("ramp", ["cubic"], "a string"),
])
def test_wrong_types_name_the_field(field, value, expected):
    # "rescale": "false" is truthy: before type checks it switched rescaling on.
    with pytest.raises(ValueError, match=re.escape(f"TEDConfig.{field}={value!r} is invalid: expected {expected}")):
        TEDConfig.from_dict({field: value})


def test_json_numbers_are_normalised():
    import numpy as np

    cfg = TEDConfig(target=0, epochs=np.int64(5), max_weight=2)
    assert (type(cfg.target), type(cfg.epochs), type(cfg.max_weight)) == (float, int, float)
    assert cfg.run_identity() == TEDConfig(target=0.0, epochs=5, max_weight=2.0).run_identity()


def test_run_identity_is_the_policy_and_its_schedule():
    base = TEDConfig(target=0.4)
    assert base.run_identity() == TEDConfig(target=0.4, epochs=9).run_identity()  # no tail: epochs is moot
    with_tail = TEDConfig(target=0.4, epochs=9, tail_epochs=1)
    assert with_tail.run_identity()["epochs"] == 9
    for change in ({"target": 0.2}, {"explore": 0.1}, {"seed": 1}, {"ramp": "linear"}, {"rescale": False}):
        assert TEDConfig(**{"target": 0.4, **change}).run_identity() != base.run_identity()


def test_read_block_checks_the_scorer_at_once():
    ted, scorer = read_block({"target": 0.4, "scorer": {"layers": "lm_head", "rows": None}})
    assert ted.target == 0.4 and scorer == ScorerSettings(layers=("lm_head",), rows=None)
    assert read_block(None) == (TEDConfig(), ScorerSettings())
    assert ScorerSettings.from_dict(scorer.to_dict()) == scorer and scorer.to_dict()["layers"] == ["lm_head"]
    for block, msg in [({"scorer": {"layers": 5}}, "scorer.layers=5 is invalid"),
                       ({"scorer": {"layers": ["a", 1]}}, "scorer.layers"),
                       ({"scorer": {"layers": []}}, "scorer.layers"),
                       ({"scorer": {"rows": "16"}}, "scorer.rows='16' is invalid: expected an integer or null"),
                       ({"scorer": {"rows": 0}}, "scorer.rows=0"),
                       ({"scorer": {"reading": "igd"}}, "scorer.reading='igd'"),
                       ({"scorer": {"ref_ema": 1.0}}, "scorer.ref_ema=1.0"),
                       ({"scorer": {"seed": True}}, "scorer.seed=True"),
                       ({"scorer": {"rowz": 3}}, r"unknown scorer key\(s\) \['rowz'\]"),
                       ({"scorer": [1]}, "scorer=\\[1\\] is invalid"),
                       ([1], "must be a JSON object")]:
        with pytest.raises(ValueError, match=msg):
            read_block(block)


def test_config_module_imports_nothing_heavy():
    # A launcher checks the whole config before paying for torch and streaming (seconds).
    code = ("import sys, ted_stream.config; "
            "print(sorted(m for m in ('torch', 'streaming', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_apply_overrides_reads_json_values_and_scorer_keys():
    block = apply_overrides({"target": 0.3}, ["target=0.2", "policy=random", "rescale=false", "scorer.rows=8"])
    assert block == {"target": 0.2, "policy": "random", "rescale": False, "scorer": {"rows": 8}}
    with pytest.raises(ValueError, match="'target': expected KEY=VALUE"):
        apply_overrides({}, ["target"])
