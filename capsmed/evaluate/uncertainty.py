"""Test-time-augmentation uncertainty of segmentations: per-case summaries and its calibration.

The voxel uncertainty is the normalised entropy of the mean class probabilities over the test-time
passes (:func:`capsmed.measures.normalised_entropy`), 0 certain to 1 evenly spread.

- :func:`case_uncertainty` gives one case's columns of ``cases.csv`` (mean entropy inside the
  predicted structures, per structure the spread of the volume over the passes) and, for the
  calibration, histograms of the entropy of wrongly and rightly labelled voxels.
- :func:`calibrate` turns the validation cases into the thresholds the reports use: a voxel is
  *uncertain* above the entropy that best separates wrong from right voxels (Youden's J on the
  validation voxels), and a study is *flagged* when its mean entropy exceeds the highest one seen
  among the validation studies. ``capsmed evaluate`` writes the result into the validation stage's
  ``metrics.json`` under ``uncertainty_calibration``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Histogram bins of the entropy over [0, 1] used for the calibration.
BINS = 100
MEASURE = "normalised entropy of the mean test-time-augmentation probabilities"


def case_uncertainty(entropy: np.ndarray | None, pred: np.ndarray, label: np.ndarray | None,
                     pass_counts: np.ndarray, voxel_ml: float, fg: Mapping[int, str]
                     ) -> dict[str, Any]:
    """One case's uncertainty columns.

    Args:
        entropy: ``(*S)`` normalised entropy, or None without test-time augmentation.
        pred: ``(*S)`` predicted label map.
        label: ``(*S)`` ground truth, or None.
        pass_counts: ``(passes, C)`` voxels of each class in each pass's label map.
        voxel_ml: Volume of one voxel in mL.
        fg: Foreground label index -> the name used in column names.

    Returns:
        ``uncertainty_mean`` (mean entropy over the predicted foreground, or over the image when
        nothing is predicted), ``volume_spread_ml_<name>`` (largest minus smallest volume over the
        passes) when there are several passes, and the private ``_entropy_hist_error`` /
        ``_entropy_hist_correct`` (voxel counts per entropy bin among voxels predicted or labelled
        as foreground) when there is a ground truth. Empty without an entropy map.
    """
    if entropy is None:
        return {}
    out: dict[str, Any] = {}
    inside = pred > 0
    values = entropy[inside] if inside.any() else entropy.ravel()
    out["uncertainty_mean"] = round(float(values.mean()), 6) if values.size else None
    counts = np.asarray(pass_counts)
    if counts.shape[0] > 1:
        for k, name in fg.items():
            vols = counts[:, k] * voxel_ml
            out[f"volume_spread_ml_{name}"] = round(float(vols.max() - vols.min()), 4)
    if label is not None and label.shape == pred.shape:
        roi = inside | (label > 0)
        wrong = roi & (pred != label)
        right = roi & (pred == label)
        edges = np.linspace(0.0, 1.0, BINS + 1)
        out["_entropy_hist_error"] = np.histogram(entropy[wrong], edges)[0].tolist()
        out["_entropy_hist_correct"] = np.histogram(entropy[right], edges)[0].tolist()
    return out


def calibrate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Thresholds from the validation cases (see the module docstring).

    Args:
        rows: The validation stage's case rows (with the private histogram keys).

    Returns:
        ``{"measure", "voxel_threshold", "voxel_auc", "youden_j", "study_threshold", "n_cases",
        "n_voxels_error", "n_voxels_correct"}`` (``voxel_threshold`` None when no threshold does
        better than chance, Youden's J <= 0), or None when the rows have no entropy histograms, or
        no wrong or no right voxels to separate.
    """
    err = np.zeros(BINS)
    ok = np.zeros(BINS)
    means = []
    for row in rows:
        if row.get("_entropy_hist_error") is None:
            continue
        err += np.asarray(row["_entropy_hist_error"], dtype=float)
        ok += np.asarray(row["_entropy_hist_correct"], dtype=float)
        if row.get("uncertainty_mean") is not None:
            means.append(float(row["uncertainty_mean"]))
    if not means or err.sum() == 0 or ok.sum() == 0:
        return None
    edges = np.linspace(0.0, 1.0, BINS + 1)
    # flag "entropy >= edges[i]": the share of each group in bins i.. (thresholds high to low)
    tpr = np.cumsum(err[::-1])[::-1] / err.sum()
    fpr = np.cumsum(ok[::-1])[::-1] / ok.sum()
    j = tpr - fpr
    # the first plateau of equally good thresholds; its middle is the least arbitrary choice
    tied = np.flatnonzero(j >= j.max() - 1e-12)
    plateau = tied[: int(np.argmax(np.diff(np.append(tied, tied[-1] + 2)) != 1)) + 1]
    best = int(plateau[0])
    threshold = (edges[plateau[0]] + edges[plateau[-1]]) / 2
    roc_x = np.concatenate([[0.0], fpr[::-1]])
    roc_y = np.concatenate([[0.0], tpr[::-1]])
    auc = float(np.sum(np.diff(roc_x) * (roc_y[1:] + roc_y[:-1]) / 2))
    useful = float(j[best]) > 0  # else no threshold finds wrong voxels better than chance
    return {"measure": MEASURE,
            "voxel_threshold": round(float(threshold), 4) if useful else None,
            "voxel_auc": round(auc, 4), "youden_j": round(float(j[best]), 4),
            "study_threshold": round(max(means), 6), "n_cases": len(means),
            "n_voxels_error": int(err.sum()), "n_voxels_correct": int(ok.sum())}


def tta_cost(pass_seconds: Sequence[Sequence[float]]) -> dict[str, Any]:
    """What test-time augmentation cost, from the seconds of each pass of each case.

    Returns:
        ``{"tta_passes", "tta_extra_seconds_per_case", "tta_time_factor"}``: passes per case, mean
        seconds per case beyond the first pass, and the mean ratio of all passes to the first
        (empty when no case was timed).
    """
    cases = [list(s) for s in pass_seconds if s]
    if not cases:
        return {}
    extra = [sum(s[1:]) for s in cases]
    factor = [sum(s) / s[0] for s in cases if s[0] > 0]
    return {"tta_passes": max(len(s) for s in cases),
            "tta_extra_seconds_per_case": round(float(np.mean(extra)), 4),
            "tta_time_factor": round(float(np.mean(factor)), 3) if factor else None}
