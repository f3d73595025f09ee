"""Confidence bins for the ECE and the reliability diagram: one rule for the metrics and the pages.

Numpy only, so that :mod:`capsmed.report` (which loads no torch) bins exactly as
:mod:`capsmed.evaluate.metrics` does. Bin ``k`` of ``n_bins`` equal-width bins holds the
confidences in ``(k/n_bins, (k+1)/n_bins]``; bin 0 also holds 0. This is the binning of
``monai.metrics.CalibrationErrorMetric``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
