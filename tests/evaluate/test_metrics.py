"""Tests of capsmed.evaluate.metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from sklearn.metrics import f1_score, roc_auc_score

from capsmed.evaluate import metrics as M
from capsmed.evaluate.metrics import (
    CLASSIFICATION_METRIC_NAMES,
    aggregate_segmentation,
    bootstrap_classification_cis,
    bootstrap_mean_ci,
    bootstrap_metric_ci,
    bootstrap_segmentation_cis,
    classification_metrics,
    expected_calibration_error,
    nan_case_counts,
    segmentation_case_metrics,
)

# MONAI computes in float32.
approx = lambda v: pytest.approx(v, rel=1e-6, abs=1e-6)  # noqa: E731


# ------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------


def _maps_2d() -> tuple[np.ndarray, np.ndarray]:
    """4x4 maps; class 1 label 2x2 square, prediction the same square grown one column right;
    class 2 one pixel at row 0 (label) and row 3 (prediction), same column."""
    label = np.zeros((4, 4), dtype=np.int64)
    pred = np.zeros((4, 4), dtype=np.int64)
    label[1:3, 1:3] = 1
    pred[1:3, 1:4] = 1
    label[0, 0] = 2
    pred[3, 0] = 2
    return pred, label


def test_segmentation_2d_by_hand() -> None:
    pred, label = _maps_2d()
    # spacing: 2 mm between rows, 1 mm between columns.
    out = segmentation_case_metrics(pred, label, {1: "organ", 2: "spot"}, spacing=(2.0, 1.0))
    # class 1: |P|=6, |T|=4, overlap 4 -> dice 8/10. Every pixel is a surface pixel. Distances
    # P->T: four 0s and two 1 mm (the extra column); T->P: four 0s.
    # HD95 = max(q95([0,0,0,0,1,1]), q95([0,0,0,0])) = max(1, 0) = 1 (q at 4.75 between 1 and 1).
    # ASSD = (0*8 + 1 + 1) / 10 = 0.2.
    assert out["dice_organ"] == approx(0.8)
    assert out["hd95_organ"] == approx(1.0)
    assert out["assd_organ"] == approx(0.2)
    # areas: 6 and 4 pixels of 2 mm^2.
    assert out["area_mm2_organ"] == approx(12.0)
    assert out["area_true_mm2_organ"] == approx(8.0)
    assert out["area_error_mm2_organ"] == approx(4.0)
    # class 2: disjoint pixels 3 rows apart = 6 mm both ways.
    assert out["dice_spot"] == 0.0
    assert out["hd95_spot"] == approx(6.0)
    assert out["assd_spot"] == approx(6.0)
    assert out["area_error_mm2_spot"] == approx(0.0)
    # means over the foreground classes
    assert out["dice"] == approx(0.4)
    assert out["hd95"] == approx(3.5)
    assert out["assd"] == approx(3.1)
    # 2D reports areas, not volumes
    assert not any(k.startswith("volume") for k in out)
    assert all(type(v) is float for v in out.values())


def test_segmentation_spacing_follows_array_axes() -> None:
    pred, label = _maps_2d()
    out = segmentation_case_metrics(pred, label, {1: "organ", 2: "spot"}, spacing=(1.0, 2.0))
    # the extra column is now 2 mm away; the spot 3 rows = 3 mm.
    assert out["hd95_organ"] == approx(2.0)
    assert out["assd_organ"] == approx(0.4)
    assert out["hd95_spot"] == approx(3.0)


def test_segmentation_3d_by_hand_with_empty_classes() -> None:
    label = np.zeros((3, 3, 3), dtype=np.int64)
    pred = np.zeros((3, 3, 3), dtype=np.int64)
    label[1, 1, 0] = 1  # one voxel
    pred[1, 1, :] = 1  # a line of three voxels along the 2.5 mm axis
    label[0, 0, 0] = 3  # class 3 only in the label; class 2 nowhere
    names = {1: "a", 2: "b", 3: "c"}
    out = segmentation_case_metrics(pred, label, names, spacing=(1.0, 1.0, 2.5))
    # class a: dice 2*1/(3+1); P->T distances 0, 2.5, 5; T->P 0.
    # q95([0, 2.5, 5]) at position 1.9 -> 2.5 + 0.9 * 2.5 = 4.75 (the plain maximum would be 5).
    assert out["dice_a"] == approx(0.5)
    assert out["hd95_a"] == approx(4.75)
    assert out["assd_a"] == approx((0 + 2.5 + 5.0 + 0) / 4)
    # voxel = 2.5 mm^3 = 0.0025 ml
    assert out["volume_ml_a"] == approx(0.0075)
    assert out["volume_true_ml_a"] == approx(0.0025)
    assert out["volume_error_ml_a"] == approx(0.005)
    # class b: both empty -> perfect
    assert (out["dice_b"], out["hd95_b"], out["assd_b"]) == (1.0, 0.0, 0.0)
    assert out["volume_ml_b"] == 0.0
    # class c: missed entirely -> dice 0, distances undefined
    assert out["dice_c"] == 0.0
    assert math.isnan(out["hd95_c"]) and math.isnan(out["assd_c"])
    assert out["volume_error_ml_c"] == approx(-0.0025)
    # means: dice over all classes, distances nanmean
    assert out["dice"] == approx(0.5)
    assert out["hd95"] == approx((4.75 + 0.0) / 2)
    assert out["assd"] == approx((1.875 + 0.0) / 2)
    assert not any(k.startswith("area") for k in out)


def test_segmentation_false_positive_only_and_all_undefined() -> None:
    label = np.zeros((5, 6), dtype=np.int64)
    pred = np.zeros((5, 6), dtype=np.int64)
    pred[2, 2] = 1
    out = segmentation_case_metrics(pred, label, {1: "lesion"}, spacing=(1.0, 1.0))
    assert out["dice_lesion"] == 0.0 and out["dice"] == 0.0
    assert math.isnan(out["hd95_lesion"]) and math.isnan(out["hd95"])
    assert math.isnan(out["assd"])
    assert out["area_mm2_lesion"] == 1.0 and out["area_true_mm2_lesion"] == 0.0


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_segmentation_matches_monai_on_full_one_hot() -> None:
    """The per-class bounding-box crop changes nothing, objects on the image border included."""
    rng = np.random.default_rng(3)
    shape = (9, 11, 7)
    label = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    label[0:5, 2:9, 0:4] = 1  # touches three borders
    label[6:9, 5:11, 3:7] = 2
    pred[1:6, 2:8, 0:5] = 1
    pred[5:9, 6:11, 2:7] = 2
    pred[rng.random(shape) < 0.05] = 2  # speckle far from the object
    spacing = (0.8, 1.2, 3.0)
    out = segmentation_case_metrics(pred, label, {1: "x", 2: "y"}, spacing=spacing)

    def one_hot(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([a == k for k in range(3)])[None].astype(np.float32))

    p, t = one_hot(pred), one_hot(label)
    dice = compute_dice(p, t, include_background=False)[0]
    hd = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)[0]
    asd = compute_average_surface_distance(p, t, symmetric=True, spacing=spacing)[0]
    for i, name in enumerate(("x", "y")):
        assert out[f"dice_{name}"] == approx(float(dice[i]))
        assert out[f"hd95_{name}"] == approx(float(hd[i]))
        assert out[f"assd_{name}"] == approx(float(asd[i]))


def test_segmentation_accepts_integer_valued_floats() -> None:
    pred, label = _maps_2d()
    a = segmentation_case_metrics(pred, label, {1: "o"}, (1.0, 1.0))
    b = segmentation_case_metrics(pred.astype(np.float32), label.astype(np.float64), {1: "o"},
                                  (1.0, 1.0))
    assert a == b


@pytest.mark.parametrize(
    ("pred", "label", "names", "spacing", "match"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), {1: "a"}, (1.0, 1.0), "same shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {1: "a"}, (1.0, 1.0, 1.0), "spacing"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {1: "a"}, (1.0, 0.0), "spacing"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {0: "bg", 1: "a"}, (1.0, 1.0), "background"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {}, (1.0, 1.0), "at least one"),
        (np.full((4, 4), 0.5), np.zeros((4, 4)), {1: "a"}, (1.0, 1.0), "integer"),
        (np.zeros(4), np.zeros(4), {1: "a"}, (1.0,), "2D or 3D"),
    ],
)
def test_segmentation_rejects_bad_input(pred, label, names, spacing, match) -> None:
    with pytest.raises(ValueError, match=match):
        segmentation_case_metrics(pred, label, names, spacing)


def test_aggregate_segmentation_nanmean_and_counts(caplog) -> None:
    rows = [
        {"case_id": "a", "dice": 0.5, "hd95": 2.0, "prediction": "/x/a.nii.gz"},
        {"case_id": "b", "dice": 1.0, "hd95": math.nan},
        {"case_id": "c", "dice": np.float32(0.0), "hd95": 4.0},
        {"case_id": "d", "dice": 0.5, "hd95": None},
    ]
    with caplog.at_level(logging.WARNING, logger="capsmed.evaluate.metrics"):
        agg = aggregate_segmentation(rows)
    assert list(agg) == ["dice", "hd95"]  # strings dropped, order kept
    assert agg["dice"] == approx(0.5)
    assert agg["hd95"] == approx(3.0)
    assert all(type(v) is float for v in agg.values())
    assert "hd95 is undefined in 2 of 4 cases" in caplog.text
    assert nan_case_counts(rows) == {"dice": 0, "hd95": 2}
    only_nan = aggregate_segmentation([{"hd95": math.nan}])
    assert math.isnan(only_nan["hd95"])


def test_aggregate_segmentation_of_case_metrics() -> None:
    pred, label = _maps_2d()
    names = {1: "organ", 2: "spot"}
    rows = [
        segmentation_case_metrics(pred, label, names, (2.0, 1.0)),
        segmentation_case_metrics(label, label, names, (2.0, 1.0)),
    ]
    agg = aggregate_segmentation(rows)
    assert agg["dice"] == approx((0.4 + 1.0) / 2)
    assert agg["hd95_spot"] == approx(3.0)
    assert set(agg) == set(rows[0])


# ------------------------------------------------------------------------------------------
# Bootstrap of per-case means
# ------------------------------------------------------------------------------------------


def test_bootstrap_mean_ci_deterministic_and_matches_naive_loop() -> None:
    values = np.random.default_rng(0).normal(0.8, 0.1, size=40)
    lo, hi = bootstrap_mean_ci(values, n_boot=500, seed=7)
    assert (lo, hi) == bootstrap_mean_ci(values, n_boot=500, seed=7)
    assert (lo, hi) != bootstrap_mean_ci(values, n_boot=500, seed=8)
    assert lo < values.mean() < hi
    assert type(lo) is float and type(hi) is float
    rng = np.random.default_rng(7)
    means = [values[rng.integers(0, 40, 40)].mean() for _ in range(500)]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_bootstrap_block_size_does_not_change_result(monkeypatch) -> None:
    y, p = _random_task(30, 3, seed=4)
    ref = bootstrap_classification_cis(y, p, n_boot=101, seed=1)
    monkeypatch.setattr(M, "_BOOT_BLOCK_ENTRIES", 30 * 7)  # blocks of 7 resamples
    blocked = bootstrap_classification_cis(y, p, n_boot=101, seed=1)
    assert blocked.keys() == ref.keys()
    for key in ref:  # equal to the last bits a BLAS's own blocking of the sums may move
        assert blocked[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key


def test_bootstrap_mean_ci_is_scipys_percentile_bootstrap() -> None:
    from scipy.stats import bootstrap

    values = np.random.default_rng(5).normal(0.7, 0.2, size=57)
    res = bootstrap((values,), np.mean, n_resamples=300, confidence_level=0.9,
                    method="percentile", rng=np.random.default_rng(11))
    assert bootstrap_mean_ci(values, n_boot=300, seed=11, alpha=0.1) == (
        float(res.confidence_interval.low), float(res.confidence_interval.high))
    assert bootstrap_mean_ci(np.array([0.3, np.nan])) == (0.3, 0.3)  # one case: scipy needs two


def test_bootstrap_mean_ci_ignores_nan_and_edge_cases() -> None:
    values = np.array([0.1, 0.9, np.nan, 0.5, np.nan, 0.7])
    assert bootstrap_mean_ci(values, seed=3) == bootstrap_mean_ci(values[~np.isnan(values)], seed=3)
    assert bootstrap_mean_ci(np.full(5, 0.25)) == (0.25, 0.25)
    lo, hi = bootstrap_mean_ci(np.array([np.nan, np.nan]))
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean_ci(values, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_mean_ci(values, alpha=1.5)


def test_bootstrap_segmentation_cis() -> None:
    rows = [{"case_id": str(i), "dice": d, "hd95": h}
            for i, (d, h) in enumerate([(0.5, 1.0), (0.7, np.nan), (0.9, 3.0), (0.6, 2.0)])]
    cis = bootstrap_segmentation_cis(rows, n_boot=200, seed=0)
    assert set(cis) == {"dice", "hd95"}
    assert cis["dice"][0] <= 0.675 <= cis["dice"][1]
    assert cis["hd95"] == list(bootstrap_mean_ci(np.array([1.0, 3.0, 2.0]), n_boot=200, seed=0))


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------

# Binary: confidences 0.95, 0.85, 0.65, 0.55 (away from the bin edges); predictions 1, 1, 0, 1.
Y_BIN = np.array([1, 0, 0, 0])
P_BIN = np.array([[0.05, 0.95], [0.15, 0.85], [0.65, 0.35], [0.45, 0.55]])


def test_binary_classification_by_hand() -> None:
    out = classification_metrics(Y_BIN, P_BIN, n_bins=10)
    # rows true, columns predicted: true 0 -> predicted 0 once, 1 twice; true 1 -> predicted 1.
    assert out["confusion_matrix"] == [[1, 2], [0, 1]]
    m = out["metrics"]
    assert list(m) == list(CLASSIFICATION_METRIC_NAMES)
    assert m["accuracy"] == approx(0.5)
    assert m["sensitivity"] == approx(1.0)  # TP 1 / (TP 1 + FN 0)
    assert m["specificity"] == approx(1 / 3)  # TN 1 / (TN 1 + FP 2)
    assert m["balanced_accuracy"] == approx((1.0 + 1 / 3) / 2)
    assert m["f1"] == approx(2 * 1 / (2 * 1 + 2 + 0))
    assert m["auc"] == approx(1.0)  # the one positive scores above every negative
    # one case per bin: (|1-.95| + |0-.85| + |1-.65| + |0-.55|) / 4
    assert m["ece"] == approx(1.8 / 4)
    assert out["roc"]["fpr"] == [0.0, 0.0, 1.0]
    assert out["roc"]["tpr"] == [0.0, 1.0, 1.0]
    assert out["roc"]["thresholds"][0] is None  # +inf in scikit-learn
    assert out["pr"]["recall"][0] == 1.0 and out["pr"]["precision"][-1] == 1.0
    json.dumps({k: v for k, v in out.items() if k != "metrics"}, allow_nan=False)


def test_ece_and_reliability_two_bins_by_hand() -> None:
    out = classification_metrics(Y_BIN, P_BIN, n_bins=2)
    # all four confidences fall in (0.5, 1]: accuracy 2/4, mean confidence 3.0/4
    assert out["reliability"]["bin_count"] == [0, 4]
    assert out["reliability"]["bin_confidence"][0] is None
    assert out["reliability"]["bin_accuracy"][0] is None
    assert out["reliability"]["bin_confidence"][1] == approx(0.75)
    assert out["reliability"]["bin_accuracy"][1] == approx(0.5)
    assert out["metrics"]["ece"] == approx(0.25)
    assert expected_calibration_error(Y_BIN, P_BIN, n_bins=2) == approx(0.25)
    assert expected_calibration_error(Y_BIN, P_BIN) == approx(0.45)


# Three classes, each recalled once out of two.
Y_MC = np.array([0, 0, 1, 1, 2, 2])
P_MC = np.array([
    [0.7, 0.2, 0.1],  # -> 0 right
    [0.3, 0.6, 0.1],  # -> 1 wrong
    [0.1, 0.8, 0.1],  # -> 1 right
    [0.2, 0.3, 0.5],  # -> 2 wrong
    [0.1, 0.1, 0.8],  # -> 2 right
    [0.5, 0.2, 0.3],  # -> 0 wrong
])


def test_multiclass_classification_by_hand() -> None:
    out = classification_metrics(Y_MC, P_MC)
    assert out["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    m = out["metrics"]
    assert m["accuracy"] == approx(0.5)
    assert m["balanced_accuracy"] == approx(0.5)
    assert m["sensitivity"] == approx(0.5)  # recall 1/2 for every class
    # every class: TN = 6 - 2 - 2 + 1 = 3 of 4 negatives
    assert m["specificity"] == approx(0.75)
    assert m["f1"] == approx(0.5)  # 2*1 / (2 + 2) for every class
    # one-vs-rest: the higher positive beats all 4 negatives, the lower one beats 3 -> 7/8 each
    assert m["auc"] == approx(7 / 8)
    assert m["auc"] == approx(roc_auc_score(Y_MC, P_MC, multi_class="ovr", average="macro"))
    # confidences .7 .6 .8 .5 .8 .5 sit on bin edges: (k/10, (k+1)/10] -> bins 6 5 7 4 7 4
    assert out["reliability"]["bin_count"] == [0, 0, 0, 0, 2, 1, 1, 2, 0, 0]
    assert m["ece"] == approx((2 * 0.5 + 0.6 + 0.3 + 2 * 0.2) / 6)
    assert "roc" not in out and "pr" not in out


def test_one_class_auc_is_nan_with_warning(caplog) -> None:
    y = np.zeros(5, dtype=int)
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.7, 0.3], [0.6, 0.4]])
    with caplog.at_level(logging.WARNING, logger="capsmed.evaluate.metrics"):
        out = classification_metrics(y, p)
    m = out["metrics"]
    assert math.isnan(m["auc"])
    assert "AUC is undefined" in caplog.text
    assert math.isnan(m["sensitivity"])  # no positives
    assert m["specificity"] == approx(0.8)
    assert m["f1"] == approx(0.0)  # one false positive, no true positive
    assert m["balanced_accuracy"] == approx(0.8)
    assert "roc" not in out and "pr" not in out
    # f1 undefined when class 1 is neither true nor predicted
    assert math.isnan(classification_metrics(y, np.tile([0.9, 0.1], (5, 1)))["metrics"]["f1"])
    # multi-class with one class present
    p3 = np.tile([0.2, 0.5, 0.3], (4, 1))
    assert math.isnan(classification_metrics(np.ones(4, dtype=int), p3)["metrics"]["auc"])


def test_multiclass_auc_skips_absent_classes() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    auc = classification_metrics(y, p)["metrics"]["auc"]
    assert auc == approx(np.mean([roc_auc_score(y == 0, p[:, 0]), roc_auc_score(y == 1, p[:, 1])]))


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        (np.array([0, 1]), np.array([0.2, 0.8]), "shape"),
        (np.array([0, 1]), np.array([[1.0], [1.0]]), "C >= 2"),
        (np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), "cases"),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]), "range"),
        (np.array([0, 0.5]), np.array([[0.5, 0.5], [0.5, 0.5]]), "integer"),
        (np.array([0, 1]), np.array([[1.5, -0.5], [0.5, 0.5]]), r"\[0, 1\]"),
        (np.array([], dtype=int), np.zeros((0, 2)), "at least one"),
    ],
)
def test_classification_rejects_bad_input(y, p, match) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p)


# ------------------------------------------------------------------------------------------
# Bootstrap of classification metrics
# ------------------------------------------------------------------------------------------


def _random_task(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative probabilities, rounded to 2 decimals so that scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p = np.round(p, 2)
    p[:, -1] = 1.0 - p[:, :-1].sum(axis=1)
    return y, np.clip(p, 0.0, 1.0)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_vectorised_metrics_match_point_estimates(n_classes: int) -> None:
    """The bootstrap's weighted formulas equal scikit-learn's point values at unit weights, and
    the values of an explicitly resampled data set at its multiplicities."""
    y, p = _random_task(60, n_classes, seed=n_classes)
    names = CLASSIFICATION_METRIC_NAMES
    point = classification_metrics(y, p)["metrics"]
    weighted = M._weighted_classification_metrics(y, p, np.ones((1, y.size)), names)
    for name in names:
        assert weighted[name][0] == approx(point[name]), name
    idx = np.random.default_rng(0).integers(0, y.size, (3, y.size))
    weights = M._indices_to_weights(idx, y.size)
    multi = M._weighted_classification_metrics(y, p, weights, names)
    for b in range(3):
        resampled = classification_metrics(y[idx[b]], p[idx[b]])["metrics"]
        for name in names:
            assert multi[name][b] == approx(resampled[name]), (name, b)
    average = "binary" if n_classes == 2 else "macro"
    assert point["f1"] == approx(f1_score(y, p.argmax(1), average=average))


def test_bootstrap_metric_ci_contains_estimate_and_is_deterministic() -> None:
    y, p = _random_task(200, 2, seed=11)
    point = classification_metrics(y, p)["metrics"]
    cis = bootstrap_classification_cis(y, p, n_boot=300, seed=5)
    for name in CLASSIFICATION_METRIC_NAMES:
        lo, hi = cis[name]
        assert lo <= point[name] <= hi, name
        assert lo < hi
        assert (lo, hi) == bootstrap_metric_ci(y, p, name, n_boot=300, seed=5)
    assert bootstrap_metric_ci(y, p, "auc", n_boot=300, seed=6) != tuple(cis["auc"])
    json.dumps(cis, allow_nan=False)


def test_bootstrap_metric_ci_skips_undefined_resamples() -> None:
    # one positive in 12 cases: about a third of the resamples lack it, AUC undefined there
    y = np.array([1] + [0] * 11)
    s = np.linspace(0.05, 0.6, 12)
    s[0] = 0.5
    p = np.stack([1 - s, s], axis=1)
    lo, hi = bootstrap_metric_ci(y, p, "auc", n_boot=400, seed=0)
    assert 0.0 <= lo <= hi <= 1.0
    lo, hi = bootstrap_metric_ci(np.zeros(6, dtype=int), p[:6], "auc", n_boot=50)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="unknown metrics"):
        bootstrap_metric_ci(y, p, "precision")


def _sklearn_auc(y: np.ndarray, p: np.ndarray) -> float:
    """scikit-learn's ROC AUC as documented: binary on class 1, else macro one-vs-rest over the
    classes present; NaN with fewer than two classes."""
    present = np.unique(y)
    if present.size < 2:
        return math.nan
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fast_auc_bootstrap_equals_scikit_learn_on_every_resample(n_classes: int) -> None:
    """The paired (Mann-Whitney, case-weight) AUC of each resample is scikit-learn's AUC of that
    resample, so the interval is the percentile interval of scikit-learn's AUCs."""
    y, p = _random_task(60, n_classes, seed=3)
    idx = np.concatenate(list(M._resample_blocks(y.size, 200, 9)))
    reference = np.array([_sklearn_auc(y[i], p[i]) for i in idx])
    fast = M._weighted_classification_metrics(y, p, M._indices_to_weights(idx, y.size), ["auc"])
    np.testing.assert_allclose(fast["auc"], reference, rtol=0, atol=1e-12)
    finite = reference[np.isfinite(reference)]
    lo, hi = bootstrap_metric_ci(y, p, "auc", n_boot=200, seed=9)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(finite, [2.5, 97.5])), abs=1e-12)


def test_ece_matches_monai_calibration_error_metric() -> None:
    """Top-label ECE = MONAI's expected calibration error of the confidence against
    correctness (MONAI bins in float32)."""
    from monai.metrics import CalibrationErrorMetric

    y, p = _random_task(300, 3, seed=6)
    conf = torch.tensor(p.max(axis=1))[None, None]
    correct = torch.tensor((p.argmax(axis=1) == y).astype(float))[None, None]
    metric = CalibrationErrorMetric(num_bins=10, right=True)
    metric(y_pred=conf, y=correct)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(
        float(metric.aggregate()), abs=1e-6)


def test_multiclass_sensitivity_and_specificity_are_the_worst_class() -> None:
    """Each key means something of its own: balanced accuracy is the mean recall, sensitivity
    the lowest recall, specificity the lowest one-vs-rest specificity."""
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 0, 1, 0, 2, 2, 2, 1])  # recalls 1, 1/2, 3/4
    p = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = classification_metrics(y, p)["metrics"]
    assert m["balanced_accuracy"] == approx((1 + 0.5 + 0.75) / 3)
    assert m["sensitivity"] == approx(0.5)
    # specificity per class: 5/6 (class 0: one of 6 negatives called 0), 7/8, 6/6
    assert m["specificity"] == approx(5 / 6)
    assert m["sensitivity"] != m["balanced_accuracy"]
    w = M._weighted_classification_metrics(y, p, np.ones((1, y.size)),
                                           ["sensitivity", "specificity"])
    assert w["sensitivity"][0] == approx(0.5) and w["specificity"][0] == approx(5 / 6)


def test_auc_bootstrap_is_much_faster_than_scikit_learn_per_resample() -> None:
    """A ratio, not a wall-clock limit: the vectorised bootstrap against a loop over
    scikit-learn on the same 300 cases and resamples (about 250x on an idle machine)."""
    y, p = _random_task(300, 3, seed=2)
    n_boot = 200
    start = time.perf_counter()
    bootstrap_metric_ci(y, p, "auc", n_boot=n_boot)
    fast = time.perf_counter() - start
    idx = np.concatenate(list(M._resample_blocks(y.size, n_boot, 0)))
    start = time.perf_counter()
    for i in idx:
        _sklearn_auc(y[i], p[i])
    slow = time.perf_counter() - start
    assert slow / fast > 10, (slow, fast)
