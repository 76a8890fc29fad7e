"""EpochMask owns its bits: weights, restriction to a subset and back, one byte record."""
import numpy as np
import pytest

from ted_stream.mask import EpochMask
from ted_stream.table import ScoreTable


def mask(n=37, seed=0, base=1.0, epoch=4):
    rng = np.random.default_rng(seed)
    keep = rng.random(n) < 0.6
    boost = keep & (rng.random(n) < 0.5)
    return EpochMask.from_bools(epoch, keep, boost, 2.5, requested=11, base_weight=base)


@pytest.mark.parametrize("base", [1.0, 1.25])
def test_weights_scalar_and_vector_agree(base):
    m = mask(base=base)
    ids = np.arange(m.num_samples)
    w = m.weights(ids)
    assert [m.weight_of(i) for i in ids] == w.tolist()
    boost = m.boost_bools()
    assert set(w[boost]) == {np.float32(2.5)} and set(w[~boost]) == {np.float32(base)}
    assert m.reweights


def test_restrict_then_expand_is_the_mask_on_the_subset():
    m = mask(50)
    ids = np.array([1, 4, 5, 9, 30, 49])
    sub = m.restrict(ids)
    assert sub.num_samples == 6 and sub.bools().tolist() == m.bools()[ids].tolist()
    back = sub.expand(ids, 50)
    assert back.bools().tolist() == [bool(m.bools()[i]) and i in ids for i in range(50)]
    assert back.weights(ids).tolist() == m.weights(ids).tolist()


def test_bytes_round_trip_and_refuse_a_wrong_size():
    for m in (mask(base=1.5), EpochMask.everything(2, 9, requested=3)):
        back = EpochMask.from_bytes(m.epoch, m.to_bytes(), m.num_samples)
        assert (back.crc, back.boost_weight, back.base_weight, back.requested) == \
               (m.crc, m.boost_weight, m.base_weight, m.requested)
    with pytest.raises(ValueError, match="does not fit 200 samples"):
        EpochMask.from_bytes(0, mask().to_bytes(), 200)


def test_table_file_keeps_the_base_weight(tmp_path):
    t = ScoreTable(37, {"digest": "a" * 64})
    t.masks[4] = mask(base=1.75)
    t.masks[5] = mask(seed=1, epoch=5)
    t.save(str(tmp_path / "t.tedt"))
    back = ScoreTable.load(str(tmp_path / "t.tedt"))
    assert back.masks[4].base_weight == 1.75 and back.masks[5].base_weight == 1.0
    assert back.masks[4].weights(np.arange(37)).tolist() == t.masks[4].weights(np.arange(37)).tolist()
