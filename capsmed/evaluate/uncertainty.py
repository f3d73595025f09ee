"""Test-time-augmentation uncertainty of segmentations: per-case summaries and its calibration.

The voxel uncertainty is the normalised entropy of the mean class probabilities over the test-time
passes (:func:`capsmed.measures.normalised_entropy`), 0 certain to 1 evenly spread.

- :func:`case_uncertainty` gives one case's columns of ``cases.csv`` (mean entropy inside the
  predicted structures, per structure the spread of the volume over the passes) and, for the
  calibration, histograms of the entropy of wrongly and rightly labelled voxels. A study in which
  the model finds no foreground is flagged ``nothing_found``; its uncertainty is then the mean
  entropy of the region where the structures usually lie (:func:`expected_region`: the training
  labels' bounding boxes), or failing that of the image's foreground, never of the whole image,
  whose background would average it into near-certainty.
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


def expected_region(boxes: Sequence[Sequence[Sequence[float]] | None], shape: Sequence[int]
                    ) -> np.ndarray | None:
    """Where the structures usually lie: the union of the training labels' bounding boxes.

    Args:
        boxes: Relative boxes of the training cases
            (:func:`capsmed.data.fingerprint.relative_box`: ``[[lo, hi], ...]`` per array axis,
            fractions of the extent; None for a case without foreground).
        shape: The study's array shape.

    Returns:
        ``(*shape)`` boolean mask of the smallest box holding every training box, scaled to the
        study's extent, or None when no training case has foreground.
    """
    boxes = [b for b in boxes if b is not None and len(b) == len(shape)]
    if not boxes:
        return None
    lo = np.min([[axis[0] for axis in b] for b in boxes], axis=0)
    hi = np.max([[axis[1] for axis in b] for b in boxes], axis=0)
    mask = np.zeros(tuple(int(n) for n in shape), bool)
    index = tuple(slice(int(np.floor(a * n)), max(int(np.ceil(b * n)), int(np.floor(a * n)) + 1))
                  for a, b, n in zip(lo, hi, shape, strict=True))
    mask[index] = True
    return mask


def case_uncertainty(entropy: np.ndarray | None, pred: np.ndarray, label: np.ndarray | None,
                     pass_counts: np.ndarray, voxel_ml: float, fg: Mapping[int, str],
                     region: np.ndarray | None = None, image_foreground: np.ndarray | None = None
                     ) -> dict[str, Any]:
    """One case's uncertainty columns.

    Args:
        entropy: ``(*S)`` normalised entropy, or None without test-time augmentation.
        pred: ``(*S)`` predicted label map.
        label: ``(*S)`` ground truth, or None.
        pass_counts: ``(passes, C)`` voxels of each class in each pass's label map.
        voxel_ml: Volume of one voxel in mL.
        fg: Foreground label index -> the name used in column names.
        region: ``(*S)`` where the structures usually lie (:func:`expected_region`), or None.
        image_foreground: ``(*S)`` the image's foreground (non-background voxels), or None.

    Returns:
        ``nothing_found`` (1 when no voxel is predicted as foreground, else 0),
        ``uncertainty_region`` (what ``uncertainty_mean`` averages: ``predicted structures``;
        with nothing found ``expected region``, else ``image foreground``, else ``whole image``),
        ``uncertainty_mean``, ``volume_spread_ml_<name>`` (largest minus smallest volume over the
        passes) when there are several passes, and the private ``_entropy_hist_error`` /
        ``_entropy_hist_correct`` (voxel counts per entropy bin among voxels predicted or labelled
        as foreground) when there is a ground truth. Only ``nothing_found`` without an entropy map.
    """
    inside = pred > 0
    out: dict[str, Any] = {"nothing_found": int(not inside.any())}
    if entropy is None:
        return out
    where = "predicted structures"
    if not inside.any():
        for name, mask in (("expected region", region), ("image foreground", image_foreground)):
            if mask is not None and mask.shape == pred.shape and mask.any():
                inside, where = mask, name
                break
        else:
            inside, where = np.ones(pred.shape, bool), "whole image"
    values = entropy[inside]
    out["uncertainty_region"] = where
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
