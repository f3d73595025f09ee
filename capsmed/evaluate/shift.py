"""Shifted test stages: every model on the test cases under named, graded shifts.

``capsmed evaluate-shift -d DATASET -m MODEL --shift NAME`` reads each test case in its original
geometry and intensity scale, shifts it (:func:`capsmed.data.shifts.apply_shift`: deterministic per
case, shift and severity; spatial shifts move the label with the image, nearest neighbour), and
predicts and scores it exactly as the test stage does: the one inference path
(:class:`capsmed.infer.predictor.Predictor`) with the run's inference settings, except test-time
augmentation, which the shifted stages leave off unless ``shift.tta`` asks for it, and the test
stage's per-case metrics and aggregation (:func:`capsmed.evaluate.run._case_row` and its tables).

Each severity of a shift writes ``eval/{model}/shift/{shift}/s{k}/metrics.json`` and ``cases.csv``
(:meth:`capsmed.paths.Layout.shift_dir`); the shift ``none`` at severity 0 is the clean reference
of the relative measures, made with the shifted stages' own settings. A ``gallery.npz`` beside
them holds the first test case's middle slice (image, label and prediction) for the pages.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError
from capsmed.paths import Layout

logger = logging.getLogger(__name__)

#: The clean reference: no shift, severity 0.
CLEAN = "none"


def shift_stage_settings(cfg: dict, dataset: str, plan: dict) -> tuple[dict, dict[str, Any]]:
    """``(shift settings, inference settings)`` of a dataset's shifted stages.

    The inference settings are the run's (:func:`capsmed.infer.settings.config_settings`) with
    ``tta`` from ``shift.tta``.
    """
    from capsmed.data.shifts import shift_settings
    from capsmed.infer.settings import config_settings

    shifts = shift_settings(cfg, dataset, plan)
    return shifts, {**config_settings(cfg, dataset), "tta": shifts["tta"]}


def _read_original(path: str, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """A study's image as ``(C, *S)`` float32 in its original scale, and its affine.

    NIfTI files are read with nibabel (their array and affine as stored); DICOM series with the
    pipeline's pinned reader.
    """
    from capsmed.data.transforms import LoadPinnedImaged

    if str(path).endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    else:
        meta = LoadPinnedImaged(keys="image", image_only=True)({"image": path})["image"]
        arr = np.asarray(meta, dtype=np.float32)
        affine = np.asarray(meta.affine, dtype=np.float64)
    while arr.ndim > spatial_dims + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    arr = arr[None] if arr.ndim == spatial_dims else np.moveaxis(arr, -1, 0)
    return arr, affine


def _write_shifted(case: dict, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray,
                   folder: Path) -> dict:
    """The shifted study as NIfTI files in ``folder``: a case entry pointing at them."""
    from capsmed.fileio import save_nifti
    from capsmed.paths import safe_name

    stem = safe_name(case["case_id"])
    out = dict(case)
    out["image"] = str(folder / f"{stem}.nii.gz")
    save_nifti(np.moveaxis(image, 0, -1) if image.shape[0] > 1 else image[0], out["image"],
               affine, dtype=np.float32)
    if label is not None:
        out["label"] = str(folder / f"{stem}_label.nii.gz")
        save_nifti(label, out["label"], affine, dtype=np.int16)
    return out


def _gallery(shifted: dict, row: dict, results: Path, spatial_dims: int) -> dict[str, np.ndarray]:
    """The middle slice (last axis for 3D) of a shifted case's image, label and prediction."""
    import nibabel as nib

    def middle(path: str) -> np.ndarray:
        arr = np.asarray(nib.load(path).dataobj)
        if spatial_dims == 3:
            arr = arr[:, :, arr.shape[2] // 2, ...]
        return arr[..., 0] if arr.ndim == 3 else arr

    out = {"image": middle(shifted["image"]).astype(np.float32)}
    if shifted.get("label"):
        out["label"] = middle(shifted["label"]).astype(np.int16)
        out["prediction"] = middle(str(results / row["prediction"])).astype(np.int16)
    else:
        out["probabilities"] = np.asarray([row[k] for k in sorted(row) if k.startswith("prob_")],
                                          dtype=np.float32)
    return out


def evaluate_shift(cfg: dict, dataset: str, model_name: str, shift: str, *,
                   severities: list[int] | None = None, threads: int | None = None,
                   fold: int | None = None) -> dict[int, dict[str, Any]]:
    """Evaluate one model on the test cases under one shift, at each of its severities.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model entry.
        shift: A shift of the dataset's list (``shift.shifts``, or its modality's defaults), or
            ``none``: the clean reference at severity 0.
        severities: The severities to run (default: the config's ``shift.severities``; ``[0]``
            for ``none``).
        threads: CPU threads.
        fold: Cross-validation fold (default ``split.fold``).

    Returns:
        ``{severity: metrics.json document}``.

    Raises:
        CapsmedError: A shift that is not in the dataset's list, a bad severity, or the errors of
            the test stage (missing checkpoint, unreadable case), each in one line.
    """
    from nibabel.affines import voxel_sizes

    from capsmed.config import resolve_fold
    from capsmed.data.shifts import apply_shift, check_severity, shift_kind
    from capsmed.data.splits import stage_cases
    from capsmed.evaluate.run import _case_row, _load_label, _rows_to_csv, _stage_document
    from capsmed.infer.checkpoint import load_checkpoint
    from capsmed.infer.predictor import Predictor
    from capsmed.infer.runtime import (
        atomic_write_json,
        atomic_write_text,
        configure_threads,
        peak_memory_mb,
        select_device,
    )
    from capsmed.paths import read_json

    layout = Layout(Path(cfg["results"]))
    configure_threads(threads or cfg["threads"])
    device = select_device(cfg["device"])
    fold_index, path_fold = resolve_fold(cfg, dataset, fold)
    ckpt_path = layout.model_dir(dataset, model_name, path_fold) / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    plan, task = ckpt["plan"], ckpt["task"]
    shifts, settings = shift_stage_settings(cfg, dataset, plan)
    if shift == CLEAN:
        severities = [0]
    else:
        if shift not in shifts["shifts"]:
            listed = ", ".join(shifts["shifts"]) or "none: shift.enabled is false"
            raise CapsmedError(f"dataset {dataset}: shift {shift!r} is not among its shifted "
                               f"stages ({listed}); set shift.shifts in the config")
        severities = [check_severity(s) for s in (severities or shifts["severities"])]
    kind = shift_kind(plan)
    dims = int(plan["spatial_dims"])
    predictor = Predictor(ckpt_path, settings, device=device, ckpt=ckpt)
    cases_doc = read_json(layout.cases(dataset), "case list")
    splits = read_json(layout.splits(dataset), "splits")
    cases = sorted(stage_cases(cases_doc, splits, "test", fold_index),
                   key=lambda c: str(c["case_id"]))
    docs = {}
    for severity in severities:
        out_dir = layout.shift_dir(dataset, model_name, shift, severity, path_fold)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # the shifted studies and their predictions, under the results folder, removed after
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir.parent))
        try:
            ctx = {"icfg": settings, "names": predictor.names, "layout": layout,
                   "pred_dir": work / "predictions", "stage": "shift",
                   "evidence_kind": predictor.evidence_kind, "dicom": None}
            ctx["pred_dir"].mkdir()
            rows, gallery, shift_seconds = [], None, []
            for case in cases:
                t0 = time.perf_counter()
                image, affine = _read_original(case["image"], dims)
                label = _load_label(case["label"])[0] if task == "segmentation" else None
                if shift != CLEAN:
                    image, label = apply_shift(shift, severity, image, label,
                                               seed_key=str(case["case_id"]),
                                               spacing=voxel_sizes(affine)[:dims], kind=kind)
                shifted = _write_shifted(case, image, label, affine, work)
                shift_seconds.append(time.perf_counter() - t0)
                row = _case_row(task, predictor, shifted, ctx)
                if gallery is None:
                    gallery = _gallery(shifted, row, layout.results, dims)
                for key, value in (("image", case["image"]), ("label", case.get("label", "")),
                                   ("prediction", ""), ("uncertainty", "")):
                    if key in row:
                        row[key] = value
                for key in ("evidence", "probability_maps", "reconstruction",
                            "pose_perturbation"):
                    row.pop(key, None)
                rows.append(row)
            identity = {"dataset": dataset, "model": model_name, "stage": "test",
                        "shift": shift, "severity": int(severity), "fold": fold_index,
                        "task": task}
            provenance = {"checkpoint_sha256": predictor.checkpoint_sha256,
                          "inference": settings, "shift_kind": kind}
            doc, fields = _stage_document(rows, predictor.names, cfg, identity, provenance,
                                          peak_memory_mb(device), str(device))
            doc["cost"]["shift_seconds_per_case"] = (round(float(np.mean(shift_seconds)), 4)
                                                     if shift_seconds else None)
            out_dir.mkdir(parents=True, exist_ok=True)
            if gallery is not None:
                np.savez_compressed(out_dir / "gallery.npz", case_id=str(cases[0]["case_id"]),
                                    **gallery)
            atomic_write_text(out_dir / "cases.csv", _rows_to_csv(rows, fields))
            atomic_write_json(out_dir / "metrics.json", doc)
            docs[severity] = doc
            logger.info("%s/%s shift %s severity %d: %d cases, %s", dataset, model_name, shift,
                        severity, len(rows), ", ".join(
                            f"{k}={v:.4f}" for k, v in doc["metrics"].items()
                            if v is not None and "_" not in k))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return docs
