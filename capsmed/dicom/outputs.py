"""Write one study's DICOM SEG and SR, and record what was written and where it went.

``capsmed predict --dicom-out`` calls :func:`write_dicom_outputs` once per study after the NIfTI /
probability outputs exist. The record, ``{stem}_dicom.json`` beside the other outputs, is the one home
of these facts: the study report reads it (``StudyInput.dicom``).

Record shape::

    {"case_id": "...", "source": {"study_instance_uid", "series_instance_uid", "folder"},
     "objects": [{"kind": "SEG", "file": "case_seg.dcm", "sop_class_uid", "sop_instance_uid",
                  "series_instance_uid", "stored_to": ["https://pacs/dicom-web"]}, ...]}
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.data.labels import label_codes, name_map
from capsmed.dicom.seg import Algorithm, build_seg
from capsmed.dicom.series import SourceSeries
from capsmed.dicom.sr import build_classification_sr, build_segmentation_sr
from capsmed.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

#: File name suffix of the record next to a study's other outputs.
RECORD_SUFFIX = "_dicom.json"

#: Stores a list of datasets somewhere and returns where (e.g. a DICOMweb URL).
Sink = Callable[[Sequence[Any]], str]


def dataset_bytes(ds) -> bytes:
    """The DICOM file (Part 10, with preamble and meta header) of a dataset."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dicom_outputs(out_dir: Path, stem: str, case_id: str, series: SourceSeries,
                        algorithm: Algorithm, *, labels: Mapping[int, str] | None = None,
                        prediction: np.ndarray | None = None, affine: np.ndarray | None = None,
                        volumes_ml: Mapping[str, float] | None = None,
                        probabilities: Sequence[float] | None = None,
                        classes: Mapping[int, str] | None = None,
                        codes: Mapping[int, Mapping[str, Mapping[str, str]]] | None = None,
                        sink: Sink | None = None) -> Path:
    """Write the SEG (segmentation) and the SR of one study, optionally store them, record both.

    Args:
        out_dir: Output folder of ``capsmed predict``.
        stem: File-name stem of the study's outputs.
        case_id: Study id.
        series: The checked source series.
        algorithm: The model that made the prediction.
        labels: Segmentation: label index -> name.
        prediction: Segmentation: ``(X, Y, Z)`` label map as written to NIfTI.
        affine: Segmentation: its RAS affine.
        volumes_ml: Segmentation: structure name -> volume in mL (as the study report shows); a
            label value without an entry (a gap in the names, ``label k``) is measured here.
        probabilities: Classification: one probability per class.
        classes: Classification: class index -> name.
        codes: Segmentation: label index -> SNOMED CT ``{category, type, modifier?}``.
        sink: Stores the objects (STOW-RS) and returns where; None keeps them local.

    Returns:
        Path of the record ``{stem}_dicom.json``.
    """
    objects: list[tuple[str, Any]] = []
    if prediction is not None:
        labels = {int(k): str(v) for k, v in (labels or {}).items()}
        seg = build_seg(prediction, affine, series, labels, algorithm, codes)
        objects.append(("SEG", seg))
        vols = dict(volumes_ml or {})
        segments = {int(d.SegmentNumber): labels.get(int(d.SegmentNumber),
                                                     f"label {int(d.SegmentNumber)}")
                    for d in seg.SegmentSequence}
        missing = {k: name for k, name in segments.items() if name not in vols}
        if missing:
            vols.update(measure_volumes(prediction, affine, missing))
        objects.append(("SR", build_segmentation_sr(seg, series, vols, labels, algorithm, codes)))
    else:
        objects.append(("SR", build_classification_sr(series, probabilities or [], classes or {},
                                                      algorithm)))
    entries = []
    for kind, ds in objects:
        path = Path(out_dir) / f"{stem}_{kind.lower()}.dcm"
        atomic_write_bytes(path, dataset_bytes(ds))
        entries.append({"kind": kind, "file": path.name, "sop_class_uid": str(ds.SOPClassUID),
                        "sop_instance_uid": str(ds.SOPInstanceUID),
                        "series_instance_uid": str(ds.SeriesInstanceUID), "stored_to": []})
        logger.info("%s: wrote DICOM %s %s", case_id, kind, path)
    if sink is not None:
        where = sink([ds for _, ds in objects])
        for entry in entries:
            entry["stored_to"].append(where)
        logger.info("%s: stored %s to %s", case_id, " and ".join(k for k, _ in objects), where)
    record = {"case_id": case_id,
              "source": {"study_instance_uid": series.study_uid,
                         "series_instance_uid": series.series_uid, "folder": str(series.folder)},
              "objects": entries}
    out = Path(out_dir) / f"{stem}{RECORD_SUFFIX}"
    atomic_write_bytes(out, (json.dumps(record, indent=2) + "\n").encode())
    return out


def measure_volumes(pred: np.ndarray, affine: np.ndarray, labels: Mapping[int, str]
                    ) -> dict[str, float]:
    """Volume in mL of each given label value of a label map.

    Args:
        pred: ``(*S)`` label map.
        affine: Its voxel-to-world matrix.
        labels: Label value -> name, for the values to measure.

    Returns:
        ``{name: mL}``.
    """
    from nibabel.affines import voxel_sizes

    voxel_ml = float(np.prod(voxel_sizes(np.asarray(affine, float))[:3])) / 1000.0
    rounded = np.rint(pred).astype(np.int64)
    return {name: float(np.count_nonzero(rounded == k)) * voxel_ml for k, name in labels.items()}


def volumes_ml(pred: np.ndarray, affine: np.ndarray, names: Any) -> dict[str, float]:
    """Predicted volume in mL per foreground label name (what the study report shows).

    Args:
        pred: ``(*S)`` label map.
        affine: Its voxel-to-world matrix.
        names: Label index -> name, as a checkpoint stores them.

    Returns:
        ``{name: mL}`` for every foreground label.
    """
    labels = name_map({"labels": names}, "labels")
    return measure_volumes(pred, affine, {k: v for k, v in labels.items() if k > 0})


def canonical_options(options: Mapping[str, Any]) -> str:
    """The inference options as canonical JSON (sorted keys, no spaces): part of every UID."""
    return json.dumps(dict(options), sort_keys=True, separators=(",", ":"), default=str)


def write_case_dicom(out_dir: Path, stem: str, case_id: str, series: SourceSeries, task: str,
                     names: Any, out: Mapping[str, Any], *, model: str, checkpoint_sha256: str,
                     options: Mapping[str, Any] | None = None,
                     volumes: Mapping[str, float] | None = None,
                     probabilities: Sequence[float] | None = None,
                     codes: Mapping[Any, Any] | None = None, sink: Sink | None = None) -> Path:
    """SEG/SR of one predicted case, from what the inference functions return.

    Shared by ``capsmed predict`` and ``capsmed evaluate`` (``evaluate.dicom_out``). The derived
    UIDs depend on the source instances, the checkpoint, capsmed's version and every inference
    option (``options``, hashed as canonical JSON), so runs with different options never share a
    SOP Instance UID, and identical runs write identical bytes.

    Args:
        out_dir: Folder of the case's other outputs.
        stem: File-name stem of the case's outputs.
        case_id: Case id.
        series: The checked source series.
        task: ``segmentation`` or ``classification``.
        names: Label or class index -> name (as the checkpoint stores them); a label may also be
            ``{name, snomed}`` (:mod:`capsmed.data.labels`), whose codes the SEG then carries.
        out: ``predict_segmentation_case`` (``pred``, ``affine``) or
            ``predict_classification_case`` (``probs``) output.
        model: Model name.
        checkpoint_sha256: SHA-256 of the checkpoint.
        options: The inference settings that change the output (e.g. ``{"overlap": 0.5, "tta":
            true, "tta_flips": "axes", "largest_component": false, "mode": "gaussian",
            "ensemble": null}``, :func:`capsmed.infer.settings.result_settings`); None means
            none were given.
        volumes: Segmentation: structure name -> mL as the report shows them; computed from the
            prediction when None.
        probabilities: Classification: class probabilities; ``out["probs"]`` when None.
        codes: Segmentation: label index -> ``{category, type, modifier?}`` SNOMED CT codes (as
            ``cases.json``'s ``label_codes``); taken from rich ``names`` when None.
        sink: Stores the objects and returns where.

    Returns:
        Path of the record ``{stem}_dicom.json``.
    """
    from capsmed import __version__

    settings = dict(options or {})
    algorithm = Algorithm(model=model, checkpoint_sha256=checkpoint_sha256,
                          capsmed_version=__version__, options=canonical_options(settings))
    labels = name_map({"names": names}, "names")
    if task == "segmentation":
        given = codes if codes is not None else (names if isinstance(names, Mapping) else None)
        coded = label_codes(given) if codes is None else \
            {int(k): dict(v) for k, v in codes.items()}
        vols = volumes if volumes is not None else volumes_ml(out["pred"], out["affine"], names)
        return write_dicom_outputs(out_dir, stem, case_id, series, algorithm, labels=labels,
                                   prediction=out["pred"], affine=out["affine"], volumes_ml=vols,
                                   codes=coded or None, sink=sink)
    probs = probabilities if probabilities is not None else [float(p) for p in out["probs"]]
    return write_dicom_outputs(out_dir, stem, case_id, series, algorithm, probabilities=probs,
                               classes=labels, sink=sink)
