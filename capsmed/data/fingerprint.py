"""Dataset fingerprint and preprocessing plan, after nnU-Net (fingerprint -> plan).

``compute_fingerprint`` reads every case once and records what the plan needs: voxel spacings and
shapes in RAS axis order (the order ``Orientationd("RAS")`` produces), shapes after cropping to the
non-zero bounding box, foreground intensity statistics (mean, std, 0.5 / 99.5 percentiles) and label
voxel counts (segmentation) or class counts (classification).

``make_plan`` turns the fingerprint and the dataset config into the preprocessing plan read by
:mod:`capsmed.data.transforms`; values set in the config win over derived ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import voxel_sizes

from capsmed.data._io import read_volume
from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

SAMPLES_PER_CASE = 10_000
DEFAULT_MAX_PATCH = 64


def _ras_permutation(affine: np.ndarray, dims: int) -> list[int]:
    """For each RAS output axis, the array axis that lands there (identity for 2D)."""
    if dims != 3:
        return list(range(dims))
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    perm = [0] * 3
    for array_axis, (out_axis, _) in enumerate(ornt):
        perm[int(out_axis)] = array_axis
    return perm


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    vol, problems = read_volume(Path(path), load=True)
    if vol is None or vol.data is None:
        raise CapsmedError("; ".join(problems) or f"{path}: cannot be read")
    return np.asarray(vol.data), vol.affine


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: 0.0 for k in ("mean", "std", "median", "min", "max", "percentile_00_5",
                                 "percentile_99_5")}
    return {"mean": float(values.mean()), "std": float(values.std()),
            "median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max()),
            "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5))}


def compute_fingerprint(cases_doc: Mapping[str, Any]) -> dict:
    """Fingerprint a dataset from its ``cases.json`` document.

    Args:
        cases_doc: as written by :func:`capsmed.data.sources.prepare_dataset`.

    Returns:
        ``{"task", "spatial_dims", "modality", "n_cases", "in_channels", "case_ids", "spacings",
        "shapes", "shapes_after_crop", "median_spacing", "median_shape",
        "median_shape_after_crop", "intensity": {"mean", "std", "median", "min", "max",
        "percentile_00_5", "percentile_99_5"}, "intensity_per_channel": [...]}`` plus
        ``"labels"``, ``"label_voxels": {"0": n, ...}`` (segmentation: voxels per label over
        all cases) and ``"label_boxes"`` (per case, in ``case_ids`` order, the foreground's
        :func:`relative_box` in array axes, None without foreground) or ``"classes"`` and
        ``"class_counts": {"0": n, ...}`` (classification).
        Spacings and shapes are per case in RAS axis order (3D) or array order (2D). Intensities
        come from voxels with label > 0 (segmentation; all voxels when a case has none) or all
        voxels (classification), sampled (at most 10,000 per case, fixed seed) for the
        percentiles; mean and std are exact.

    Raises:
        CapsmedError: a case cannot be read, or the document is empty.
    """
    task = cases_doc["task"]
    dims = int(cases_doc["spatial_dims"])
    cases = cases_doc["cases"]
    if not cases:
        raise CapsmedError("cases.json: empty dataset: no cases to fingerprint")
    rng = np.random.default_rng(0)
    spacings, shapes, cropped, ids = [], [], [], []
    samples: list[list[np.ndarray]] = []
    sums: list[list[float]] = []
    channels = None
    label_voxels: dict[int, int] = {}
    label_boxes: list[list[list[float]] | None] = []
    class_counts: dict[int, int] = {}
    for case in cases:
        img, affine = _load(case["image"])
        if img.ndim == dims:
            img = img[..., None]
        n_ch = img.shape[-1]
        if channels is None:
            channels = n_ch
            samples = [[] for _ in range(n_ch)]
            sums = [[0.0, 0.0, 0.0] for _ in range(n_ch)]
        elif n_ch != channels:
            raise CapsmedError(f"{case['image']}: has {n_ch} channel(s), other cases {channels}")
        perm = _ras_permutation(affine, dims)
        spacing = voxel_sizes(affine)[:dims]
        shape = img.shape[:dims]
        spacings.append([float(spacing[a]) for a in perm])
        shapes.append([int(shape[a]) for a in perm])
        nonzero = np.any(img != 0, axis=-1)
        if nonzero.any():
            idx = np.nonzero(nonzero)
            box = [int(i.max() - i.min() + 1) for i in idx]
        else:
            box = list(shape)
        cropped.append([box[a] for a in perm])
        ids.append(case["case_id"])
        if task == "segmentation":
            lab, _ = _load(case["label"])
            lab = np.rint(lab.reshape(shape)).astype(np.int64)
            values, counts = np.unique(lab, return_counts=True)
            for v, c in zip(values, counts, strict=True):
                label_voxels[int(v)] = label_voxels.get(int(v), 0) + int(c)
            mask = lab > 0
            label_boxes.append(relative_box(mask))
            if not mask.any():
                mask = np.ones(shape, bool)
        else:
            class_counts[int(case["class"])] = class_counts.get(int(case["class"]), 0) + 1
            mask = np.ones(shape, bool)
        for ch in range(n_ch):
            vals = img[..., ch][mask].astype(np.float64)
            sums[ch][0] += vals.size
            sums[ch][1] += float(vals.sum())
            sums[ch][2] += float((vals ** 2).sum())
            if vals.size > SAMPLES_PER_CASE:
                vals = rng.choice(vals, SAMPLES_PER_CASE, replace=False)
            samples[ch].append(vals)
    per_channel = []
    for ch in range(channels or 1):
        stats = _stats(np.concatenate(samples[ch]))
        n, s, s2 = sums[ch]
        if n:
            stats["mean"] = s / n
            stats["std"] = math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))
        per_channel.append(stats)
    fp: dict[str, Any] = {
        "task": task, "spatial_dims": dims, "modality": cases_doc.get("modality", "other"),
        "n_cases": len(cases), "in_channels": int(channels or 1), "case_ids": ids,
        "spacings": spacings, "shapes": shapes, "shapes_after_crop": cropped,
        "median_spacing": [float(v) for v in np.median(np.array(spacings), axis=0)],
        "median_shape": [float(v) for v in np.median(np.array(shapes), axis=0)],
        "median_shape_after_crop": [float(v) for v in np.median(np.array(cropped), axis=0)],
        "intensity": per_channel[0], "intensity_per_channel": per_channel,
    }
    if task == "segmentation":
        fp["labels"] = dict(cases_doc.get("labels") or {})
        fp["label_voxels"] = {str(k): v for k, v in sorted(label_voxels.items())}
        fp["label_boxes"] = label_boxes
    else:
        fp["classes"] = dict(cases_doc.get("classes") or {})
        fp["class_counts"] = {str(k): v for k, v in sorted(class_counts.items())}
    logger.info("fingerprinted %d cases: median spacing %s, median shape %s", len(cases),
                fp["median_spacing"], fp["median_shape"])
    return fp


def relative_box(mask: np.ndarray) -> list[list[float]] | None:
    """The bounding box of a mask's voxels as fractions of the array's extent, per array axis.

    Args:
        mask: ``(*S)`` boolean foreground.

    Returns:
        ``[[lo, hi], ...]`` with ``lo = first / n`` and ``hi = (last + 1) / n`` of each axis, or
        None when the mask is empty. Images of different sizes then share one frame.
    """
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([round(hit[0] / mask.shape[axis], 6), round((hit[-1] + 1) / mask.shape[axis], 6)])
    return box


def _round_up(value: float, k: int) -> int:
    return int(math.ceil(value / k) * k)


def make_plan(fingerprint: Mapping[str, Any], ds_cfg: Mapping[str, Any], size_divisible: int,
              fixed_size: int | None) -> dict:
    """Derive the preprocessing plan from a fingerprint and the dataset config.

    Args:
        fingerprint: from :func:`compute_fingerprint`.
        ds_cfg: the dataset config; ``preprocess.spacing``, ``patch_size``, ``normalization``,
            ``ct_window``, ``crop_foreground``, ``image_size`` and ``max_patch_size`` (cap per
            axis on derived patch sizes, default 64) win over derived values when set; ``labels``
            / ``classes`` are copied from the fingerprint's dataset when given there.
        size_divisible: every patch axis must be a multiple of this (the segmenter's
            ``size_divisible``; 1 for classifiers).
        fixed_size: a classifier's fixed input size (``image_size`` it was built with), or None.

    Returns:
        ``{"task", "spatial_dims", "in_channels", "num_classes" (labels incl. background, or
        classes: the model's out_channels), "spacing": [..] | None, "patch_size": [..],
        "normalization", "ct_window"?: [lo, hi], "crop_foreground", "size_divisible",
        "image_size" (classification) | None, "samples_per_case", "intensity"}``. ``spacing`` is
        the median spacing unless every case already has it (then None: no resampling).
        Segmentation ``patch_size`` is the median cropped shape (at the target spacing) rounded up
        to ``size_divisible`` and capped at ``max_patch_size``; classification uses
        ``[image_size] * spatial_dims``.

    Raises:
        CapsmedError: a config value conflicts with the model (patch size not divisible, image size
            different from the model's fixed size).
        ValueError: ``size_divisible`` < 1.
    """
    if size_divisible < 1:
        raise ValueError(f"size_divisible must be >= 1, got {size_divisible}")
    pre = {k: v for k, v in (ds_cfg.get("preprocess") or {}).items() if v is not None}
    task = fingerprint["task"]
    dims = int(fingerprint["spatial_dims"])
    k = int(size_divisible)
    where = "dataset config"
    median_spacing = [float(v) for v in fingerprint["median_spacing"]]
    if pre.get("spacing") is not None:
        spacing = [float(v) for v in pre["spacing"]]
    elif task == "segmentation" and not np.allclose(
            np.array(fingerprint["spacings"]), np.array(median_spacing)[None], rtol=1e-3,
            atol=1e-5):
        spacing = median_spacing
    else:
        spacing = None
    names = fingerprint.get("labels" if task == "segmentation" else "classes") or {}
    plan: dict[str, Any] = {"task": task, "spatial_dims": dims,
                            "in_channels": int(fingerprint.get("in_channels", 1)),
                            "num_classes": len(names), "spacing": spacing}
    if task == "segmentation":
        if pre.get("patch_size") is not None:
            patch = [int(v) for v in pre["patch_size"]]
            bad = [v for v in patch if v % k]
            if bad:
                raise CapsmedError(f"{where}: preprocess.patch_size {patch} is not divisible by "
                                   f"the model's size_divisible {k}")
        else:
            cap = pre.get("max_patch_size", DEFAULT_MAX_PATCH)
            caps = list(cap) if isinstance(cap, (list, tuple)) else [cap] * dims
            target = spacing or median_spacing
            shape = [s * m / t for s, m, t in zip(fingerprint["median_shape_after_crop"],
                                                  median_spacing, target, strict=True)]
            patch = [max(k, min(_round_up(s, k), (int(c) // k) * k))
                     for s, c in zip(shape, caps, strict=True)]
        plan["patch_size"] = patch
        plan["image_size"] = None
        plan["crop_foreground"] = bool(pre.get("crop_foreground", True))
        plan["samples_per_case"] = int(pre.get("samples_per_case", 1))
    else:
        cfg_size = pre.get("image_size")
        if fixed_size is not None:
            if cfg_size is not None and int(cfg_size) != int(fixed_size):
                raise CapsmedError(f"{where}: preprocess.image_size {cfg_size} conflicts with the "
                                   f"model's fixed input size {fixed_size}")
            size = int(fixed_size)
        elif cfg_size is not None:
            size = int(cfg_size)
        else:
            size = _round_up(max(fingerprint["median_shape"]), k)
        if size % k:
            raise CapsmedError(f"{where}: image size {size} is not divisible by the model's "
                               f"size_divisible {k}")
        plan["patch_size"] = [size] * dims
        plan["image_size"] = size
        plan["crop_foreground"] = False
        plan["samples_per_case"] = 1
    modality = fingerprint.get("modality", "other")
    norm = pre.get("normalization") or (
        "ct" if modality == "CT" else "minmax" if task == "classification" else "zscore")
    plan["normalization"] = norm
    plan["modality"] = modality
    if norm == "ct":
        win = pre.get("ct_window")
        if win is None:
            it = fingerprint["intensity"]
            win = [it["percentile_00_5"], it["percentile_99_5"]]
        plan["ct_window"] = [float(win[0]), float(win[1])]
    plan["size_divisible"] = k
    plan["intensity"] = dict(fingerprint["intensity"])
    return plan
