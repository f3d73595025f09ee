"""``capsmed predict``: run a trained model on new, unlabeled studies.

The checkpoint carries everything inference needs (model name and arguments, preprocessing plan,
label or class names), and ``inference.json`` beside it the settings the pipeline evaluated it with
(:mod:`capsmed.infer.settings`), so a user passes only the checkpoint and the studies, and gets the
prediction ``capsmed evaluate`` made: both run :class:`capsmed.infer.predictor.Predictor`. A flag
may override a recorded setting; the override is written into each study's provenance. For each
study it writes the segmentation (NIfTI with the input's shape and affine; with TTA an uncertainty
map too) or the class probabilities (one CSV row per study), and a diagnostic report. The report has
the sections of a pipeline study page: a segmenter's evidence maps (capsule lengths beside the
decoder's probabilities, or a CNN's softmax) and a capsule classifier's reconstruction and pose-
perturbation panel, written by the same :mod:`capsmed.infer.study_files` as ``capsmed evaluate``.
With ``dicom_out`` it also writes, for DICOM series inputs, a DICOM SEG and a TID 1500 SR
(:mod:`capsmed.dicom`), and stores them on a DICOMweb server when given a sink; NIfTI inputs get no
DICOM objects (a SEG needs source instances).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError
from capsmed.paths import safe_name

logger = logging.getLogger(__name__)


def study_id(path: Path) -> str:
    """Study id from a file or folder name (``case_7.nii.gz`` -> ``case_7``)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_study(path: Path, spatial_dims: int) -> None:
    """Fail early, naming the file, when a study is missing or has the wrong dimensionality."""
    if not path.exists():
        raise CapsmedError(f"{path}: study not found")
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape = img.shape
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
            raise CapsmedError(f"{path}: not a readable NIfTI file ({exc})") from None
        dims = len([s for s in shape[:3] if s > 1]) if len(shape) >= 3 else len(shape)
        if len(shape) < spatial_dims or (spatial_dims == 2 and dims == 3):
            raise CapsmedError(
                f"{path}: image has shape {tuple(shape)} but the model expects "
                f"{spatial_dims}D images"
            )


def predict_studies(checkpoint: Path, studies: list[Path], out_dir: Path, *, device: str = "auto",
                    overrides: dict[str, Any] | None = None, dicom_out: bool = False,
                    sink: Callable[[Sequence[Any]], str] | None = None) -> list[dict]:
    """Predict each study and write outputs and reports under ``out_dir``.

    Args:
        checkpoint: ``best.pt`` written by ``capsmed train``.
        studies: NIfTI files or DICOM series folders.
        out_dir: Output folder (created).
        device: ``auto``, ``cpu`` or ``cuda``.
        overrides: Inference settings that replace the recorded ones (``tta``, ``tta_flips``,
            ``overlap``, ``largest_component``, ``sw_batch_size``; ``None`` values: as recorded in
            the checkpoint folder's ``inference.json``).
        dicom_out: For DICOM series inputs, also write a DICOM SEG (segmentation) and SR, and a
            ``{id}_dicom.json`` record of them. Every DICOM series is checked first (one volume: one
            orientation, no missing slice), so a bad one stops the run before anything is written.
        sink: Stores each study's SEG/SR (e.g. :meth:`capsmed.dicom.web.DicomWeb.store`) and
            returns where; needs ``dicom_out``.

    Returns:
        One dict per study: ``case_id``, ``report`` and ``prediction`` path or ``probabilities``,
        and ``dicom`` (the record's path) when DICOM objects were written.

    Raises:
        CapsmedError: Missing or unreadable studies or checkpoint, naming the file; a DICOM series
            that is no proper volume, naming its UID.
    """
    from capsmed.infer.checkpoint import load_checkpoint
    from capsmed.infer.predictor import Predictor
    from capsmed.infer.runtime import atomic_write_json, atomic_write_text
    from capsmed.report import write_study_report

    ckpt = load_checkpoint(checkpoint)
    plan, task, names = ckpt["plan"], ckpt["task"], ckpt["names"]
    if (overrides or {}).get("largest_component") and task != "segmentation":
        raise CapsmedError(f"{checkpoint}: --largest-component applies to segmentation models; "
                           f"this one is a {task} model")
    for study in studies:
        _check_study(Path(study), int(plan["spatial_dims"]))
    sources = _dicom_sources(studies) if dicom_out else {}
    predictor = Predictor.from_checkpoint(Path(checkpoint), overrides=overrides, device=device,
                                          ckpt=ckpt)
    kind = predictor.evidence_kind
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = predictor.provenance()
    atomic_write_json(out_dir / "provenance.json", provenance)
    results, rows = [], []
    seen: set[str] = set()
    for study in studies:
        study = Path(study)
        cid = study_id(study)
        if cid in seen:
            raise CapsmedError(f"{study}: a second study with id {cid!r}; rename one of them")
        seen.add(cid)
        stem = safe_name(cid)
        item = {"image": str(study.resolve()), "case_id": cid}
        out = _predict_one(predictor, item, study)
        report_info = {"case_id": cid, "task": task, "model": ckpt["model"]["name"],
                       "dataset": ckpt.get("dataset"), "image": item["image"],
                       "provenance": provenance}
        result = {"case_id": cid}
        if task == "segmentation":
            result["prediction"] = _save_segmentation(out, out_dir, stem, names, kind, report_info)
        else:
            probs = _save_classification(out, out_dir, stem, names, report_info)
            result["probabilities"] = probs
            rows.append({"case_id": cid, "image": item["image"],
                         "predicted": int(np.argmax(probs)),
                         **{f"prob_{k}": p for k, p in enumerate(probs)}})
        if dicom_out:
            record = _write_dicom(out_dir, stem, cid, study, sources.get(study), task, names, out,
                                  report_info, provenance, sink, predictor.label_codes)
            if record is not None:
                report_info["dicom"] = str(record)
                result["dicom"] = str(record)
        report = write_study_report(out_dir / f"{stem}.html", report_info)
        result["report"] = str(report)
        results.append(result)
        logger.info("%s: %s", cid, result.get("prediction") or result.get("probabilities"))
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out_dir / "probabilities.csv", buf.getvalue())
    return results


def _predict_one(predictor: Any, item: dict[str, str], study: Path) -> dict[str, Any]:
    """One study's prediction (:class:`capsmed.infer.predictor.Predictor`), errors named by the study.

    Raises:
        CapsmedError: The study cannot be read or predicted (no traceback).
    """
    try:
        return predictor.predict(item)
    except CapsmedError:
        raise
    except Exception as exc:  # noqa: BLE001 - report unreadable studies without a traceback
        raise CapsmedError(f"{study}: cannot be read or predicted ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _save_segmentation(out: dict[str, Any], out_dir: Path, stem: str, names: Any,
                       kind: str | None, report_info: dict[str, Any]) -> str:
    """Write a segmentation's label map, uncertainty and evidence maps; returns the map's path.

    Adds the files, volumes and evidence disagreement to ``report_info`` (the study page's input).
    """
    from capsmed.dicom.outputs import volumes_ml
    from capsmed.evaluate.evidence import evidence_disagreement
    from capsmed.fileio import save_nifti
    from capsmed.infer.study_files import save_segmentation_maps

    pred_path = out_dir / f"{stem}_seg.nii.gz"
    save_nifti(out["pred"], pred_path, out["affine"], dtype=np.uint8)
    report_info.update(prediction=str(pred_path), labels=names,
                       volumes_ml=volumes_ml(out["pred"], out["affine"], names))
    if out["uncertainty"] is not None:
        unc_path = out_dir / f"{stem}_uncertainty.nii.gz"
        save_nifti(out["uncertainty"], unc_path, out["affine"], dtype=np.float32)
        report_info["uncertainty"] = str(unc_path)
    maps = save_segmentation_maps(out, out_dir, stem)
    report_info.update({k: str(v) for k, v in maps.items()}, evidence_kind=kind)
    if maps and kind == "capsule lengths":
        report_info["evidence_disagreement"] = evidence_disagreement(out["evidence"],
                                                                     out["pred"])
    return str(pred_path)


def _save_classification(out: dict[str, Any], out_dir: Path, stem: str, names: Any,
                         report_info: dict[str, Any]) -> list[float]:
    """Write a classification's panels; returns its class probabilities.

    Adds the probabilities, capsule lengths and panel files to ``report_info``.
    """
    from capsmed.infer.study_files import save_classification_panels

    probs = [float(p) for p in out["probs"]]
    report_info.update(probabilities=probs, classes=names)
    if out["lengths"] is not None:
        report_info["lengths"] = [float(v) for v in out["lengths"]]
    report_info.update({k: str(v) for k, v in
                        save_classification_panels(out, out_dir, stem).items()})
    return probs


def _dicom_sources(studies: list[Path]) -> dict[Path, Any]:
    """Read and check every DICOM series input before anything is predicted or stored."""
    from capsmed.dicom.series import load_series

    return {Path(s): load_series(Path(s)) for s in studies if Path(s).is_dir()}


def _write_dicom(out_dir: Path, stem: str, cid: str, study: Path, series: Any, task: str,
                 names: Any, out: dict, report_info: dict, provenance: dict,
                 sink: Callable[[Sequence[Any]], str] | None, codes: Any = None) -> Path | None:
    """Write (and maybe store) one study's SEG and SR; None, with one log line, for NIfTI inputs."""
    from capsmed.dicom.outputs import write_case_dicom

    if series is None:
        logger.info("%s: no DICOM SEG/SR written: the input %s is not a DICOM series (a SEG "
                    "references the source's DICOM instances)", cid, study.name)
        return None
    return write_case_dicom(out_dir, stem, cid, series, task, names, out,
                            model=str(provenance["model"]),
                            checkpoint_sha256=str(provenance["checkpoint_sha256"]),
                            options=provenance["inference"], codes=codes,
                            volumes=report_info.get("volumes_ml"),
                            probabilities=report_info.get("probabilities"), sink=sink)
