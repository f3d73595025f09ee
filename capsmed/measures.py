"""Measures shared by training, inference, evaluation and the pages: one home for each formula.

Numpy only (scikit-learn imported lazily), at the bottom of the package's floors, so that
:mod:`capsmed.train` (validation AUC), :mod:`capsmed.infer` (uncertainty maps),
:mod:`capsmed.evaluate` (metrics) and :mod:`capsmed.report` (which loads no torch) compute each
one the same way:

- :func:`normalised_entropy`: the uncertainty of class probabilities, 0 certain to 1 even;
- :func:`confidence_bins`, :func:`reliability_table`, :func:`ece_from_table`: the expected
  calibration error and the reliability diagram;
- :func:`roc_auc`: the ROC AUC of validation and evaluation.

Confidence bins: Bin ``k`` of ``n_bins`` equal-width bins holds the
confidences in ``(k/n_bins, (k+1)/n_bins]``; bin 0 also holds 0. This is the binning of
``monai.metrics.CalibrationErrorMetric``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def normalised_entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Entropy of class probabilities divided by ``log C``: 0 certain, 1 evenly spread.

    Probabilities are clipped to ``[1e-12, 1]`` before the logarithm, so a certain prediction has
    entropy 0 (to 1e-10) and the value is always finite.

    Args:
        probs: Probabilities with the classes along ``axis``: ``(C, *S)`` for a map, ``(C,)`` for
            one study.
        axis: The class axis.

    Returns:
        float32 array without the class axis (0-d for a vector), in [0, 1]; 0 with one class.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    n = p.shape[axis]
    h = -(p * np.log(p)).sum(axis=axis)
    return (h / np.log(n) if n > 1 else np.zeros_like(h)).clip(0.0, 1.0).astype(np.float32)


def confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each confidence: bin k holds ``(k/n_bins, (k+1)/n_bins]`` (bin 0 also 0).

    Args:
        confidence: (N,) values in [0, 1].
        n_bins: number of equal-width bins (>= 1).

    Returns:
        (N,) int64 bin indices in ``range(n_bins)``.

    Raises:
        ValueError: ``n_bins < 1``.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    inner_edges = np.linspace(0.0, 1.0, int(n_bins) + 1)[1:-1]
    return np.searchsorted(inner_edges, confidence, side="left").astype(np.int64)


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int
                      ) -> tuple[float, dict[str, list[Any]]]:
    """The expected calibration error and the reliability-diagram table.

    ``ECE = sum_k (n_k / N) * |accuracy_k - confidence_k|`` over the bins of
    :func:`confidence_bins`.

    Args:
        confidence: (N,) confidence of the predicted class, in [0, 1].
        correct: (N,) 1 where the prediction was right, else 0.
        n_bins: number of equal-width bins (>= 1).

    Returns:
        ``(ece, {"bin_confidence", "bin_accuracy", "bin_count"})``, each list ``n_bins`` long
        (the layout of ``metrics.json``); mean confidence and accuracy are None for empty bins.
        The ECE is NaN without cases.

    Raises:
        ValueError: ``n_bins < 1`` or inputs of different lengths.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence has {conf.size} values but correct has {corr.size}")
    bins = confidence_bins(conf, n_bins)
    count = np.bincount(bins, minlength=int(n_bins)).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=int(n_bins))
    corr_sum = np.bincount(bins, weights=corr, minlength=int(n_bins))
    # the same sum as ece_from_table, from the sums (no rounding through the bin means)
    ece = float(np.abs(corr_sum - conf_sum).sum() / conf.size) if conf.size else float("nan")
    empty = count == 0
    safe = np.where(empty, 1.0, count)
    table = {
        "bin_confidence": [None if e else float(v)
                           for e, v in zip(empty, conf_sum / safe, strict=True)],
        "bin_accuracy": [None if e else float(v)
                         for e, v in zip(empty, corr_sum / safe, strict=True)],
        "bin_count": [int(c) for c in count],
    }
    return ece, table


def ece_from_table(table: Mapping[str, list[Any]]) -> float:
    """The expected calibration error of a reliability table.

    ``ECE = sum_k (n_k / N) |accuracy_k - confidence_k|``, the count-weighted mean over the
    non-empty bins of :func:`reliability_table`'s table (as ``metrics.json`` stores it).

    Args:
        table: ``{"bin_confidence", "bin_accuracy", "bin_count"}`` lists of one length.

    Returns:
        The ECE; NaN for an empty or malformed table.
    """
    conf = np.asarray([np.nan if v is None else v for v in table.get("bin_confidence", [])],
                      dtype=float)
    acc = np.asarray([np.nan if v is None else v for v in table.get("bin_accuracy", [])],
                     dtype=float)
    cnt = np.asarray(table.get("bin_count", []), dtype=float)
    if not (conf.size == acc.size == cnt.size) or cnt.sum() <= 0:
        return float("nan")
    ok = np.isfinite(conf) & np.isfinite(acc) & (cnt > 0)
    return float(np.sum(cnt[ok] * np.abs(acc[ok] - conf[ok])) / cnt.sum())


def roc_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary on ``probs[:, 1]``, else macro one-vs-rest over the classes present.

    Args:
        y: (N,) int class indices.
        probs: (N, C) probabilities.

    Returns:
        The AUC, or NaN (with a warning) when ``y`` holds a single class.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    probs = np.asarray(probs)
    present = np.unique(y)
    if present.size < 2:
        logger.warning(
            "AUC is undefined: the true labels hold one class only (%s); reporting NaN",
            present.tolist(),
        )
        return math.nan
    n_classes = probs.shape[1]
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    missing = sorted(set(range(n_classes)) - set(present.tolist()))
    if missing:
        logger.warning(
            "AUC: classes %s are absent from the true labels; the macro mean uses the other %d",
            missing,
            present.size,
        )
    return float(np.mean([roc_auc_score(y == k, probs[:, k]) for k in present]))
