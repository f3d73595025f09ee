"""Summaries that reports draw when metrics.json lacks them (no torch; scikit-learn imported lazily).

The numbers in a report's headline table always come from ``metrics.json`` (written by
:mod:`capsmed.evaluate`); these functions only fill in plots, e.g. one-vs-rest ROC curves for
multiclass tasks, which ``metrics.json`` stores for binary tasks only.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from capsmed.measures import ece_from_table, reliability_table


def _finite_pairs(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, s)`` as ``(N,)`` int 0/1 and float arrays, pairs with a non-finite score left out."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=float).ravel()
    ok = np.isfinite(s)
    return y[ok].astype(int), s[ok]


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Receiver operating characteristic of a binary problem (scikit-learn's ``roc_curve``).

    Every threshold is kept (``drop_intermediate=False``), as in the ``roc`` of ``metrics.json``.

    Args:
        y_true: ``(N,)`` 0/1 (or boolean) ground truth.
        score: ``(N,)`` scores, higher meaning more likely positive; non-finite ones are left out.

    Returns:
        ``(fpr, tpr)``, each ``(T + 1,)`` for ``T`` distinct thresholds, starting at ``(0, 0)`` and
        ending at ``(1, 1)``. With no positives (or no negatives) the rates on that axis are 0
        (scikit-learn says NaN).
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, s = _finite_pairs(y_true, score)
    if not y.size:
        return np.zeros(1), np.zeros(1)
    with warnings.catch_warnings():  # no positives / negatives: handled below
        warnings.simplefilter("ignore")
        fpr, tpr, _ = sk_roc_curve(y, s, pos_label=1, drop_intermediate=False)
    return np.nan_to_num(fpr, nan=0.0), np.nan_to_num(tpr, nan=0.0)


def pr_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of a binary problem (scikit-learn's ``precision_recall_curve``).

    Every threshold is kept (``drop_intermediate=False``), in order of increasing recall.

    Args:
        y_true: ``(N,)`` 0/1 ground truth.
        score: ``(N,)`` scores, higher meaning more likely positive; non-finite ones are left out.

    Returns:
        ``(recall, precision)``, each ``(T + 1,)`` for ``T`` distinct thresholds, starting at
        recall 0 with precision 1. With no positives the recall is 0 throughout (scikit-learn
        says 1).
    """
    from sklearn.metrics import precision_recall_curve

    y, s = _finite_pairs(y_true, score)
    if not y.size:
        return np.array([0.0]), np.array([1.0])
    with warnings.catch_warnings():  # no positives: handled below
        warnings.simplefilter("ignore")
        precision, recall, _ = precision_recall_curve(y, s, pos_label=1, drop_intermediate=False)
    if not y.any():
        recall = np.zeros_like(recall)
    return recall[::-1].copy(), precision[::-1].copy()


def area(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under a curve given by points ``(x, y)`` (x non-decreasing)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2:
        return float("nan")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision, scikit-learn's ``average_precision_score``: sum_n (R_n - R_{n-1}) P_n.

    The step-wise area under :func:`pr_curve` (no interpolation).

    Args:
        y_true: ``(N,)`` 0/1 ground truth.
        score: ``(N,)`` scores, higher meaning more likely positive; non-finite ones are left out.

    Returns:
        The average precision; 0 with no positives, NaN with no (finite) cases.
    """
    from sklearn.metrics import average_precision_score

    y, s = _finite_pairs(y_true, score)
    if not y.size:
        return float("nan")
    if not y.any():
        return 0.0
    return float(average_precision_score(y, s, pos_label=1))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts, rows = true class, columns = predicted class.

    scikit-learn's ``confusion_matrix`` with labels ``range(n_classes)``. Entries are truncated to
    integers; pairs with a non-finite entry or one outside ``[0, n_classes)`` are ignored.
    """
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    t = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_pred, dtype=float).ravel()
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok].astype(int), p[ok].astype(int)
    ok = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    if not ok.any():
        return np.zeros((n_classes, n_classes), dtype=int)
    return sk_confusion_matrix(t[ok], p[ok], labels=list(range(n_classes))).astype(int)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10
                     ) -> dict[str, list[Any]]:
    """Calibration table over equal-width confidence bins, binned as the ECE of ``metrics.json``.

    Args:
        confidence: ``(N,)`` confidence of the predicted class, in [0, 1].
        correct: ``(N,)`` 1 where the prediction was right.
        n_bins: Number of bins over [0, 1].

    Returns:
        ``{"bin_confidence", "bin_accuracy", "bin_count"}`` lists of length ``n_bins`` (mean
        confidence and accuracy per bin, None for empty bins), the layout of ``metrics.json``
        (:func:`capsmed.measures.reliability_table`). Non-finite entries are left out.
    """
    conf = np.clip(np.asarray(confidence, dtype=float).ravel(), 0.0, 1.0)
    corr = np.asarray(correct, dtype=float).ravel()
    ok = np.isfinite(conf) & np.isfinite(corr)
    return reliability_table(conf[ok], corr[ok], n_bins)[1]


def expected_calibration_error(bins: dict[str, list[float]]) -> float:
    """ECE from a reliability table (:func:`capsmed.measures.ece_from_table`)."""
    return ece_from_table(bins)
