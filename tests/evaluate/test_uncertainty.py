"""TTA uncertainty summaries and the calibration of the flagging thresholds on validation cases."""

import numpy as np
import pytest

from capsmed.evaluate.uncertainty import calibrate, case_uncertainty, tta_cost


def _case(rng, error_entropy: float, shape=(20, 20, 10)):
    label = np.zeros(shape, np.uint8)
    label[5:15, 5:15, 2:8] = 1
    pred = label.copy()
    pred[5:7] = 0  # a wrong band
    entropy = rng.uniform(0.0, 0.2, shape).astype(np.float32)
    entropy[5:7] = rng.uniform(error_entropy - 0.1, error_entropy + 0.1, (2, *shape[1:]))
    return entropy, pred, label


def test_case_uncertainty_columns():
    rng = np.random.default_rng(0)
    entropy, pred, label = _case(rng, 0.7)
    counts = np.array([[3000, 480], [2990, 490], [3010, 470]])
    row = case_uncertainty(entropy, pred, label, counts, 0.002, {1: "tumour"})
    assert row["uncertainty_mean"] == pytest.approx(float(entropy[pred > 0].mean()), abs=1e-6)
    assert row["volume_spread_ml_tumour"] == pytest.approx(20 * 0.002)
    assert sum(row["_entropy_hist_error"]) == int((pred != label).sum())
    assert sum(row["_entropy_hist_correct"]) == int(((pred > 0) | (label > 0)).sum()
                                                    - (pred != label).sum())
    assert case_uncertainty(None, pred, label, counts, 0.002, {1: "tumour"}) == {"nothing_found": 0}
    single = case_uncertainty(entropy, pred, None, counts[:1], 0.002, {1: "tumour"})
    assert "volume_spread_ml_tumour" not in single and "_entropy_hist_error" not in single


def test_calibration_separates_wrong_from_right_voxels():
    rng = np.random.default_rng(1)
    rows = [case_uncertainty(*_case(rng, e), np.array([[1, 1]]), 1.0, {1: "x"})
            for e in (0.6, 0.7, 0.8)]
    cal = calibrate(rows)
    assert 0.3 <= cal["voxel_threshold"] <= 0.4  # the middle of the gap between the two ranges
    assert cal["voxel_auc"] == pytest.approx(1.0) and cal["youden_j"] == pytest.approx(1.0)
    assert cal["study_threshold"] == pytest.approx(max(r["uncertainty_mean"] for r in rows))
    assert cal["n_cases"] == 3
    # entropy that says nothing about errors: AUC near 0.5
    noisy = []
    for _ in range(3):
        entropy, pred, label = _case(rng, 0.1)
        noisy.append(case_uncertainty(entropy, pred, label, np.array([[1, 1]]), 1.0, {1: "x"}))
    assert abs(calibrate(noisy)["voxel_auc"] - 0.5) < 0.1
    assert calibrate([{"case_id": "a"}]) is None
    # the same entropy for wrong and right voxels: no threshold, but still a study threshold
    same = [{"_entropy_hist_error": [0] * 50 + [5] * 50, "_entropy_hist_correct": [0] * 50 +
             [5] * 50, "uncertainty_mean": 0.8}]
    useless = calibrate(same)
    assert useless["voxel_threshold"] is None and useless["youden_j"] == 0.0
    assert useless["study_threshold"] == 0.8 and useless["voxel_auc"] == pytest.approx(0.5)


def test_tta_cost():
    cost = tta_cost([[1.0, 1.1, 0.9, 1.0], [2.0, 2.0, 2.0, 2.0], None])
    assert cost == {"tta_passes": 4, "tta_extra_seconds_per_case": 4.5, "tta_time_factor": 4.0}
    assert tta_cost([None]) == {}


def test_a_miss_is_flagged_and_measured_where_the_structure_usually_lies():
    from capsmed.data.fingerprint import relative_box
    from capsmed.evaluate.uncertainty import case_uncertainty, expected_region

    train = np.zeros((10, 10, 10), bool)
    train[2:4, 5:8, 0:10] = True
    box = relative_box(train)
    assert box == [[0.2, 0.4], [0.5, 0.8], [0.0, 1.0]]
    # a study of another size: the same fractions of its extent
    region = expected_region([box, None], (20, 10, 5))
    assert region.sum() == 4 * 3 * 5 and region[4:8, 5:8, :].all()
    entropy = np.zeros((20, 10, 5), np.float32)
    entropy[region] = 0.6  # uncertain where the structure should be, certain background elsewhere
    pred = np.zeros((20, 10, 5), np.uint8)
    counts = np.array([[1000, 0]])
    row = case_uncertainty(entropy, pred, None, counts, 0.001, {1: "a"}, region)
    assert row["nothing_found"] == 1 and row["uncertainty_region"] == "expected region"
    assert row["uncertainty_mean"] == pytest.approx(0.6)
    # no training box: the image's foreground; neither: the whole image, said so
    body = np.zeros_like(region)
    body[:10] = True
    row = case_uncertainty(entropy, pred, None, counts, 0.001, {1: "a"}, None, body)
    assert row["uncertainty_region"] == "image foreground"
    assert row["uncertainty_mean"] == pytest.approx(entropy[body].mean())
    row = case_uncertainty(entropy, pred, None, counts, 0.001, {1: "a"})
    assert row["uncertainty_region"] == "whole image"
    found = pred.copy()
    found[0, 0, 0] = 1
    row = case_uncertainty(entropy, found, None, counts, 0.001, {1: "a"}, region)
    assert row["nothing_found"] == 0 and row["uncertainty_region"] == "predicted structures"
    assert case_uncertainty(None, pred, None, counts, 0.001, {1: "a"}) == {"nothing_found": 1}
    assert relative_box(np.zeros((3, 3), bool)) is None
