"""capsmed.measures: the one home of entropy, calibration error and AUC."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from capsmed.measures import ece_from_table, normalised_entropy, reliability_table, roc_auc


def test_normalised_entropy_of_a_map():
    ent = normalised_entropy(np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]]))
    np.testing.assert_allclose(ent, [0.0, np.log(2) / np.log(3), 1.0], atol=1e-6)
    assert ent.dtype == np.float32


def test_normalised_entropy_of_one_study_and_one_class():
    assert float(normalised_entropy(np.array([0.25] * 4))) == pytest.approx(1.0)
    assert float(normalised_entropy(np.array([1.0, 0.0]))) == pytest.approx(0.0, abs=1e-9)
    assert float(normalised_entropy(np.array([1.0]))) == 0.0
    # classes on another axis: (S, C)
    ent = normalised_entropy(np.array([[0.5, 0.5], [1.0, 0.0]]), axis=1)
    np.testing.assert_allclose(ent, [1.0, 0.0], atol=1e-6)


def test_ece_of_the_table_is_the_ece_of_the_cases():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200)
    correct = (rng.uniform(size=200) < conf - 0.1).astype(float)
    ece, table = reliability_table(conf, correct, 10)
    direct = sum(abs(correct[m].mean() - conf[m].mean()) * m.sum()
                 for m in [(conf > k / 10) & (conf <= (k + 1) / 10) for k in range(10)] if m.any())
    assert ece == pytest.approx(direct / 200)
    assert ece_from_table(table) == pytest.approx(ece, abs=1e-12)
    assert math.isnan(ece_from_table({"bin_confidence": [], "bin_accuracy": [], "bin_count": []}))


def test_roc_auc_binary_multiclass_and_single_class():
    y = np.array([0, 1, 1, 0, 2, 2])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.3, .4, .3], [.5, .2, .3], [.1, .1, .8], [.2, .3, .5]])
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in range(3)])
    assert roc_auc(y, p) == pytest.approx(expected)
    yb = np.array([0, 1, 1, 0])
    pb = np.array([[.9, .1], [.4, .6], [.3, .7], [.6, .4]])
    assert roc_auc(yb, pb) == 1.0
    assert math.isnan(roc_auc(np.zeros(3, int), pb[:3]))
