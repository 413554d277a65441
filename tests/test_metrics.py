import numpy as np
import pytest
import torch

from neuralfield_reg.metrics import (dice, folding_fraction, inverse_consistency_error, mean_dice,
                                     target_registration_error)


def test_dice_per_label():
    a = np.array([[0, 1, 1], [2, 2, 0]])
    b = np.array([[0, 1, 0], [2, 2, 2]])
    scores = dice(a, b)
    assert scores[1] == pytest.approx(2 * 1 / 3)
    assert scores[2] == pytest.approx(2 * 2 / 5)
    assert mean_dice(a, b) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert dice(a, a) == {1: 1.0, 2: 1.0}
    assert mean_dice(torch.tensor(a), torch.tensor(b)) == pytest.approx(mean_dice(a, b))
    with pytest.raises(ValueError, match="shapes"):
        dice(a, b[:1])


@pytest.mark.parametrize("kind", ["int16", "float32", "negative", "large"])
def test_dice_counts_match_a_label_by_label_reference(kind):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 12, (9, 8, 7))
    b = np.where(rng.random(a.shape) < 0.3, rng.integers(0, 12, a.shape), a)
    a, b = {"int16": (a.astype(np.int16), b.astype(np.int16)), "float32": (a.astype(np.float32), b.astype(np.float32)),
            "negative": (a - 5, b - 5), "large": (a * 10**7, b * 10**7)}[kind]
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    expected = {int(v): 2.0 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels}
    got = dice(a, b)
    assert got.keys() == expected.keys()
    for label, value in expected.items():
        assert got[label] == pytest.approx(value, abs=1e-12)
    some = [labels[0], labels[-1], 123456]                            # a label in neither map is left out
    assert dice(a, b, some) == {int(v): expected[int(v)] for v in some[:2]}


def test_folding_fraction_and_norm():
    assert folding_fraction(np.array([1.0, 0.5, 0.0, -1.0])) == 0.5
    residual = np.array([[3.0, 4.0], [0.0, 1.0]])
    assert inverse_consistency_error(residual) == pytest.approx(3.0)
    assert inverse_consistency_error(residual, spacing=(1.0, 2.0)) == pytest.approx((np.hypot(3, 8) + 2) / 2)
    with pytest.raises(ValueError, match="residual"):
        inverse_consistency_error(np.zeros((0, 2)))


def test_target_registration_error_uses_spacing():
    mapped = np.array([[0.0, 0.0], [1.0, 1.0]])
    target = np.array([[3.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(target_registration_error(mapped, target), [5.0, 0.0])
    np.testing.assert_allclose(target_registration_error(mapped, target, spacing=(2.0, 1.0)), [np.hypot(6, 4), 0.0])
