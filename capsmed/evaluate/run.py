"""``capsmed evaluate``: one model on one dataset stage, in each study's original geometry.

Writes under ``results/{dataset}/eval/{model}/{stage}/``: ``cases.csv`` (one row per case),
``metrics.json`` (aggregate metrics with 95% bootstrap intervals, cost) and ``predictions/`` (label maps
as NIfTI with the input's shape and affine, uncertainty maps, capsule reconstructions).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.config import dataset_config, inference_config
from capsmed.errors import CapsmedError
from capsmed.paths import Layout, safe_name

logger = logging.getLogger(__name__)

SEG_HEADLINE = ("dice", "hd95", "assd")
CLS_HEADLINE = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece")


def _load_label(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Original label map and its voxel spacing."""
    import nibabel as nib

    img = nib.load(path)
    arr = np.asanyarray(img.dataobj)
    arr = np.rint(np.asarray(arr, dtype=np.float64)).astype(np.int64)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    spacing = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return arr, spacing


def _rows_to_csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def metric_label(name: str) -> str:
    """Label name as used in metric keys: lower case, runs of other characters as ``_``.

    ``"Anterior"`` -> ``anterior`` (metric ``dice_anterior``), ``"left kidney"`` -> ``left_kidney``.
    """
    import re

    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "label"


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def evaluate_stage(cfg: dict, dataset: str, model_name: str, stage: str, *,
                   threads: int | None = None) -> dict[str, Any]:
    """Evaluate one trained model on one dataset stage.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model name.
        stage: ``train``, ``val`` or ``test``.
        threads: CPU threads.

    Returns:
        The content written to ``metrics.json``.
    """
    import torch

    from capsmed.data.transforms import build_preprocess_transforms
    from capsmed.evaluate import metrics as M
    from capsmed.paths import read_json
    from capsmed.train.checkpoint import build_model, load_checkpoint
    from capsmed.train.inference import (
        predict_classification_case,
        predict_segmentation_case,
        save_nifti,
    )
    from capsmed.train.loop import stage_cases
    from capsmed.train.runtime import (
        atomic_write_json,
        atomic_write_text,
        configure_threads,
        peak_memory_mb,
        select_device,
        sha256_file,
    )

    if stage not in ("train", "val", "test"):
        raise CapsmedError(f"stage must be train, val or test, got {stage!r}")
    layout = Layout(Path(cfg["results"]))
    ds_cfg = dataset_config(cfg, dataset)
    icfg = inference_config(cfg, dataset)
    configure_threads(threads or cfg["threads"])
    device = select_device(cfg["device"])
    ckpt_path = layout.model_dir(dataset, model_name) / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt).to(device)
    plan = ckpt["plan"]
    names = ckpt["names"]
    task = ckpt["task"]
    cases_doc = read_json(layout.cases(dataset), "case list")
    splits = read_json(layout.splits(dataset), "splits")
    cases = stage_cases(cases_doc, splits, stage, int(ds_cfg["split"]["fold"]))
    out_dir = layout.eval_dir(dataset, model_name, stage)
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    preprocess = build_preprocess_transforms(plan)
    n_boot = int(cfg["evaluate"]["bootstrap"])
    seed = int(cfg["seed"])

    rows: list[dict] = []
    seconds: list[float] = []
    if task == "segmentation":
        fg = {int(k): metric_label(v) for k, v in names.items() if int(k) != 0}
        for case in cases:
            t0 = time.perf_counter()
            out = predict_segmentation_case(model, case, plan, preprocess, device, icfg)
            seconds.append(time.perf_counter() - t0)
            label, spacing = _load_label(case["label"])
            pred = out["pred"]
            if pred.shape != label.shape:
                raise CapsmedError(
                    f"{case['image']}: prediction shape {pred.shape} differs from the label's "
                    f"{label.shape} after inversion"
                )
            name = safe_name(case["case_id"])
            pred_path = pred_dir / f"{name}.nii.gz"
            save_nifti(pred, out["affine"], pred_path)
            unc_path = ""
            if out["uncertainty"] is not None:
                unc_path = pred_dir / f"{name}_uncertainty.nii.gz"
                save_nifti(out["uncertainty"], out["affine"], unc_path, dtype=np.float32)
            row = {"case_id": case["case_id"], "image": case["image"], "label": case["label"],
                   "prediction": str(pred_path.relative_to(layout.results)),
                   "uncertainty": str(Path(unc_path).relative_to(layout.results)) if unc_path
                   else ""}
            row.update(M.segmentation_case_metrics(pred, label, fg, spacing))
            rows.append(row)
        aggregate = M.aggregate_segmentation(rows)
        metric_keys = [k for k in aggregate if k.startswith(("dice", "hd95", "assd"))]
        metrics = {k: _finite(float(aggregate[k])) for k in metric_keys}
        ci = {}
        if n_boot:
            for k in metric_keys:
                vals = np.array([float(r[k]) for r in rows], dtype=float)
                if np.isfinite(vals).any():
                    ci[k] = [float(v) for v in M.bootstrap_mean_ci(vals, n_boot=n_boot, seed=seed)]
        fields = ["case_id", "image", "label", "prediction", "uncertainty"] + sorted(
            {k for r in rows for k in r} - {"case_id", "image", "label", "prediction",
                                             "uncertainty"})
        extra: dict[str, Any] = {"labels": names}
    else:
        y_true, probs_all = [], []
        recon_any = False
        for case in cases:
            t0 = time.perf_counter()
            out = predict_classification_case(model, case, preprocess, device)
            seconds.append(time.perf_counter() - t0)
            probs = out["probs"]
            row = {"case_id": case["case_id"], "image": case["image"], "class": int(case["class"]),
                   "predicted": int(np.argmax(probs)), "confidence": float(np.max(probs))}
            for k, p in enumerate(probs):
                row[f"prob_{k}"] = float(p)
            if out["lengths"] is not None:
                for k, v in enumerate(out["lengths"]):
                    row[f"length_{k}"] = float(v)
            row["reconstruction"] = ""
            if out["reconstruction"] is not None and stage == "test":
                rpath = pred_dir / f"{safe_name(case['case_id'])}_recon.npy"
                np.save(rpath, out["reconstruction"].astype(np.float32))
                row["reconstruction"] = str(rpath.relative_to(layout.results))
                recon_any = True
            rows.append(row)
            y_true.append(int(case["class"]))
            probs_all.append(probs)
        y = np.asarray(y_true)
        p = np.stack(probs_all) if probs_all else np.zeros((0, len(names)))
        result = M.classification_metrics(y, p)
        metrics = {k: _finite(float(v)) for k, v in result["metrics"].items()}
        ci = {}
        if n_boot and len(y):
            for k in ("accuracy", "balanced_accuracy", "auc", "f1"):
                lo_hi = M.bootstrap_metric_ci(y, p, k, n_boot=n_boot, seed=seed)
                if lo_hi is not None and all(np.isfinite(lo_hi)):
                    ci[k] = [float(v) for v in lo_hi]
        n_cls = p.shape[1] if p.ndim == 2 else len(names)
        fields = (["case_id", "image", "class", "predicted", "confidence"]
                  + [f"prob_{k}" for k in range(n_cls)]
                  + ([f"length_{k}" for k in range(n_cls)] if rows and "length_0" in rows[0]
                     else []) + ["reconstruction"])
        extra = {"classes": names, **{k: v for k, v in result.items() if k != "metrics"}}
        extra["has_reconstruction"] = recon_any

    doc = {
        "dataset": dataset, "model": model_name, "stage": stage, "task": task,
        "n_cases": len(rows), "metrics": metrics, "ci95": ci,
        "cost": {"inference_seconds_per_case": round(float(np.mean(seconds)), 4) if seconds
                 else None, "peak_memory_mb": round(peak_memory_mb(device), 1),
                 "device": str(device)},
        "checkpoint_sha256": sha256_file(ckpt_path), **extra,
    }
    atomic_write_text(out_dir / "cases.csv", _rows_to_csv(rows, fields))
    atomic_write_json(out_dir / "metrics.json", doc)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("%s/%s/%s: %d cases, %s", dataset, model_name, stage, len(rows),
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                          if v is not None and "_" not in k))
    return doc
