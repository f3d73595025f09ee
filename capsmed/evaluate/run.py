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

from capsmed.config import resolve_fold, subset_spec
from capsmed.errors import CapsmedError
from capsmed.infer.study_files import save_classification_panels, save_segmentation_maps
from capsmed.paths import Layout, safe_name

logger = logging.getLogger(__name__)

SEG_HEADLINE = ("dice", "hd95", "assd")
CLS_HEADLINE = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece")


def _load_label(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Original label map and its voxel spacing (from the affine, as every stage reads it)."""
    import nibabel as nib
    from nibabel.affines import voxel_sizes

    img = nib.load(path)
    arr = np.asanyarray(img.dataobj)
    arr = np.rint(np.asarray(arr, dtype=np.float64)).astype(np.int64)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    spacing = tuple(float(z) for z in voxel_sizes(img.affine)[: arr.ndim])
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


def _case_row(task: str, predictor: Any, case: dict, ctx: dict[str, Any]) -> dict[str, Any]:
    """Predict one case and measure it: one row of ``cases.csv`` (predictions saved to disk).

    Args:
        task: ``segmentation`` or ``classification``.
        predictor: The :class:`capsmed.infer.predictor.Predictor` of the evaluated checkpoint.
        case: One entry of ``cases.json``.
        ctx: ``icfg`` (the inference settings), ``names``, ``layout``, ``pred_dir``, ``stage``,
            ``evidence_kind``, ``dicom``.

    Returns:
        The row, with the prediction's seconds under ``"_seconds"``.
    """
    from capsmed.evaluate import metrics as M
    from capsmed.evaluate.uncertainty import case_uncertainty
    from capsmed.fileio import save_nifti

    layout, pred_dir, names = ctx["layout"], ctx["pred_dir"], ctx["names"]
    t0 = time.perf_counter()
    out = predictor.predict(case)
    if task == "segmentation":
        seconds = time.perf_counter() - t0
        label, spacing = _load_label(case["label"])
        pred = out["pred"]
        if pred.shape != label.shape:
            raise CapsmedError(
                f"{case['image']}: prediction shape {pred.shape} differs from the label's "
                f"{label.shape} after inversion"
            )
        name = safe_name(case["case_id"])
        pred_path = pred_dir / f"{name}.nii.gz"
        save_nifti(pred, pred_path, out["affine"], dtype=np.uint8)
        unc_path = ""
        if out["uncertainty"] is not None:
            unc_path = pred_dir / f"{name}_uncertainty.nii.gz"
            save_nifti(out["uncertainty"], unc_path, out["affine"], dtype=np.float32)
        row = {"case_id": case["case_id"], "image": case["image"], "label": case["label"],
               "prediction": str(pred_path.relative_to(layout.results)),
               "uncertainty": str(Path(unc_path).relative_to(layout.results)) if unc_path
               else ""}
        fg = {int(k): metric_label(v) for k, v in names.items() if int(k) != 0}
        row.update(M.segmentation_case_metrics(pred, label, fg, spacing))
        region = foreground = None
        if not pred.any():  # nothing found: where should it have been?
            region, foreground = _miss_regions(case, pred.shape, ctx.get("label_boxes") or [])
        row.update(case_uncertainty(out["uncertainty"], pred, label, out["pass_counts"],
                                    float(np.prod(spacing)) / 1000.0, fg, region, foreground))
        row["_pass_seconds"] = [float(x) for x in out["pass_seconds"]]
        row.update(_evidence_files(out, ctx, name))
        if ctx.get("dicom") and Path(case["image"]).is_dir():
            volumes = {str(names[k] if k in names else names[str(k)]): row[f"volume_ml_{v}"]
                       for k, v in fg.items() if f"volume_ml_{v}" in row}
            _write_dicom(case, name, task, names, out, ctx, volumes=volumes or None)
    else:
        seconds = time.perf_counter() - t0
        probs = out["probs"]
        row = {"case_id": case["case_id"], "image": case["image"], "class": int(case["class"]),
               "predicted": int(np.argmax(probs)), "confidence": float(np.max(probs))}
        for k, p in enumerate(probs):
            row[f"prob_{k}"] = float(p)
        if out["lengths"] is not None:
            for k, v in enumerate(out["lengths"]):
                row[f"length_{k}"] = float(v)
        if ctx.get("dicom") and Path(case["image"]).is_dir():
            _write_dicom(case, safe_name(case["case_id"]), task, names, out, ctx)
        row["reconstruction"] = row["pose_perturbation"] = ""
        if ctx["stage"] == "test":  # the study pages' panels
            for key, path in save_classification_panels(
                    out, pred_dir, safe_name(case["case_id"])).items():
                row[key] = str(path.relative_to(layout.results))
    row["_seconds"] = seconds
    return row


def _miss_regions(case: dict, shape: tuple[int, ...], boxes: list
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """For a study where nothing was found: ``(expected region, image foreground)`` masks.

    The expected region comes from the training labels' boxes
    (:func:`capsmed.evaluate.uncertainty.expected_region`); the image's foreground (voxels above
    its minimum, the air or padding of a scan) is read only when there is no such region.
    """
    from capsmed.evaluate.uncertainty import expected_region

    region = expected_region(boxes, shape)
    if region is not None:
        return region, None
    from capsmed.data.transforms import LoadPinnedImaged

    image = np.asarray(LoadPinnedImaged(keys="image", image_only=True)(
        {"image": case["image"]})["image"])
    if image.shape[: len(shape)] != tuple(shape):
        return None, None
    image = image.reshape(*shape, -1)
    return None, (image > image.min()).any(axis=-1)


def _write_dicom(case: dict, stem: str, task: str, names: Any, out: dict, ctx: dict[str, Any],
                 volumes: dict[str, float] | None = None) -> None:
    """``evaluate.dicom_out``: the case's DICOM SEG/SR beside its prediction (DICOM inputs only)."""
    from capsmed.dicom.outputs import write_case_dicom
    from capsmed.dicom.series import load_series
    from capsmed.infer.settings import result_settings

    write_case_dicom(ctx["pred_dir"], stem, str(case["case_id"]), load_series(Path(case["image"])),
                     task, names, out, options=result_settings(ctx["icfg"]), volumes=volumes,
                     codes=ctx.get("label_codes"),
                     **ctx["dicom"])


#: Classification metrics that get a bootstrap interval in ``metrics.json``.
CI_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")


def _evidence_files(out: dict, ctx: dict[str, Any], name: str) -> dict[str, Any]:
    """The evidence columns of a segmentation case; its maps saved for the test stage's reports.

    ``evidence_disagreement`` (capsule models only, see :mod:`capsmed.evaluate.evidence`), and the
    paths of ``{name}_evidence.nii.gz`` and ``{name}_probs.nii.gz``
    (:func:`capsmed.infer.study_files.save_segmentation_maps`).
    """
    from capsmed.evaluate.evidence import evidence_disagreement

    if out.get("evidence") is None:
        return {}
    cols: dict[str, Any] = {"evidence": "", "probability_maps": "",
                            "_evidence_kind": ctx["evidence_kind"]}
    if ctx["evidence_kind"] == "capsule lengths":
        cols["evidence_disagreement"] = evidence_disagreement(out["evidence"], out["pred"])
    if ctx["stage"] == "test":
        for key, path in save_segmentation_maps(out, ctx["pred_dir"], name).items():
            cols[key] = str(path.relative_to(ctx["layout"].results))
    return cols


def _aggregate(task: str, rows: list[dict], names: dict, n_boot: int,
               seed: int) -> tuple[dict, dict, list[str], dict]:
    """Stage metrics from the case rows: ``(metrics, ci95, csv fields, extra keys)``."""
    from capsmed.evaluate import metrics as M

    ci: dict[str, list[float]] = {}
    if task == "segmentation":
        aggregate = M.aggregate_segmentation(rows)
        metric_keys = [k for k in aggregate if k.startswith(("dice", "hd95", "assd"))]
        metrics = {k: _finite(float(aggregate[k])) for k in metric_keys}
        if n_boot:
            cis = M.bootstrap_segmentation_cis([{k: r[k] for k in metric_keys} for r in rows],
                                               n_boot=n_boot, seed=seed)
            ci = {k: [float(v) for v in lo_hi] for k, lo_hi in cis.items()
                  if all(np.isfinite(lo_hi))}
        fixed = ["case_id", "image", "label", "prediction", "uncertainty"]
        fields = fixed + sorted({k for r in rows for k in r if not k.startswith("_")} - set(fixed))
        return metrics, ci, fields, {"labels": names}
    n_cls = len(names) if names else (
        sum(1 for k in rows[0] if k.startswith("prob_")) if rows else 2)
    y = np.asarray([int(r["class"]) for r in rows])
    p = (np.asarray([[float(r[f"prob_{k}"]) for k in range(n_cls)] for r in rows])
         if rows else np.zeros((0, n_cls)))
    result = M.classification_metrics(y, p)
    metrics = {k: _finite(float(v)) for k, v in result["metrics"].items()}
    if n_boot and len(y):  # one set of resamples for every metric
        cis = M.bootstrap_classification_cis(y, p, metrics=CI_METRICS, n_boot=n_boot, seed=seed)
        ci = {k: [float(v) for v in lo_hi] for k, lo_hi in cis.items() if all(np.isfinite(lo_hi))}
    fields = (["case_id", "image", "class", "predicted", "confidence"]
              + [f"prob_{k}" for k in range(n_cls)]
              + ([f"length_{k}" for k in range(n_cls)] if rows and "length_0" in rows[0]
                 else []) + ["reconstruction", "pose_perturbation"])
    extra = {"classes": names, **{k: v for k, v in result.items() if k != "metrics"}}
    extra["has_reconstruction"] = any(r.get("reconstruction") for r in rows)
    return metrics, ci, fields, extra


def case_file(eval_dir: Path, case_id: str) -> Path:
    """Where a per-case evaluation job writes its row: ``{eval_dir}/cases/{safe id}.json``."""
    return Path(eval_dir) / "cases" / f"{safe_name(case_id)}.json"


def _gather_case_files(out_dir: Path, cases: list[dict], ckpt_path: Path,
                       ckpt_sha: str) -> tuple[list[dict], float, str | None]:
    """The rows of a stage evaluated one case per job: ``(rows, peak MB, device)``.

    Raises:
        CapsmedError: A case file is missing or unreadable, or was made with another checkpoint.
    """
    from capsmed.paths import read_json

    rows: list[dict] = []
    peak, device = 0.0, None  # the device of the last case file that names one
    for c in cases:
        path = case_file(out_dir, c["case_id"])
        doc = read_json(path, f"evaluation of case {c['case_id']}")
        if doc.get("checkpoint_sha256") != ckpt_sha:
            raise CapsmedError(f"{path}: made with another checkpoint than {ckpt_path}; "
                               "evaluate that case again")
        rows.append(doc["row"])
        peak = max(peak, float(doc.get("peak_memory_mb") or 0.0))
        device = doc.get("device") or device
    return rows, peak, None if device is None else str(device)


def _predict_cases(task: str, ckpt: dict, cases: list[dict], ctx: dict[str, Any],
                   where: str) -> tuple[list[dict], float]:
    """Predict every case with the checkpoint's model: ``(rows, peak MB)``.

    ``ctx`` is :func:`_case_row`'s context without ``evidence_kind``, plus ``checkpoint`` and
    ``device``; the predictor's evidence kind is added. ``where`` (``dataset/stage``) names the
    stage in log messages.
    """
    from capsmed.infer.predictor import Predictor
    from capsmed.infer.runtime import peak_memory_mb

    predictor = Predictor(ctx["checkpoint"], ctx["icfg"], device=ctx["device"], ckpt=ckpt)
    ctx = {**ctx, "evidence_kind": predictor.evidence_kind, "label_codes": predictor.label_codes}
    if ctx["dicom"] and not any(Path(c["image"]).is_dir() for c in cases):
        logger.info("%s: evaluate.dicom_out writes no DICOM SEG/SR: no %s case is a DICOM "
                    "series (a SEG references the source's DICOM instances)", where, ctx["stage"])
    rows = [_case_row(task, predictor, c, ctx) for c in cases]
    return rows, peak_memory_mb(ctx["device"])


def _stage_document(rows: list[dict], names: Any, cfg: dict, identity: dict[str, Any],
                    provenance: dict[str, Any], peak: float,
                    device: str) -> tuple[dict[str, Any], list[str]]:
    """``metrics.json``'s content from the case rows, and the fields of ``cases.csv``.

    Removes the rows' private keys (timings, histograms, evidence kind) once they are counted.

    Args:
        rows: One dict per case (:func:`_case_row`).
        names: Label or class names of the checkpoint.
        cfg: Validated configuration (bootstrap resamples, seed).
        identity: dataset, model, stage, fold and task, the document's first keys.
        provenance: checkpoint hash and inference settings, after the cost.
        peak: Peak memory in MB.
        device: Device the cases ran on.

    Returns:
        ``(document, fields)``: what ``metrics.json`` holds, and the columns of ``cases.csv``.
    """
    from capsmed.evaluate.uncertainty import calibrate, tta_cost

    task = identity["task"]
    seconds = [float(r.pop("_seconds")) for r in rows]
    pass_seconds = [r.pop("_pass_seconds", None) for r in rows]
    metrics, ci, fields, extra = _aggregate(task, rows, names, int(cfg["evaluate"]["bootstrap"]),
                                            int(cfg["seed"]))
    doc = {
        **identity, "n_cases": len(rows), "metrics": metrics, "ci95": ci,
        "cost": {"inference_seconds_per_case": round(float(np.mean(seconds)), 4) if seconds
                 else None, "peak_memory_mb": round(peak, 1), "device": device},
        **provenance, **extra,
    }
    if task == "segmentation":
        doc["cost"].update(tta_cost(pass_seconds))
        kinds = {r.get("_evidence_kind") for r in rows} - {None}
        if kinds:
            doc["evidence_kind"] = kinds.pop()
        if identity["stage"] == "val":
            doc["uncertainty_calibration"] = calibrate(rows)
    for r in rows:
        for key in ("_entropy_hist_error", "_entropy_hist_correct", "_evidence_kind"):
            r.pop(key, None)
    return doc, fields


def _training_label_boxes(layout: Layout, dataset: str, cases_doc: dict, splits: dict,
                          fold_index: int) -> list:
    """The fingerprint's label boxes of the training cases (segmentation; empty otherwise)."""
    from capsmed.data.splits import stage_cases
    from capsmed.paths import read_json

    fp = read_json(layout.fingerprint(dataset), "fingerprint", required=False, default={})
    boxes = dict(zip(fp.get("case_ids", []), fp.get("label_boxes", []), strict=False))
    return [boxes.get(c["case_id"]) for c in stage_cases(cases_doc, splits, "train", fold_index)]


def evaluate_stage(cfg: dict, dataset: str, model_name: str, stage: str, *,
                   threads: int | None = None, fold: int | None = None, case: str | None = None,
                   from_cases: bool = False, fraction: str | None = None) -> dict[str, Any]:
    """Evaluate one trained model on one dataset stage, or on one case of it.

    By default every case of the stage is predicted in this process. For a cluster, the work can
    be spread over one job per case (``evaluate.per_case_jobs``): each runs with ``case`` and
    writes ``eval/.../{stage}/cases/{safe id}.json``; a last job runs with ``from_cases`` and
    builds the stage's tables from those files without loading the model's weights on a device.
    Both ways give the same ``cases.csv`` and ``metrics.json``.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model name.
        stage: ``train``, ``val`` or ``test``.
        threads: CPU threads.
        fold: Cross-validation fold (default ``split.fold``): its model and its stage cases.
        case: Only this case (its id, or the file-safe name of its id); writes its case file.
        from_cases: Aggregate the case files of every case of the stage instead of predicting.
        fraction: A learning-curve model's subset label (``"0.25"``, ``"minority0.25"``): its
            model (``models/{model}[/fold{k}]/fraction-{label}``) on the ordinary test cases,
            written to ``eval/{model}[/fold{k}]/fraction-{label}/test``; test stage only.

    Returns:
        The content written to ``metrics.json`` (or, with ``case``, to the case file).

    Raises:
        CapsmedError: On an unknown stage or case, a case file that is missing or unreadable, a
            prediction whose shape differs from its label's, or a ``fraction`` with a stage other
            than test or one the config does not list.
    """
    import torch

    from capsmed.data.splits import stage_cases
    from capsmed.infer.checkpoint import load_checkpoint
    from capsmed.infer.runtime import (
        atomic_write_json,
        atomic_write_text,
        configure_threads,
        select_device,
        sha256_file,
    )
    from capsmed.infer.settings import config_settings, record_settings
    from capsmed.paths import read_json

    if stage not in ("train", "val", "test"):
        raise CapsmedError(f"stage must be train, val or test, got {stage!r}")
    if case is not None and from_cases:
        raise CapsmedError("evaluate: give either a case or from_cases, not both")
    if fraction is not None and stage != "test":
        raise CapsmedError(f"evaluate: a learning-curve model (fraction {fraction}) is evaluated "
                           f"on the test stage only, not {stage}")
    layout = Layout(Path(cfg["results"]))
    icfg = config_settings(cfg, dataset)
    configure_threads(threads or cfg["threads"])
    device = select_device(cfg["device"])
    fold_index, path_fold = resolve_fold(cfg, dataset, fold)
    label = None if fraction is None else subset_spec(cfg, dataset, model_name, fraction)["label"]
    ckpt_path = (layout.model_dir(dataset, model_name, path_fold) if label is None else
                 layout.fraction_model_dir(dataset, model_name, label, path_fold)) / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    record_settings(ckpt_path.parent, icfg)  # what capsmed predict reads beside best.pt
    ckpt_sha = sha256_file(ckpt_path)
    names, task = ckpt["names"], ckpt["task"]
    cases_doc = read_json(layout.cases(dataset), "case list")
    splits = read_json(layout.splits(dataset), "splits")
    cases = stage_cases(cases_doc, splits, stage, fold_index)
    label_boxes = _training_label_boxes(layout, dataset, cases_doc, splits, fold_index)
    out_dir = (layout.eval_dir(dataset, model_name, stage, path_fold) if label is None else
               layout.fraction_eval_dir(dataset, model_name, label, path_fold))
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    if case is not None:
        chosen = [c for c in cases if case in (str(c["case_id"]), safe_name(c["case_id"]))]
        if not chosen:
            raise CapsmedError(f"dataset {dataset}: no case {case!r} in the {stage} stage"
                               + (f" of fold {fold_index}" if path_fold is not None else ""))
        cases = chosen[:1]

    if from_cases:
        rows, peak, device_name = _gather_case_files(out_dir, cases, ckpt_path, ckpt_sha)
        device_name = device_name or str(device)
    else:
        ctx = {"checkpoint": ckpt_path, "device": device, "icfg": icfg, "names": names, "layout": layout,
               "pred_dir": pred_dir, "stage": stage, "label_boxes": label_boxes,
               "dicom": {"model": model_name, "checkpoint_sha256": ckpt_sha}
               if cfg["evaluate"].get("dicom_out") else None}
        rows, peak = _predict_cases(task, ckpt, cases, ctx, f"{dataset}/{stage}")
        device_name = str(device)
        if case is not None:
            doc = {"dataset": dataset, "model": model_name, "stage": stage, "fold": fold_index,
                   "row": rows[0], "peak_memory_mb": round(peak, 1), "device": device_name,
                   "checkpoint_sha256": ckpt_sha}
            atomic_write_json(case_file(out_dir, cases[0]["case_id"]), doc)
            logger.info("%s/%s/%s: case %s in %.2f s", dataset, model_name, stage,
                        cases[0]["case_id"], rows[0]["_seconds"])
            return doc

    identity = {"dataset": dataset, "model": model_name, "stage": stage, "fold": fold_index,
                "task": task, **({} if label is None else {"fraction": label})}
    doc, fields = _stage_document(rows, names, cfg, identity,
                                  {"checkpoint_sha256": ckpt_sha, "inference": icfg},
                                  peak, device_name)
    atomic_write_text(out_dir / "cases.csv", _rows_to_csv(rows, fields))
    atomic_write_json(out_dir / "metrics.json", doc)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("%s/%s/%s: %d cases, %s", dataset, model_name, stage, len(rows),
                ", ".join(f"{k}={v:.4f}" for k, v in doc["metrics"].items()
                          if v is not None and "_" not in k))
    return doc
