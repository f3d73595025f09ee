"""Small numpy summaries that reports draw when metrics.json lacks them (no scikit-learn, no torch).

The numbers in a report's headline table always come from ``metrics.json`` (written by
:mod:`capsmed.evaluate`); these functions only fill in plots, e.g. one-vs-rest ROC curves for
multiclass tasks, which ``metrics.json`` stores for binary tasks only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from capsmed.measures import ece_from_table, reliability_table


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Receiver operating characteristic of a binary problem.

    Args:
        y_true: ``(N,)`` 0/1 (or boolean) ground truth.
        score: ``(N,)`` scores, higher meaning more likely positive.

    Returns:
        ``(fpr, tpr)``, each ``(T + 1,)`` for ``T`` distinct thresholds, starting at ``(0, 0)`` and
        ending at ``(1, 1)``. With no positives (or no negatives) the rates on that axis are 0.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=float).ravel()
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1] if y.size else np.array([], int)
    tps = np.cumsum(y)[distinct] if y.size else np.array([])
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 0), max(int((~y).sum()), 0)
    tpr = np.r_[0.0, tps / pos] if pos else np.zeros(tps.size + 1)
    fpr = np.r_[0.0, fps / neg] if neg else np.zeros(fps.size + 1)
    return fpr, tpr


def pr_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of a binary problem.

    Args:
        y_true: ``(N,)`` 0/1 ground truth.
        score: ``(N,)`` scores, higher meaning more likely positive.

    Returns:
        ``(recall, precision)``, starting at recall 0 with precision 1.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=float).ravel()
    if not y.size:
        return np.array([0.0]), np.array([1.0])
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct].astype(float)
    predicted = (distinct + 1).astype(float)
    pos = float(y.sum())
    recall = tps / pos if pos else np.zeros_like(tps)
    precision = tps / predicted
    return np.r_[0.0, recall], np.r_[1.0, precision]


def area(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under a curve given by points ``(x, y)`` (x non-decreasing)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2:
        return float("nan")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Step-wise average precision: sum over thresholds of (R_n - R_{n-1}) P_n."""
    recall = np.asarray(recall, dtype=float)
    precision = np.asarray(precision, dtype=float)
    if recall.size < 2:
        return float("nan")
    return float(np.sum(np.diff(recall) * precision[1:]))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts, rows = true class, columns = predicted class.

    Entries outside ``[0, n_classes)`` are ignored.
    """
    t = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_pred, dtype=float).ravel()
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok].astype(int), p[ok].astype(int)
    ok = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    cm = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(cm, (t[ok], p[ok]), 1)
    return cm


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
