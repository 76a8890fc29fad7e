"""launch/bench_lm_ft.py's pure parts and a micro fine-tune: the variant -> TEDConfig mapping, the
compute-matched budget, and that the fewer-epochs baseline trains exactly the pruned runs'
sample-iterations (seconds)."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import bench_lm_ft as b

from ted_stream import TEDConfig
from ted_stream.schedule import pruned_fraction


def test_variants_map_to_the_configs_the_grid_promises():
    full = b.ted_config(b.ALL, 0.0, 1, 5)
    assert full.target == 0.0 and full.seed == 1 and full.epochs == 5
    for level in b.LEVELS:
        rnd, ted = b.ted_config(b.RANDOM, level, 0, 5), b.ted_config(b.DEFAULT, level, 0, 5)
        assert (rnd.policy, rnd.rescale) == ("random-dynamic", True)
        assert (ted.policy, ted.explore, ted.rescale) == ("ted", 0.5, True)
        for cfg in (rnd, ted):  # the schedule saves the level over the whole run
            assert (cfg.warmup_epochs, cfg.ramp_epochs, cfg.tail_epochs) == (1, 2, 0)
            assert np.mean([pruned_fraction(cfg, e) for e in range(5)]) == pytest.approx(level)
    with pytest.raises(ValueError, match="level=0.0"):
        b.ted_config(b.DEFAULT, 0.0, 0, 5)
    with pytest.raises(ValueError, match="'nope'"):
        b.ted_config("nope", 0.3, 0, 5)
    assert [v for v, _ in b.VARIANTS].count(b.ALPHA) == 1


def test_the_alpha_variant_waits_for_the_config_field():
    if "alpha" in {f.name for f in dataclasses.fields(TEDConfig)}:
        assert b.ted_config(b.ALPHA, 0.3, 0, 5).alpha == 0.5
    else:
        with pytest.raises(b.Skip, match="alpha"):
            b.ted_config(b.ALPHA, 0.3, 0, 5)


def test_matched_budget_is_the_pruned_runs_kept_counts():
    n, epochs, batch = 768, 5, 16
    for level in b.LEVELS:
        budget = b.matched_budget(level, 0, n, epochs, batch)
        assert budget % batch == 0
        # the kept counts are rounded up to whole batches: at most one batch per pruned epoch more
        assert n * epochs * (1 - level) <= budget <= n * epochs * (1 - level) + batch * (epochs - 1)
    assert b.matched_budget(0.5, 0, n, epochs, batch) < b.matched_budget(0.3, 0, n, epochs, batch)
    # all data is shared by both levels: one cell per seed
    keys = [k for k, *_ in b.cells([b.ALL, b.DEFAULT], b.LEVELS, [0, 1])]
    assert keys == ["all data|0.0|0", "ted default|0.3|0", "ted default|0.5|0", "all data|0.0|1",
                    "ted default|0.3|1", "ted default|0.5|1"]


def test_micro_run_fewer_epochs_trains_exactly_the_pruned_budget(tmp_path):
    import torch

    from ted_stream.prepare import write_mds

    h = b.Harness(vocab=64, seq_len=16, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32,
                  ft_windows=40, eval_windows=8, epochs=3, batch=8, rows=4)
    rng = np.random.default_rng(0)
    write_mds(({"tokens": rng.integers(0, 64, 16).astype(np.int32).tobytes()} for _ in range(h.ft_windows)),
              str(tmp_path / "news"))
    torch.manual_seed(0)
    b.new_model(h, 64, 0).save_pretrained(tmp_path / "model", safe_serialization=True)
    held = rng.integers(0, 64, (h.eval_windows, 16))
    runs = {v: b.finetune(v, 0.3, 0, str(tmp_path / "model"), str(tmp_path / "news"), held, str(tmp_path / v), h)
            for v in (b.FEWER, b.DEFAULT)}
    budget = b.matched_budget(0.3, 0, h.ft_windows, h.epochs, h.batch)
    assert runs[b.DEFAULT]["trained"] == budget == runs[b.FEWER]["trained"] == runs[b.FEWER]["budget"]
    fewer = [e["trained"] for e in runs[b.FEWER]["per_epoch"]]
    assert sum(fewer) == budget and fewer[:-1] == [h.ft_windows] * (len(fewer) - 1)  # whole epochs, then
    assert fewer[-1] < h.ft_windows or len(fewer) < h.epochs                        # stopped short
    assert runs[b.DEFAULT]["epochs_run"] == h.epochs
    assert runs[b.DEFAULT]["per_epoch"][0]["kept"] == h.ft_windows  # warm-up on all data
    for r in runs.values():
        assert r["saved"] == pytest.approx(1 - budget / (h.ft_windows * h.epochs))
        assert np.isfinite(r["heldout_loss"]) and r["heldout_ppl"] == pytest.approx(np.exp(r["heldout_loss"]))
