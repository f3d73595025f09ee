"""Pure metric functions for segmentation and classification, with bootstrap confidence intervals.

Everything here takes numpy arrays and returns plain Python floats, lists and dicts, so the
results go straight into ``metrics.json`` and ``cases.csv``. Segmentation overlap and surface
distances come from MONAI (``compute_dice``, ``compute_hausdorff_distance``,
``compute_average_surface_distance``), classification metrics from scikit-learn; torch is used only
inside the MONAI calls.

Segmentation conventions (per case, per foreground class ``c`` named ``<name>``):

* ``dice_<name>``: ``2|P∩T| / (|P|+|T|)``. Both empty: 1.0. Exactly one empty: 0.0.
* ``hd95_<name>``: symmetric 95th-percentile Hausdorff distance in mm between the surface voxels of
  prediction and label (MONAI: the larger of the two directed 95th percentiles, linear
  interpolation). ``assd_<name>``: average symmetric surface distance in mm (mean over the surface
  voxels of both masks of the distance to the other surface). Both empty: 0.0. Exactly one empty:
  NaN (a distance to nothing is undefined); the stage aggregates use ``nanmean`` and
  :func:`nan_case_counts` says how many cases were left out.
* ``dice`` / ``hd95`` / ``assd``: mean over the foreground classes of the per-class values
  (``nanmean`` for the distances; NaN when every class is undefined).
* Sizes, from the voxel size given by ``spacing`` (mm per array axis, in the order of the array
  axes): 3D maps give ``volume_ml_<name>`` (predicted), ``volume_true_ml_<name>`` and
  ``volume_error_ml_<name>`` (predicted minus true) in millilitres (1 ml = 1000 mm^3); 2D maps
  have no volume, so they give ``area_mm2_<name>``, ``area_true_mm2_<name>`` and
  ``area_error_mm2_<name>`` in mm^2 instead.

Classification conventions (``y_true`` of shape (N,), ``probs`` of shape (N, C); the prediction is
the arg-max of ``probs``; "binary" means C == 2 with class 1 the positive class):

* ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present in ``y_true``).
* ``auc``: binary: ROC AUC of ``probs[:, 1]``; multi-class: macro mean of the one-vs-rest AUCs of
  the classes present in ``y_true``. NaN (with a logged warning) when ``y_true`` holds one class.
* ``f1``: binary: F1 of class 1 (NaN when class 1 is neither true nor predicted anywhere);
  multi-class: macro F1 over the classes present in ``y_true`` or the prediction.
* ``sensitivity`` / ``specificity``: binary: recall of class 1 / recall of class 0 (NaN when that
  class is absent from ``y_true``). Multi-class: the worst class, i.e. the lowest one-vs-rest
  sensitivity (recall) and the lowest one-vs-rest specificity over the classes where each is
  defined. (Their macro means would repeat ``balanced_accuracy``, which is the mean recall.)
* ``ece``: expected calibration error over ``n_bins`` equal-width bins of the confidence (the
  maximum probability); bin ``k`` holds confidences in ``(k/n_bins, (k+1)/n_bins]`` (the first bin
  also holds 0).

Bootstrap intervals resample cases with replacement (percentile method, ``1 - alpha`` coverage).
Resamples where a metric is undefined (NaN, e.g. one class only) are skipped.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    roc_curve,
)

from capsmed.measures import confidence_bins, reliability_table, roc_auc

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFICATION_METRIC_NAMES",
    "aggregate_segmentation",
    "bootstrap_classification_cis",
    "bootstrap_mean_ci",
    "bootstrap_metric_ci",
    "bootstrap_segmentation_cis",
    "classification_metrics",
    "expected_calibration_error",
    "nan_case_counts",
    "segmentation_case_metrics",
]

CLASSIFICATION_METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "auc",
    "f1",
    "sensitivity",
    "specificity",
    "ece",
)
"""Metric keys of ``classification_metrics(...)["metrics"]``, in report order."""

# Upper bound on the number of entries of one (resamples x cases) weight block in the bootstrap.
_BOOT_BLOCK_ENTRIES = 4_000_000


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float] | np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmean`` that returns NaN for all-NaN input without a RuntimeWarning.

    Args:
        values: numbers (NaN allowed).
        axis: axis to reduce, or None for all.

    Returns:
        The mean of the finite entries (a float for ``axis=None``, else an array).

    """
    arr = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        out = np.nanmean(arr, axis=axis)
    return float(out) if axis is None else out


def _nanmin(values: Sequence[float] | np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmin`` that returns NaN for all-NaN input without a RuntimeWarning.

    Args:
        values: numbers (NaN allowed).
        axis: axis to reduce, or None for all.

    Returns:
        The smallest non-NaN entry (a float for ``axis=None``, else an array).

    """
    arr = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        out = np.nanmin(arr, axis=axis)
    return float(out) if axis is None else out


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Element-wise ``num / den`` with NaN where ``den == 0``.

    Args:
        num: numerators.
        den: denominators, broadcastable to ``num``.

    Returns:
        float64 array of the quotients.

    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(den == 0, np.nan, out)


def _as_float(value: Any) -> float:
    """Convert a 0-d tensor / numpy scalar to a Python float, mapping +-inf to NaN.

    Args:
        value: a number-like scalar.

    Returns:
        The value as a finite float or NaN.

    """
    if isinstance(value, torch.Tensor):
        value = value.item()
    out = float(value)
    return out if math.isfinite(out) else math.nan


def _percentile_interval(stats: np.ndarray, alpha: float, what: str) -> tuple[float, float]:
    """Percentile bootstrap interval from resampled statistics, skipping undefined ones.

    Args:
        stats: (n_boot,) statistics; NaN marks a resample where the statistic is undefined.
        alpha: 1 - coverage, e.g. 0.05 for a 95 % interval.
        what: name used in log messages.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` when no resample was defined.

    """
    finite = stats[np.isfinite(stats)]
    skipped = stats.size - finite.size
    if finite.size == 0:
        logger.warning("bootstrap of %s: undefined in every resample; the CI is NaN", what)
        return math.nan, math.nan
    if skipped:
        logger.info(
            "bootstrap of %s: skipped %d of %d resamples where the metric is undefined",
            what,
            skipped,
            stats.size,
        )
    lo, hi = np.percentile(finite, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(lo), float(hi)


def _check_boot_args(n_boot: int, alpha: float) -> None:
    """Validate the bootstrap arguments.

    Args:
        n_boot: number of resamples.
        alpha: 1 - coverage.

    Raises:
        ValueError: when ``n_boot < 1`` or ``alpha`` is not in (0, 1).

    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _resample_blocks(n: int, n_boot: int, seed: int):
    """Yield blocks of bootstrap case indices, deterministic by ``seed``.

    Args:
        n: number of cases.
        n_boot: total number of resamples.
        seed: seed of ``numpy.random.default_rng``.

    Yields:
        int arrays of shape (b, n) with case indices, b resamples per block, n_boot in total.

    """
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BOOT_BLOCK_ENTRIES // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(block, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _indices_to_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """Turn resampled indices into per-case multiplicities.

    Args:
        idx: (b, n_draws) case indices.
        n: number of cases.

    Returns:
        (b, n) float64 array: how often each case was drawn in each resample.

    """
    b = idx.shape[0]
    flat = (idx + (np.arange(b)[:, None] * n)).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _check_label_map(arr: np.ndarray, what: str) -> np.ndarray:
    """Check that a map holds integer class indices and return it as an integer array.

    Args:
        arr: (*S) label or prediction map.
        what: "pred" or "label", for the error message.

    Returns:
        The map as an integer array.

    Raises:
        ValueError: when the map holds non-integer or non-finite values.

    """
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be a numeric label map, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(f"{what} must hold integer class indices, found non-integer values")
    return arr.astype(np.int64)


def _bounding_slices(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, widened by ``margin`` and clipped to the array.

    Args:
        mask: (*S) boolean array with at least one True.
        margin: voxels added on every side.

    Returns:
        One slice per axis.

    """
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo = max(int(hits[0]) - margin, 0)
        hi = min(int(hits[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def _class_overlap_and_distances(
    pred_mask: np.ndarray, true_mask: np.ndarray, spacing: tuple[float, ...]
) -> tuple[float, float, float]:
    """Dice, HD95 and ASSD of one foreground class, with the empty-mask conventions.

    The masks are cropped to the bounding box of their union (plus one voxel, clipped to the
    image), which changes none of the three values (MONAI crops the same way before it extracts
    surfaces; surface voxels on the image border stay surface voxels).

    Args:
        pred_mask: (*S) boolean predicted mask.
        true_mask: (*S) boolean reference mask.
        spacing: voxel size in mm per axis of ``*S``.

    Returns:
        ``(dice, hd95_mm, assd_mm)``: (1, 0, 0) when both masks are empty, (0, NaN, NaN) when
        exactly one is.

    """
    has_pred, has_true = bool(pred_mask.any()), bool(true_mask.any())
    if not has_pred and not has_true:
        return 1.0, 0.0, 0.0
    if has_pred != has_true:
        return 0.0, math.nan, math.nan
    box = _bounding_slices(pred_mask | true_mask)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_mask[box]))[None, None]  # (1, 1, *S')
    y_true = torch.from_numpy(np.ascontiguousarray(true_mask[box]))[None, None]
    dice = compute_dice(
        y_pred.float(), y_true.float(), include_background=True, ignore_empty=False
    )
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        hd95 = compute_hausdorff_distance(
            y_pred, y_true, include_background=True, percentile=95, spacing=list(spacing)
        )
        assd = compute_average_surface_distance(
            y_pred, y_true, include_background=True, symmetric=True, spacing=list(spacing)
        )
    return _as_float(dice[0, 0]), _as_float(hd95[0, 0]), _as_float(assd[0, 0])


def segmentation_case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    label_names: dict[int, str],
    spacing: tuple[float, ...],
) -> dict[str, float]:
    """Overlap, surface-distance and size metrics of one segmented case.

    See the module docstring for the exact definitions and the empty-mask conventions.

    Args:
        pred: (*S) predicted class-index map, 2D ``(H, W)`` or 3D ``(H, W, D)``, no channel axis.
        label: (*S) reference class-index map of the same shape.
        label_names: foreground class index -> name (background 0 excluded), e.g.
            ``{1: "liver", 2: "tumour"}``. Keys are formatted into the metric names.
        spacing: voxel size in mm along each array axis of ``*S`` (same order as ``pred.shape``).

    Returns:
        Plain floats: ``dice``, ``hd95``, ``assd`` (means over the foreground classes) and, per
        class ``<name>``, ``dice_<name>``, ``hd95_<name>``, ``assd_<name>`` (mm) and the sizes
        ``volume_ml_<name>``, ``volume_true_ml_<name>``, ``volume_error_ml_<name>`` (3D) or
        ``area_mm2_<name>``, ``area_true_mm2_<name>``, ``area_error_mm2_<name>`` (2D).

    Raises:
        ValueError: when the shapes differ, the maps are not 2D/3D integer maps, ``spacing`` does
            not give one positive finite size per axis, or ``label_names`` is empty or holds 0.

    """
    pred_arr = _check_label_map(pred, "pred")
    label_arr = _check_label_map(label, "label")
    if pred_arr.shape != label_arr.shape:
        raise ValueError(
            f"pred and label must have the same shape, got {pred_arr.shape} and {label_arr.shape}"
        )
    if pred_arr.ndim not in (2, 3):
        raise ValueError(f"pred and label must be 2D or 3D maps, got shape {pred_arr.shape}")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != pred_arr.ndim or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(
            f"spacing must give one positive finite voxel size per axis of the {pred_arr.ndim}D "
            f"map, got {tuple(spacing)}"
        )
    if not label_names:
        raise ValueError("label_names must name at least one foreground class")
    if any(int(k) == 0 for k in label_names):
        raise ValueError("label_names must not include the background class 0")

    voxel_mm = float(np.prod(spacing_t))
    if pred_arr.ndim == 3:
        size_keys = ("volume_ml_{}", "volume_true_ml_{}", "volume_error_ml_{}")
        unit = voxel_mm / 1000.0  # mm^3 -> ml
    else:
        size_keys = ("area_mm2_{}", "area_true_mm2_{}", "area_error_mm2_{}")
        unit = voxel_mm

    out: dict[str, float] = {}
    dices, hds, assds = [], [], []
    per_class: dict[str, float] = {}
    for index in sorted(label_names, key=int):
        name = label_names[index]
        pred_mask = pred_arr == int(index)
        true_mask = label_arr == int(index)
        dice, hd95, assd = _class_overlap_and_distances(pred_mask, true_mask, spacing_t)
        dices.append(dice)
        hds.append(hd95)
        assds.append(assd)
        size_pred = float(np.count_nonzero(pred_mask)) * unit
        size_true = float(np.count_nonzero(true_mask)) * unit
        per_class[f"dice_{name}"] = dice
        per_class[f"hd95_{name}"] = hd95
        per_class[f"assd_{name}"] = assd
        per_class[size_keys[0].format(name)] = size_pred
        per_class[size_keys[1].format(name)] = size_true
        per_class[size_keys[2].format(name)] = size_pred - size_true
    out["dice"] = float(np.mean(dices))
    out["hd95"] = _nanmean(hds)
    out["assd"] = _nanmean(assds)
    out.update(per_class)
    return out


def _is_number(value: Any) -> bool:
    """Tell whether a value is a real number (not a bool), numpy scalars included.

    Args:
        value: anything.

    Returns:
        Whether the value is a real number.

    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _numeric_columns(case_rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Collect the numeric columns of per-case rows.

    A key is a numeric column when every row's value is a number, None or missing (the latter two
    become NaN); keys with any other value (case ids, paths) are left out.

    Args:
        case_rows: one mapping per case.

    Returns:
        key -> (n_cases,) float64 array, keys in the order first seen.

    """
    keys: list[str] = []
    for row in case_rows:
        for key in row:
            if key not in keys:
                keys.append(key)
    columns: dict[str, np.ndarray] = {}
    for key in keys:
        values = [row.get(key) for row in case_rows]
        if all(v is None or _is_number(v) for v in values):
            columns[key] = np.array(
                [math.nan if v is None else float(v) for v in values], dtype=np.float64
            )
    return columns


def nan_case_counts(case_rows: list[dict]) -> dict[str, int]:
    """How many cases are undefined (NaN) for each numeric metric key.

    Args:
        case_rows: per-case metric dicts, e.g. from :func:`segmentation_case_metrics`; non-numeric
            entries (case id, paths) are ignored.

    Returns:
        key -> number of cases whose value is NaN, None or missing (every numeric key is listed).

    """
    return {key: int(np.isnan(col).sum()) for key, col in _numeric_columns(case_rows).items()}


def aggregate_segmentation(case_rows: list[dict]) -> dict[str, float]:
    """Mean over cases of every numeric metric key, ignoring undefined (NaN) cases.

    Cases where a surface distance is undefined (exactly one of prediction and label empty) are
    left out of that key's mean; a warning names how many. Use :func:`nan_case_counts` for the
    counts themselves.

    Args:
        case_rows: per-case metric dicts, e.g. from :func:`segmentation_case_metrics`; non-numeric
            entries (case id, paths) are ignored.

    Returns:
        key -> nanmean over cases (NaN when no case defines the key), keys in first-seen order.

    """
    columns = _numeric_columns(case_rows)
    out: dict[str, float] = {}
    for key, col in columns.items():
        n_nan = int(np.isnan(col).sum())
        if n_nan:
            logger.warning(
                "%s is undefined in %d of %d cases (prediction or reference empty); "
                "the mean uses the other %d",
                key,
                n_nan,
                col.size,
                col.size - n_nan,
            )
        out[key] = _nanmean(col)
    return out


def bootstrap_mean_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-case values, ignoring NaN cases.

    NaN (and infinite) cases are dropped first; the rest is resampled with replacement by
    ``scipy.stats.bootstrap(..., method="percentile")``.

    Args:
        values: (N,) per-case values (NaN allowed).
        n_boot: number of resamples.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same interval.
        alpha: 1 - coverage (0.05 for a 95 % interval).

    Returns:
        ``(lo, hi)`` as floats; ``(nan, nan)`` when no value is finite; the value itself for one
        case (every resample is that case).

    Raises:
        ValueError: when ``n_boot < 1`` or ``alpha`` is not in (0, 1).

    """
    from scipy.stats import bootstrap

    _check_boot_args(n_boot, alpha)
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size == 1:
        return float(arr[0]), float(arr[0])
    res = bootstrap((arr,), np.mean, n_resamples=int(n_boot), confidence_level=1.0 - alpha,
                    method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_segmentation_cis(
    case_rows: list[dict], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, list[float]]:
    """Bootstrap intervals of the stage means of every numeric per-case key.

    Args:
        case_rows: per-case metric dicts, as for :func:`aggregate_segmentation`.
        n_boot: number of resamples.
        seed: seed; every key uses the same seed.
        alpha: 1 - coverage.

    Returns:
        key -> ``[lo, hi]`` (the ``ci95`` entry of ``metrics.json``).

    """
    return {
        key: list(bootstrap_mean_ci(col, n_boot=n_boot, seed=seed, alpha=alpha))
        for key, col in _numeric_columns(case_rows).items()
    }


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _check_classification_inputs(
    y_true: np.ndarray, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert classification inputs.

    Args:
        y_true: (N,) true class indices in ``range(C)``.
        probs: (N, C) class probabilities in [0, 1].

    Returns:
        ``(y_true as int64 (N,), probs as float64 (N, C))``.

    Raises:
        ValueError: on empty input, wrong shapes, C < 2, non-integer or out-of-range labels, or
            probabilities outside [0, 1].

    """
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {p.shape}")
    if y.size == 0:
        raise ValueError("classification metrics need at least one case, got 0")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} cases but probs has {p.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        yf = y.astype(np.float64)
        if not np.all(np.isfinite(yf)) or not np.all(yf == np.round(yf)):
            raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"y_true must hold class indices in range({n_classes}), got {np.unique(y).tolist()}"
        )
    if not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1.0 + 1e-6:
        raise ValueError("probs must be finite probabilities in [0, 1]")
    return y, np.clip(p, 0.0, 1.0)


def _reliability(
    y: np.ndarray, probs: np.ndarray, n_bins: int
) -> tuple[float, dict[str, list[Any]]]:
    """ECE and reliability-diagram table (:func:`capsmed.measures.reliability_table`).

    Args:
        y: (N,) int class indices.
        probs: (N, C) probabilities.
        n_bins: number of equal-width confidence bins.

    Returns:
        ``(ece, {"bin_confidence", "bin_accuracy", "bin_count"})``; the first two are None for
        empty bins.

    """
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    return reliability_table(probs.max(axis=1), correct, n_bins)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Compute the expected calibration error over equal-width bins of the top-class confidence.

    ``ECE = sum_k (n_k / N) * |accuracy_k - confidence_k|`` where bin k holds the cases whose
    maximum probability lies in ``(k/n_bins, (k+1)/n_bins]``.

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) class probabilities.
        n_bins: number of bins (>= 1).

    Returns:
        The ECE in [0, 1].

    Raises:
        ValueError: on invalid inputs or ``n_bins < 1``.

    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_classification_inputs(y_true, probs)
    return _reliability(y, p, int(n_bins))[0]


def _sensitivity_specificity(cm: np.ndarray) -> tuple[float, float]:
    """Sensitivity and specificity from a confusion matrix (rows true, columns predicted).

    Args:
        cm: (C, C) counts.

    Returns:
        Binary: (recall of class 1, recall of class 0); multi-class: the lowest one-vs-rest
        sensitivity and specificity over the classes where each is defined. NaN where undefined.

    """
    cm = cm.astype(np.float64)
    total = cm.sum()
    diag = np.diag(cm)
    rows, cols = cm.sum(axis=1), cm.sum(axis=0)
    recall = _safe_divide(diag, rows)
    if cm.shape[0] == 2:
        return float(recall[1]), float(recall[0])
    spec = _safe_divide(total - rows - cols + diag, total - rows)
    return _nanmin(recall), _nanmin(spec)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """All classification metrics of one stage, plus the tables the reports plot.

    See the module docstring for the exact definitions and the undefined cases.

    Args:
        y_true: (N,) true class indices in ``range(C)``.
        probs: (N, C) class probabilities (rows sum to 1); the prediction is their arg-max.
        n_bins: number of equal-width confidence bins for the ECE and reliability table.

    Returns:
        A JSON-ready dict with:

        * ``"metrics"``: {name: float} for :data:`CLASSIFICATION_METRIC_NAMES`.
        * ``"confusion_matrix"``: C x C list of int lists, rows true class, columns predicted,
          labels ``range(C)``.
        * ``"reliability"``: {"bin_confidence", "bin_accuracy", "bin_count"}, ``n_bins`` entries
          each; empty bins have None confidence and accuracy.
        * ``"roc"``: {"fpr", "tpr", "thresholds"} and ``"pr"``: {"precision", "recall"} — only for
          binary tasks where both classes occur in ``y_true`` (omitted otherwise). The first ROC
          threshold (+inf in scikit-learn: nothing predicted positive) is None so the dict stays
          valid JSON.

    Raises:
        ValueError: on invalid inputs (shapes, labels out of range, probabilities outside [0, 1])
            or ``n_bins < 1``.

    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_classification_inputs(y_true, probs)
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(n_classes)))
    sensitivity, specificity = _sensitivity_specificity(cm)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": balanced accuracy then averages over the
        # classes present in y_true, which is the definition we document.
        warnings.simplefilter("ignore", category=UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    if n_classes == 2:
        f1 = float(f1_score(y, pred, pos_label=1, average="binary", zero_division=np.nan))
    else:
        f1 = float(f1_score(y, pred, average="macro", zero_division=np.nan))
    ece, reliability = _reliability(y, p, int(n_bins))
    metrics = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "auc": roc_auc(y, p),
        "f1": f1 if math.isfinite(f1) else math.nan,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ece": ece,
    }
    result: dict[str, Any] = {
        "metrics": metrics,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "reliability": reliability,
    }
    if n_classes == 2 and np.unique(y).size == 2:
        fpr, tpr, thresholds = roc_curve(y, p[:, 1])
        precision, recall, _ = precision_recall_curve(y, p[:, 1])
        result["roc"] = {
            "fpr": [float(v) for v in fpr],
            "tpr": [float(v) for v in tpr],
            "thresholds": [float(v) if math.isfinite(v) else None for v in thresholds],
        }
        result["pr"] = {
            "precision": [float(v) for v in precision],
            "recall": [float(v) for v in recall],
        }
    return result


# ---- weighted (bootstrap) versions: every resample is a vector of case multiplicities ----------


def _weighted_auc(
    y: np.ndarray, probs: np.ndarray, weights: np.ndarray, order_cache: dict
) -> np.ndarray:
    """ROC AUC of every resample, exact with ties (Mann-Whitney with case weights).

    Args:
        y: (N,) int class indices.
        probs: (N, C) probabilities.
        weights: (B, N) case multiplicities of B resamples.
        order_cache: dict reused across blocks for the per-class sort orders.

    Returns:
        (B,) AUCs; binary on ``probs[:, 1]``, else macro one-vs-rest over the classes present in
        the resample; NaN where fewer than two classes are present.

    """
    n_classes = probs.shape[1]
    classes = [1] if n_classes == 2 else list(range(n_classes))
    per_class = []
    for k in classes:
        if k not in order_cache:
            order = np.argsort(probs[:, k], kind="stable")
            scores = probs[order, k]
            starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
            order_cache[k] = (order, starts, (y[order] == k).astype(np.float64))
        order, starts, positive = order_cache[k]
        w_sorted = weights[:, order]
        pos = np.add.reduceat(w_sorted * positive, starts, axis=1)  # (B, unique scores)
        neg = np.add.reduceat(w_sorted * (1.0 - positive), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score
        wins = (pos * (below + 0.5 * neg)).sum(axis=1)
        per_class.append(_safe_divide(wins, pos.sum(axis=1) * neg.sum(axis=1)))
    return per_class[0] if n_classes == 2 else _nanmean(np.stack(per_class, axis=1), axis=1)


def _weighted_classification_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray,
    metrics: Sequence[str],
    n_bins: int = 10,
    order_cache: dict | None = None,
) -> dict[str, np.ndarray]:
    """Classification metrics for many case-weightings at once (vectorised bootstrap).

    With ``weights`` all ones this gives the same values as :func:`classification_metrics`.

    Args:
        y: (N,) int class indices.
        probs: (N, C) probabilities.
        weights: (B, N) case multiplicities.
        metrics: names from :data:`CLASSIFICATION_METRIC_NAMES`.
        n_bins: bins of the ECE.
        order_cache: optional dict reused across calls on the same data (AUC sort orders).

    Returns:
        name -> (B,) values, NaN where the metric is undefined in that resample.

    """
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    total = weights.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    if set(metrics) & {"accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"}:
        codes = y * n_classes + pred
        cm = np.zeros((weights.shape[0], n_classes * n_classes))
        for code in np.unique(codes):
            cm[:, code] = weights[:, codes == code].sum(axis=1)
        cm = cm.reshape(-1, n_classes, n_classes)  # (B, true, predicted)
        diag = np.diagonal(cm, axis1=1, axis2=2)
        rows, cols = cm.sum(axis=2), cm.sum(axis=1)
        recall = _safe_divide(diag, rows)
        f1_k = _safe_divide(2.0 * diag, rows + cols)
        out["accuracy"] = diag.sum(axis=1) / total
        out["balanced_accuracy"] = _nanmean(recall, axis=1)
        if n_classes == 2:
            out["sensitivity"], out["specificity"] = recall[:, 1], recall[:, 0]
            out["f1"] = f1_k[:, 1]
        else:
            spec = _safe_divide(total[:, None] - rows - cols + diag, total[:, None] - rows)
            out["sensitivity"] = _nanmin(recall, axis=1)
            out["specificity"] = _nanmin(spec, axis=1)
            out["f1"] = _nanmean(f1_k, axis=1)
    if "ece" in metrics:
        confidence = probs.max(axis=1)
        correct = (pred == y).astype(np.float64)
        onehot = np.eye(n_bins)[confidence_bins(confidence, n_bins)]  # (N, bins)
        gap = weights @ (onehot * (correct - confidence)[:, None])
        out["ece"] = np.abs(gap).sum(axis=1) / total
    if "auc" in metrics:
        out["auc"] = _weighted_auc(y, probs, weights, {} if order_cache is None else order_cache)
    return {name: out[name] for name in metrics}


def bootstrap_classification_cis(
    y_true: np.ndarray,
    probs: np.ndarray,
    metrics: Sequence[str] = CLASSIFICATION_METRIC_NAMES,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, list[float]]:
    """Bootstrap intervals of several classification metrics from the same resamples.

    Cases are resampled with replacement (the same resamples for every metric); the interval is
    the percentile interval over the resamples where the metric is defined.

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) class probabilities.
        metrics: metric names from :data:`CLASSIFICATION_METRIC_NAMES`.
        n_boot: number of resamples.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same intervals.
        alpha: 1 - coverage.
        n_bins: bins of the ECE.

    Returns:
        name -> ``[lo, hi]`` (``[nan, nan]`` when undefined in every resample).

    Raises:
        ValueError: on invalid inputs, unknown metric names or bad bootstrap arguments.

    """
    _check_boot_args(n_boot, alpha)
    unknown = [m for m in metrics if m not in CLASSIFICATION_METRIC_NAMES]
    if unknown:
        raise ValueError(
            f"unknown metrics {unknown}; choose from {list(CLASSIFICATION_METRIC_NAMES)}"
        )
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_classification_inputs(y_true, probs)
    cache: dict = {}
    stats: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for idx in _resample_blocks(y.size, int(n_boot), seed):
        weights = _indices_to_weights(idx, y.size)
        values = _weighted_classification_metrics(y, p, weights, metrics, int(n_bins), cache)
        for m in metrics:
            stats[m].append(values[m])
    return {m: list(_percentile_interval(np.concatenate(stats[m]), alpha, m)) for m in metrics}


def bootstrap_metric_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> tuple[float, float]:
    """Percentile bootstrap interval of one classification metric, resampling cases.

    Vectorised: 1000 resamples of a few hundred cases take milliseconds (AUC included).

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) class probabilities.
        metric: one of :data:`CLASSIFICATION_METRIC_NAMES`.
        n_boot: number of resamples.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same interval.
        alpha: 1 - coverage (0.05 for a 95 % interval).
        n_bins: bins of the ECE.

    Returns:
        ``(lo, hi)``; resamples where the metric is undefined (e.g. one class only for AUC) are
        skipped; ``(nan, nan)`` when it is undefined in all of them.

    Raises:
        ValueError: on invalid inputs, an unknown metric or bad bootstrap arguments.

    """
    lo, hi = bootstrap_classification_cis(
        y_true, probs, metrics=(metric,), n_boot=n_boot, seed=seed, alpha=alpha, n_bins=n_bins
    )[metric]
    return lo, hi
