import pytest

from ted_stream import TEDConfig, pruned_fraction


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
