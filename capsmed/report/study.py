"""Per-study diagnostic reports: what the model found in one study, and how sure it is.

A segmentation study page has an interactive NiiVue viewer (:mod:`capsmed.report.viewer`), the
test-time-augmentation uncertainty with the thresholds calibrated on the validation stage, and what
the model saw (class-capsule lengths beside the decoder's probabilities, or a CNN's softmax); a
capsule classifier's page has its class-capsule lengths, reconstruction and pose-perturbation panel.

:func:`write_study_report` renders one study from a :class:`StudyInput` dict; it serves both the test
studies of an evaluated stage (:func:`write_study_reports` builds the dicts from ``cases.csv``) and new,
unlabeled studies given to ``capsmed predict``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import nibabel as nib
import numpy as np
import pandas as pd

from capsmed.errors import CapsmedError
from capsmed.measures import normalised_entropy
from capsmed.paths import DatasetLayout
from capsmed.report import blocks as b
from capsmed.report import figures as fig
from capsmed.report import viewer as vw
from capsmed.report.files import (
    Volume,
    class_column,
    file_date,
    label_names,
    load_array,
    load_volume,
    name_map,
    read_json,
    read_table,
    resolve_path,
    task_of,
    to_float,
)
from capsmed.report.render import (
    RESEARCH_NOTE,
    fmt_flops,
    fmt_mb,
    fmt_metric,
    fmt_num,
    fmt_params,
    fmt_seconds,
    is_number,
    metric_label,
    metric_sort_key,
    rel_href,
    render_page,
    safe_relative_link,
    study_filename,
)

logger = logging.getLogger(__name__)


class StudyInput(TypedDict, total=False):
    """Everything a study report shows. Only ``case_id`` is required; absent parts are left out.

    Paths may be ``str`` or :class:`~pathlib.Path`; relative paths are taken relative to the current
    working directory (pass absolute paths).

    Attributes:
        case_id: Study id, shown escaped exactly as given.
        task: ``"segmentation"`` or ``"classification"``; inferred when absent (probabilities or
            classes -> classification, otherwise segmentation).
        dataset: Dataset name (shown in the title line).
        model: Model name.
        stage: Stage the study belongs to (``train``/``val``/``test``); omit for new studies.
        image: The input image (NIfTI; other formats are listed but not drawn).
        prediction: Segmentation: the predicted label map (NIfTI, same geometry as ``image``).
        label: Segmentation: the ground-truth label map when known.
        labels: Segmentation label names ``{0: "background", 1: "tumour"}`` (keys int or str).
        classes: Classification class names ``{0: "normal", 1: "pneumonia"}``.
        probabilities: Classification: one probability per class, as a list in class order or a
            mapping class index (or name) -> probability.
        predicted: Predicted class index; defaults to the argmax of ``probabilities``.
        true_class: Ground-truth class index when known.
        confidence: Confidence of the prediction; defaults to the predicted class's probability.
        lengths: Capsule models: class-capsule lengths (list in class order or mapping).
        reconstruction: Capsule models: ``.npy`` reconstruction from the winning capsule,
            ``(C, *S)`` or ``(*S)``.
        pose_perturbation: Capsule classifiers: ``.npz`` with ``reconstructions`` ``(D, steps,
            H, W)`` as each pose dimension of the winning capsule moves by ``steps``.
        uncertainty: Test-time-augmentation uncertainty: a NIfTI voxel map (segmentation: the
            normalised entropy of the mean probabilities, 0 to 1) or a number.
        uncertainty_mean: Segmentation: mean of the uncertainty map inside the predicted
            structures (``cases.csv``); computed from the map when absent.
        volume_spread_ml: Segmentation: per label name, the largest minus the smallest volume over
            the test-time-augmentation passes.
        uncertainty_calibration: The validation stage's ``uncertainty_calibration`` (from
            ``metrics.json``): ``voxel_threshold``, ``study_threshold``, ``n_cases``, ...
        evidence: Segmentation: NIfTI of the model's evidence per class, channels last (capsule
            lengths, coarse ones at their own resolution, or a CNN's softmax).
        probability_maps: Segmentation: NIfTI of the final class probabilities, channels last.
        evidence_kind: ``"capsule lengths"`` or ``"softmax"`` (``metrics.json``).
        evidence_disagreement: Capsule segmenters: share of structure voxels where the capsules'
            strongest class differs from the final label (``cases.csv``).
        volumes_ml: Predicted structure volume in mL per label name, as the evaluation
            (``volume_ml_<name>`` of ``cases.csv``) or ``capsmed predict`` computed it.
        volumes_true_ml: Ground-truth volume in mL per label name (``volume_true_ml_<name>``).
        volume_range_ml: Per label name, the range of true volumes seen in training cases, as
            ``[min, max]`` or ``{"min", "max", "median", "n"}``.
        case_metrics: Per-study metrics against the ground truth, e.g. ``{"dice": 0.9, "hd95": 2.1}``.
        provenance: ``train.json``-like dict: ``model``, ``checkpoint_sha256``, ``config_hash``,
            ``seed``, ``params``, ``versions`` (package -> version), ``date``; other scalar keys are
            listed too.
        links: Navigation ``[{"text", "href"}]``; hrefs are relative to the report file (others are
            dropped).
        dicom: ``{id}_dicom.json`` written by ``capsmed predict --dicom-out``: the DICOM SEG/SR
            objects (SOP Instance UIDs) and where they were stored.
    """

    case_id: str
    task: str
    dataset: str
    model: str
    stage: str
    image: str | Path | None
    prediction: str | Path | None
    label: str | Path | None
    labels: Mapping[Any, str]
    classes: Mapping[Any, str]
    probabilities: Sequence[float] | Mapping[Any, float]
    predicted: int | None
    true_class: int | None
    confidence: float | None
    lengths: Sequence[float] | Mapping[Any, float] | None
    reconstruction: str | Path | None
    pose_perturbation: str | Path | None
    uncertainty: str | Path | float | None
    uncertainty_mean: float | None
    volume_spread_ml: Mapping[str, float]
    uncertainty_calibration: Mapping[str, Any] | None
    evidence: str | Path | None
    probability_maps: str | Path | None
    evidence_kind: str | None
    evidence_disagreement: float | None
    volumes_ml: Mapping[str, float]
    volumes_true_ml: Mapping[str, float]
    volume_range_ml: Mapping[str, Any]
    case_metrics: Mapping[str, float]
    provenance: Mapping[str, Any]
    links: Sequence[Mapping[str, str]]
    dicom: str | Path | None


# ----------------------------------------------------------------------------- shared helpers


def _as_path(value: Any) -> Path | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return Path(text) if text and text.lower() != "nan" else None


def _names(raw: Any) -> dict[int, str]:
    return name_map({"x": raw}, "x") if raw is not None else {}


def _per_class(values: Any, names: Mapping[int, str]) -> list[float] | None:
    """A list in class order from a list or a mapping keyed by class index or name."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        by_name = {str(k): v for k, v in values.items()}
        out = []
        for idx, name in names.items():
            v = by_name.get(str(idx), by_name.get(name))
            out.append(to_float(v) if v is not None else float("nan"))
        return out if out else None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _class_index(value: Any, names: Mapping[int, str]) -> int | None:
    """A class given as an index (``1``, ``"1"``, ``1.0``) or a name, as an index."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    f = to_float(value)
    if f is not None and float(f).is_integer():
        return int(f)
    for idx, name in names.items():
        if str(value) == name:
            return idx
    return None


def _range_bounds(value: Any) -> tuple[float, float, str] | None:
    """``(min, max, description)`` of a training volume range given as a list or a dict."""
    if isinstance(value, Mapping):
        lo, hi = to_float(value.get("min")), to_float(value.get("max"))
        extra = []
        if to_float(value.get("median")) is not None:
            extra.append(f"median {value['median']:.2f}")
        if to_float(value.get("n")) is not None:
            extra.append(f"{int(value['n'])} cases")
        desc = ", ".join(extra)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = to_float(value[0]), to_float(value[1])
        desc = ""
    else:
        return None
    if lo is None or hi is None:
        return None
    return lo, hi, desc


def segmentation_figure(image_path: Path | None, prediction_path: Path | None,
                        label_path: Path | None, label_names: Mapping[int, str],
                        uncertainty_path: Path | None = None) -> dict[str, Any]:
    """Orthogonal slices of a segmented study with its prediction and ground truth overlaid.

    Args:
        image_path: The image (NIfTI) or None.
        prediction_path: Predicted label map or None.
        label_path: Ground-truth label map or None.
        label_names: Label names for the legend.
        uncertainty_path: Voxel uncertainty map or None.

    Returns:
        ``{"uri", "centre", "image", "prediction", "label", "uncertainty"}``: the PNG data URI (or
        None), the slice indices, and the loaded :class:`Volume` objects (None when absent).
    """
    image = load_volume(image_path)
    pred = load_volume(prediction_path)
    label = load_volume(label_path)
    unc = load_volume(uncertainty_path)
    rows = []
    if pred is not None:
        rows.append(fig.OverlayRow("Prediction", np.rint(pred.data)))
    if label is not None:
        rows.append(fig.OverlayRow("Ground truth", np.rint(label.data)))
    if unc is not None:
        rows.append(fig.OverlayRow("Uncertainty", unc.data, kind="heat"))
    ref = image or pred or label
    if ref is None:
        return {"uri": None, "centre": None, "image": None, "prediction": None, "label": None,
                "uncertainty": None}
    mask = pred.data if pred is not None and np.any(pred.data > 0.5) else (
        label.data if label is not None else None)
    if mask is not None and mask.shape != ref.data.shape:
        mask = None
    centre = fig.structure_centre(mask, ref.data.shape)
    uri = fig.ortho_figure(image.data if image is not None else None, ref.spacing, rows, centre,
                           label_names)
    return {"uri": uri, "centre": centre, "image": image, "prediction": pred, "label": label,
            "uncertainty": unc}


def provenance_from_train(train: Mapping[str, Any], train_json: Path | None = None
                          ) -> dict[str, Any]:
    """Provenance for study reports from a ``train.json`` dict, with a date when none is recorded."""
    prov = dict(train)
    if not any(prov.get(k) for k in ("date", "created", "finished", "timestamp", "trained_at")):
        if train_json is not None and Path(train_json).is_file():
            prov["date"] = f"{file_date(Path(train_json))} (train.json modified)"
    return prov


def _provenance_section(prov: Mapping[str, Any], study: Mapping[str, Any]) -> dict[str, Any]:
    pairs: list[tuple[str, Any]] = []
    known = [("model", "Model", str), ("checkpoint_sha256", "Checkpoint SHA-256", str),
             ("checkpoint", "Checkpoint", str), ("config_hash", "Config hash", str),
             ("seed", "Seed", str), ("params", "Parameters", fmt_params),
             ("flops", "FLOPs per forward pass", fmt_flops),
             ("train_seconds", "Training time", fmt_seconds), ("epochs", "Epochs", str),
             ("best_epoch", "Best epoch", str),
             ("peak_memory_mb", "Peak memory, training", fmt_mb), ("family", "Family", str),
             ("date", "Trained", str), ("created", "Created", str), ("finished", "Finished", str),
             ("timestamp", "Timestamp", str), ("trained_at", "Trained", str)]
    seen = {"versions"}
    for key, label, fmt in known:
        if key in prov and prov[key] not in (None, ""):
            pairs.append((label, fmt(prov[key])))
            seen.add(key)
    for key, value in prov.items():
        if key not in seen and isinstance(value, str | int | float) and not isinstance(value, bool):
            pairs.append((key, value))
    if not prov.get("model") and study.get("model"):
        pairs.insert(0, ("Model", study["model"]))
    for key, label in (("image", "Image file"), ("prediction", "Prediction file"),
                       ("label", "Ground-truth file"), ("uncertainty", "Uncertainty file"),
                       ("reconstruction", "Reconstruction file")):
        path = _as_path(study.get(key)) if not is_number(study.get(key)) else None
        if path is not None:
            pairs.append((label, str(path)))
    tables = [b.kv_table(pairs, caption="Model and inputs")] if pairs else []
    versions = prov.get("versions")
    if isinstance(versions, Mapping) and versions:
        tables.append(b.table(["Package", "Version"],
                              [b.row([k, v]) for k, v in sorted(versions.items())],
                              caption="Package versions"))
    paragraphs = [] if prov else ["No provenance was recorded for this study."]
    return b.section("provenance", "Provenance", paragraphs=paragraphs, tables=tables)


def _dicom_section(record_path: Any) -> dict[str, Any] | None:
    """The DICOM objects ``capsmed predict`` wrote for the study and where they went.

    Reads the ``{id}_dicom.json`` record written by :mod:`capsmed.dicom.outputs` (no DICOM library
    needed); None when there is none.
    """
    path = _as_path(record_path)
    if path is None:
        return None
    try:
        record = read_json(path, required=True)
    except CapsmedError as exc:
        logger.warning("%s", exc)
        return None
    rows = [b.row([obj.get("kind", ""), obj.get("sop_instance_uid", ""),
                   obj.get("series_instance_uid", ""), obj.get("file", ""),
                   ", ".join(obj.get("stored_to") or []) or "not stored (local file only)"])
            for obj in record.get("objects") or []]
    source = record.get("source") or {}
    paragraphs = [f"Derived from series {source.get('series_instance_uid', '?')} of study "
                  f"{source.get('study_instance_uid', '?')}; the files are in {path.parent}."]
    return b.section("dicom", "DICOM objects", paragraphs=paragraphs,
                     tables=[b.table(["Object", "SOP Instance UID", "Series Instance UID", "File",
                                      "Stored to"], rows)])


# ----------------------------------------------------------------------------- uncertainty


def read_calibration(lay: DatasetLayout, model: str) -> dict[str, Any] | None:
    """The uncertainty thresholds ``capsmed evaluate`` calibrated on the validation stage."""
    cal = read_json(lay.eval_dir(model, "val") / "metrics.json").get("uncertainty_calibration")
    if not isinstance(cal, Mapping):
        return None
    return dict(cal) if is_number(cal.get("study_threshold")) else None


def uncertain_shares(entropy: np.ndarray, pred: np.ndarray, fg: Mapping[int, str],
                     threshold: float) -> dict[str, float]:
    """Per predicted structure, the share of its voxels whose uncertainty is above ``threshold``.

    Args:
        entropy: ``(*S)`` uncertainty map.
        pred: ``(*S)`` predicted label map.
        fg: Foreground label index -> name.
        threshold: The calibrated voxel threshold.

    Returns:
        ``{name: share in [0, 1]}`` for the structures the prediction contains.
    """
    out = {}
    for k, name in fg.items():
        inside = pred == k
        if inside.any():
            out[name] = float(np.mean(entropy[inside] > threshold))
    return out


def uncertainty_summary(study: Mapping[str, Any], entropy: np.ndarray, pred: np.ndarray | None,
                        shares: Mapping[str, float]) -> dict[str, Any]:
    """The study's uncertainty in words, and whether it is flagged.

    The study's score is ``uncertainty_mean`` from ``cases.csv`` (the mean entropy inside the
    predicted structures; for new studies computed the same way from the map). It is flagged when
    the score exceeds the highest one among the validation studies.

    Returns:
        ``{"mean", "flagged" (bool or None without calibration), "text", "card"}``.
    """
    mean = to_float(study.get("uncertainty_mean"))
    if mean is None:
        inside = pred > 0.5 if pred is not None and np.any(pred > 0.5) else None
        values = entropy[inside] if inside is not None else entropy.ravel()
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else None
    cal = study.get("uncertainty_calibration") or {}
    top = to_float(cal.get("study_threshold"))
    flagged = None if top is None or mean is None else bool(mean > top)
    text = ("Uncertainty (entropy of the mean test-time-augmentation probabilities, 0 certain to 1 "
            f"evenly spread) inside the predicted structures: mean {fmt_num(mean)}.")
    if cal and not is_number(cal.get("voxel_threshold")):
        text += (" No entropy threshold separated wrong from right voxels on the validation stage "
                 f"(AUC {fmt_num(cal.get('voxel_auc'), 2)}), so no voxel is called uncertain.")
    if shares:
        text += " Uncertain voxels: " + ", ".join(
            f"{name} {100 * v:.1f}%" for name, v in shares.items()) + (
            f" (entropy above {fmt_num(cal.get('voxel_threshold'), 2)}, the threshold that best "
            "separated wrong from right voxels on the validation stage).")
    if flagged:
        text += (f" Flagged: more uncertain than any of the {cal.get('n_cases', 'n/a')} validation "
                 f"studies (highest {fmt_num(top)}); check this study first.")
    elif flagged is False:
        text += f" Within the range of the validation studies (highest {fmt_num(top)})."
    else:
        text += " No calibration from a validation stage is available, so no study is flagged."
    card = "flagged: above every validation study" if flagged else (
        "within the validation range" if flagged is False else "inside the predicted structures")
    return {"mean": mean, "flagged": flagged, "text": text, "card": card}


# ----------------------------------------------------------------------------- evidence


def load_maps(path: Path | None) -> np.ndarray | None:
    """Per-class maps ``(C, X, Y, Z)`` in RAS from a channels-last NIfTI; None if unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        img = nib.load(str(path))
        if len(img.shape) != 4:
            return None
        canonical = nib.as_closest_canonical(img)
        return np.moveaxis(np.asarray(canonical.dataobj, dtype=np.float32), -1, 0)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        logger.warning("%s: cannot read the maps (%s)", path, exc)
        return None


def evidence_section(study: Mapping[str, Any], image: Volume | None, centre: Any,
                     names: Mapping[int, str]) -> dict[str, Any] | None:
    """What the model saw: per structure its evidence beside its final probability.

    Capsule segmenters show their class-capsule lengths (coarse capsules at their own resolution,
    visible as blocks) beside the decoder's probabilities; CNN baselines show their softmax, in
    the same place, so the pages compare like with like.

    Returns:
        A section, or None when the study has no evidence maps.
    """
    evidence = load_maps(_as_path(study.get("evidence")))
    if evidence is None:
        return None
    probs = load_maps(_as_path(study.get("probability_maps")))
    kind = str(study.get("evidence_kind") or "capsule lengths")
    capsule = kind != "softmax"
    ref_shape = image.data.shape if image is not None else evidence.shape[1:]
    rows = []
    for k, name in names.items():
        if k == 0 or k >= evidence.shape[0]:
            continue
        if capsule:
            rows.append(fig.OverlayRow(f"Capsules: {name}", evidence[k], kind="heat", vmax=1.0,
                                       heat_label="capsule length"))
            if probs is not None and k < probs.shape[0]:
                rows.append(fig.OverlayRow(f"Probability: {name}", probs[k], kind="heat",
                                           vmax=1.0, heat_label="probability"))
        else:
            rows.append(fig.OverlayRow(f"Softmax: {name}", evidence[k], kind="heat", vmax=1.0,
                                       heat_label="probability"))
    if centre is None:
        centre = tuple(s // 2 for s in ref_shape)
    uri = fig.ortho_figure(image.data if image is not None else None,
                           image.spacing if image is not None else (1.0, 1.0, 1.0), rows, centre,
                           names)
    if capsule:
        paragraphs = [
            "Each structure has a class capsule; its length (0 to 1) is the network's evidence "
            "that the structure is there. For each structure the first row shows the capsule "
            "lengths at the resolution the capsules work at (where that is coarser than the "
            "image, each block is one capsule position); the row below shows the probabilities "
            "the decoder makes of them, from which the prediction is taken."]
        share = to_float(study.get("evidence_disagreement"))
        if share is not None:
            paragraphs.append(
                f"In this study the capsules' strongest class differs from the final label on "
                f"{100 * share:.1f}% of the voxels that either marks as a structure.")
    else:
        paragraphs = [
            "This model is a CNN: it has no capsules, so its softmax probability per structure "
            "is shown where capsule models show their capsule lengths."]
    caption = ("Slices through the same point as the images above; colour scale 0 to 1. "
               "Maps from the unflipped test-time pass.")
    return b.section("evidence", "What the model saw", paragraphs=paragraphs,
                     figs=[b.figure(uri, f"Evidence maps of study {study.get('case_id')}",
                                    caption)] if uri else [])


def evidence_layers(study: Mapping[str, Any], names: Mapping[int, str]) -> list[vw.Layer]:
    """The evidence maps of :func:`evidence_section` as viewer layers, hidden at first.

    Capsule segmenters get per structure a layer of its class-capsule lengths, CNN baselines a
    layer of their softmax, in the same place. The decoder's probabilities, which the static
    figure shows beside the capsule lengths, are no layer: the prediction and uncertainty layers
    are made of them already, and a page of a 64^3 study would not keep to its 2 MB with them.
    Each layer is one channel of the channels-last NIfTI that the evaluation (or ``capsmed
    predict``) wrote, drawn from 0.1 to 1.

    Args:
        study: The study (``evidence``, ``evidence_kind``).
        names: Label index -> name; background (0) gets no layer.

    Returns:
        One layer per structure; empty without evidence maps.
    """
    evidence = _as_path(study.get("evidence"))
    if evidence is None or not evidence.is_file():
        return []
    capsule = str(study.get("evidence_kind") or "capsule lengths") != "softmax"
    prefix, cmap = ("Capsules", "viridis") if capsule else ("Softmax", "magma")
    return [vw.Layer(f"{prefix}: {name}", evidence, "heat", visible=False, opacity=0.8,
                     colormap=cmap, value_range=(0.1, 1.0), frame=int(k))
            for k, name in names.items() if int(k) != 0]


# ----------------------------------------------------------------------------- viewer


def viewer_block(study: Mapping[str, Any], out_path: Path, assets: Path) -> dict[str, Any] | None:
    """The interactive NiiVue viewer of a segmentation study (None when there is no image).

    The image is the background; the prediction, the ground truth (hidden at first) and the
    uncertainty map (hidden at first) are layers over it. The shared scripts are installed in
    ``assets`` and linked relatively from ``out_path``.

    Args:
        study: The study (see :class:`StudyInput`).
        out_path: The report file.
        assets: The folder of the shared viewer scripts.

    Returns:
        The template's ``viewer`` context (``paragraphs``, ``layers``, ``labels``, ``data``,
        ``scripts``), or None.
    """
    image_path = _as_path(study.get("image"))
    if image_path is None or not image_path.is_file():
        return None
    names = label_names("segmentation", study)
    layers = [vw.Layer("Image", image_path, "image")]
    threshold = to_float((study.get("uncertainty_calibration") or {}).get("voxel_threshold"))
    for key, name, role, visible, opacity, cmap in (
            ("prediction", "Prediction", "labels", True, 0.6, "gray"),
            ("label", "Ground truth", "labels", False, 0.6, "gray"),
            ("uncertainty", "Uncertainty", "heat", False, 0.8, "warm")):
        value = study.get(key)
        path = None if is_number(value) else _as_path(value)
        if path is not None and path.is_file():
            layers.append(vw.Layer(name, path, role, visible, opacity, cmap,
                                   (threshold or 0.0, 1.0) if role == "heat" else None))
    evidence = evidence_layers(study, names)
    layers.extend(evidence)
    data, note = vw.viewer_data(layers, names)
    if data is None:
        logger.info("%s: no interactive viewer (%s)", study.get("case_id"), note)
        return None
    vw.install_assets(assets)
    shown = [layer.name.lower() for layer in layers[1:len(data["volumes"])]]
    paragraphs = [
        "Drag or click to move the crosshair; the scroller moves through slices of the chosen "
        "view; the mouse wheel also scrolls slices. Right-drag adjusts the window, or type a "
        "level and width. Layers and labels can be switched off or made transparent; the "
        "read-out gives the image value and the label under the crosshair."
        + (f" Layers: {', '.join(shown)}." if shown else "")]
    if any(layer.name == "Uncertainty" for layer in layers):
        paragraphs.append(
            "The uncertainty layer shows "
            + (f"only the uncertain voxels (entropy above {threshold:.2f})" if threshold
               else "the entropy from 0 to 1") + "; switch it on under Layers.")
    if evidence:
        paragraphs.append(
            "The evidence layers (hidden at first) are the maps of \u201cWhat the model saw\u201d "
            "below: " + ("per structure its class-capsule lengths, at the resolution the capsules "
                         "work at" if evidence[0].name.startswith("Capsules") else
                         "per structure the CNN's softmax probability, where capsule models show "
                         "their capsule lengths") + "; values under 0.1 are left clear.")
    if note:
        paragraphs.append(f"Not shown: {note}.")
    layer_rows = [{"index": k, "name": v["name"], "visible": v["visible"], "opacity": v["opacity"]}
                  for k, v in enumerate(data["volumes"]) if k > 0]
    labels = [{"index": lab["index"], "name": lab["name"],
               "colour": fig.label_colour(lab["index"])} for lab in data["labels"]]
    return {"paragraphs": paragraphs, "layers": layer_rows, "labels": labels, "data": data,
            "scripts": vw.script_hrefs(out_path, assets)}


# ----------------------------------------------------------------------------- the page


def _infer_task(study: Mapping[str, Any]) -> str:
    task = study.get("task")
    if task in ("segmentation", "classification"):
        return str(task)
    if task:
        raise CapsmedError(f"study {study.get('case_id')!r}: unknown task {task!r} "
                           "(expected 'segmentation' or 'classification')")
    if study.get("probabilities") is not None or study.get("classes"):
        return "classification"
    return "segmentation"


def _geometry_section(vol: Volume | None, image_path: Path | None) -> dict[str, Any]:
    if vol is None:
        text = ("The image could not be read for display" if image_path is not None
                else "No image was given")
        if image_path is not None and image_path.is_dir():
            text += " (a DICOM folder; the report draws NIfTI images only)"
        return b.section("input", "Input", paragraphs=[text + "."])
    pairs = [("File", vol.path.name),
             ("Shape (stored)", " x ".join(str(s) for s in vol.shape)),
             ("Spacing (mm)", " x ".join(f"{z:.3g}" for z in vol.zooms[:3])),
             ("Orientation", "".join(vol.axcodes)),
             ("Channels", vol.channels),
             ("Voxel volume", f"{vol.voxel_ml * 1000:.3g} mm\u00b3")]
    if vol.channels > 1:
        pairs.append(("Shown", "first channel"))
    return b.section("input", "Input geometry", tables=[b.kv_table(pairs)])


def _segmentation_parts(study: Mapping[str, Any]) -> dict[str, Any]:
    names = label_names("segmentation", study)
    fg = {k: v for k, v in names.items() if k != 0}
    image_path = _as_path(study.get("image"))
    unc_value = study.get("uncertainty")
    unc_path = None if is_number(unc_value) else _as_path(unc_value)
    seg = segmentation_figure(image_path, _as_path(study.get("prediction")),
                              _as_path(study.get("label")), names, unc_path)
    pred, label, unc = seg["prediction"], seg["label"], seg["uncertainty"]

    # What the pipeline computed (cases.csv of the evaluation, or `capsmed predict`), not counted
    # again here from the files.
    volumes = dict(study.get("volumes_ml") or {})
    true_volumes = dict(study.get("volumes_true_ml") or {})
    ranges = study.get("volume_range_ml") or {}

    calibration = study.get("uncertainty_calibration") or {}
    threshold = to_float(calibration.get("voxel_threshold"))
    spreads = study.get("volume_spread_ml") or {}
    unc_ok = (unc is not None and pred is not None and unc.data.shape == pred.data.shape)
    shares = (uncertain_shares(unc.data, np.rint(pred.data), fg, threshold)
              if unc_ok and threshold is not None else {})
    lead, rows, cards = [], [], []
    found = []
    for name in fg.values():
        v = to_float(volumes.get(name))
        t = to_float(true_volumes.get(name))
        bounds = _range_bounds(ranges.get(name))
        flag, flag_cls, range_text, short_range = "", "", "not available", ""
        if bounds is not None:
            lo, hi, desc = bounds
            range_text = f"{lo:.2f} to {hi:.2f}" + (f" ({desc})" if desc else "")
            short_range = f"training cases {lo:.2f} to {hi:.2f} mL"
            if v is not None:
                if v < lo:
                    flag, flag_cls = "below the training range", "warn"
                elif v > hi:
                    flag, flag_cls = "above the training range", "warn"
                else:
                    flag, flag_cls = "within the training range", "good"
        spread = to_float(spreads.get(name))
        share = shares.get(name)
        rows.append(b.row([b.cell(name), b.num_cell(fmt_num(v, 2)),
                           b.num_cell(fmt_num(t, 2) if t is not None else "unknown"),
                           b.num_cell(range_text), b.cell(flag, cls=flag_cls),
                           b.num_cell(fmt_num(spread, 2) if spread is not None else "n/a"),
                           b.num_cell(f"{100 * share:.1f}%" if share is not None else "n/a")]))
        if v is not None and v > 0:
            found.append(f"{name} {v:.2f} mL" + (f" ({flag})" if flag else ""))
        cards.append(b.card(f"{name} volume", f"{fmt_num(v, 2)} mL", short_range))
    if pred is None and not volumes:
        lead.append("No prediction is available for this study.")
    elif found:
        lead.append("The model marks " + "; ".join(found) + ".")
    elif not volumes:
        lead.append("No structure volumes were recorded for this study.")
    else:
        lead.append("The model marks no structure in this study (all predicted volumes are 0 mL).")

    metrics = study.get("case_metrics") or {}
    if is_number(metrics.get("dice")):
        lead.append(f"Against the ground truth: Dice {fmt_metric(metrics['dice'], 'dice')}"
                    + (f", HD95 {fmt_metric(metrics['hd95'], 'hd95')} mm"
                       if is_number(metrics.get("hd95")) else "") + ".")

    if unc is not None:
        summary = uncertainty_summary(study, unc.data, pred.data if unc_ok else None, shares)
        lead.append(summary["text"])
        cards.append(b.card("Uncertainty", fmt_num(summary["mean"]), summary["card"]))
    elif is_number(unc_value):
        lead.append(f"Test-time-augmentation uncertainty: {fmt_num(unc_value)}.")
        cards.append(b.card("Uncertainty", fmt_num(unc_value), "test-time augmentation"))
    else:
        lead.append("No uncertainty estimate: test-time augmentation did not run for this study.")

    sections = [_geometry_section(seg["image"], image_path)]
    centre = seg["centre"]
    caption = ("Orthogonal slices through the predicted structure" if pred is not None
               and np.any(pred.data > 0.5) else "Orthogonal slices through the image centre")
    if centre is not None:
        caption += f" at voxel ({', '.join(str(c) for c in centre)}) of the RAS-reoriented image"
    caption += ("; rows: prediction" + (", ground truth" if label is not None else "")
                + (", uncertainty (entropy of the mean test-time-augmentation probabilities, "
                   "0 to 1)" if unc is not None else "") + ". Letters mark patient directions.")
    alt = (f"Orthogonal slices of study {study.get('case_id')} with the predicted segmentation"
           + (" and the ground truth" if label is not None else "") + " overlaid")
    sections.append(b.section("images", "Images", figs=[b.figure(seg["uri"], alt, caption)],
                              paragraphs=[] if seg["uri"] else ["No image could be drawn."]))
    sections.append(b.section(
        "volumes", "Structure volumes",
        tables=[b.table(["Structure", "Predicted (mL)", "True (mL)", "Training cases (mL)", "",
                         "TTA spread (mL)", "Uncertain voxels"],
                        rows, note="Training range: smallest to largest true volume among the "
                        "training cases. TTA spread: largest minus smallest volume over the "
                        "test-time-augmentation passes. Uncertain voxels: "
                        "share of the predicted structure whose entropy is above the threshold "
                        "calibrated on the validation stage.")]))
    if metrics:
        mrows = [b.row([metric_label(k), b.num_cell(fmt_metric(v, k))])
                 for k, v in sorted(metrics.items(), key=lambda kv: metric_sort_key(kv[0]))]
        sections.append(b.section("case-metrics", "Agreement with the ground truth",
                                  tables=[b.table(["Metric", "Value"], mrows)]))
    ev_section = evidence_section(study, seg["image"], seg["centre"], names)
    if ev_section is not None:
        sections.append(ev_section)
    return {"lead": lead, "cards": cards, "sections": sections}


def _classification_parts(study: Mapping[str, Any]) -> dict[str, Any]:
    names = _names(study.get("classes"))
    probs = _per_class(study.get("probabilities"), names) if names or isinstance(
        study.get("probabilities"), Sequence) else None
    if probs is not None and len(probs) != len(names):
        fallback = label_names("classification", count=len(probs))
        names = {i: names.get(i, fallback[i]) for i in range(len(probs))}
    predicted = _class_index(study.get("predicted"), names)
    if predicted is None and probs:
        predicted = int(np.nanargmax(probs))
    truth = _class_index(study.get("true_class"), names)
    confidence = to_float(study.get("confidence"))
    if confidence is None and probs and predicted is not None and predicted < len(probs):
        confidence = probs[predicted]
    pred_name = names.get(predicted, str(predicted)) if predicted is not None else "unknown"

    lead, cards = [], []
    sentence = f"Predicted class: {pred_name}"
    if confidence is not None:
        sentence += f", probability {confidence:.3f}"
    if truth is not None:
        verdict = "correct" if truth == predicted else "incorrect"
        sentence += f" (true class: {names.get(truth, str(truth))}, {verdict})"
    lead.append(sentence + ".")
    cards.append(b.card("Predicted class", pred_name))
    if confidence is not None:
        cards.append(b.card("Confidence", f"{confidence:.3f}", "probability of the predicted class"))
    if truth is not None:
        cards.append(b.card("True class", names.get(truth, str(truth)),
                            "correct" if truth == predicted else "incorrect"))
    entropy = float(normalised_entropy(np.asarray(probs, dtype=float))) if probs else float("nan")
    if np.isfinite(entropy):
        lead.append(f"Spread of the class probabilities (normalised entropy): {entropy:.3f} "
                    "(0 = all probability on one class, 1 = evenly spread).")
        cards.append(b.card("Normalised entropy", f"{entropy:.3f}", "0 certain, 1 uniform"))
    unc_value = study.get("uncertainty")
    unc_path = None if is_number(unc_value) else _as_path(unc_value)
    if is_number(unc_value):
        lead.append(f"Test-time-augmentation uncertainty: {fmt_num(unc_value)}.")
        cards.append(b.card("TTA uncertainty", fmt_num(unc_value)))
    elif unc_path is None:
        lead.append("No test-time-augmentation uncertainty was computed for this study.")

    image_path = _as_path(study.get("image"))
    image = load_volume(image_path)
    unc = load_volume(unc_path)
    sections = [_geometry_section(image, image_path)]
    if image is not None:
        rows = [fig.OverlayRow("Input")]
        if unc is not None and unc.data.shape == image.data.shape:
            rows.append(fig.OverlayRow("Uncertainty", unc.data, kind="heat"))
        centre = tuple(s // 2 for s in image.data.shape)
        uri = fig.ortho_figure(image.data, image.spacing, rows, centre)
        view = "The image" if image.data.shape[2] <= 1 else "Orthogonal slices through the centre"
        sections.append(b.section("images", "Image", figs=[b.figure(
            uri, f"Input image of study {study.get('case_id')}",
            f"{view} (RAS orientation, intensities windowed to the 0.5-99.5th percentiles).")]))

    if probs:
        rows = []
        for i, name in names.items():
            p = probs[i] if i < len(probs) else float("nan")
            tags = [t for t, hit in (("predicted", i == predicted), ("true class", i == truth))
                    if hit]
            rows.append(b.row([b.cell(name), b.bar_cell(p, fmt_num(p), i == predicted),
                               b.cell(", ".join(tags))], cls="best" if i == predicted else ""))
        sections.append(b.section(
            "probabilities", "Class probabilities",
            tables=[b.table(["Class", "Probability", ""], rows,
                            note="The predicted class is highlighted.")]))
    return {"lead": lead, "cards": cards, "sections": sections, "names": names,
            "predicted": predicted, "image": image}


def _capsule_section(study: Mapping[str, Any], names: Mapping[int, str], predicted: int | None,
                     image: Volume | None) -> dict[str, Any] | None:
    lengths_names = names or _names(study.get("classes")) or _names(study.get("labels"))
    lengths = _per_class(study.get("lengths"), lengths_names) if study.get(
        "lengths") is not None else None
    if lengths is not None and not lengths_names:
        lengths_names = label_names("classification", count=len(lengths))
    recon_path = _as_path(study.get("reconstruction"))
    recon = load_array(recon_path)
    panel = load_pose_panel(_as_path(study.get("pose_perturbation")))
    if not lengths and recon is None and panel is None:
        return None
    figs, paragraphs, tables = [], [], []
    if lengths:
        winner = int(np.nanargmax(lengths))
        paragraphs.append(
            "Each class has a capsule; its length (0 to 1) is the network's evidence that the "
            f"class is present. The longest capsule is {lengths_names.get(winner, winner)} "
            f"({lengths[winner]:.3f}).")
        tables.append(b.table(
            ["Class", "Capsule length"],
            [b.row([lengths_names.get(i, str(i)), b.bar_cell(v, fmt_num(v), i == winner)],
                   cls="best" if i == winner else "") for i, v in enumerate(lengths)],
            note="Class-capsule lengths; the longest is highlighted."))
    if recon is not None:
        arrays = []
        if image is not None:
            arrays.append(("Input", image.data))
        arrays.append(("Reconstruction", recon))
        paragraphs.append(
            "The decoder redraws the input from the winning capsule alone: a reconstruction that "
            "resembles the input suggests the capsule encodes this study well. The reconstruction "
            "is in the model's input space (after preprocessing), so its size and orientation can "
            "differ from the stored image.")
        figs.append(b.figure(fig.array_slices(arrays),
                             "Input image beside the capsule decoder's reconstruction",
                             "Left: input (middle slice); right: reconstruction from the winning "
                             "capsule."))
    subsections = []
    if panel is not None:
        sub = pose_subsection(*panel, lengths_names.get(int(np.nanargmax(lengths)), "")
                              if lengths else "")
        if sub is not None:
            subsections.append(sub)
    return b.section("capsules", "Capsule evidence", paragraphs=paragraphs, tables=tables,
                     figs=figs, subsections=subsections)


def load_pose_panel(path: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(reconstructions (D, steps, H, W), steps)`` from ``{case}_poses.npz``; None if absent."""
    if path is None or not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as doc:
            return (np.asarray(doc["reconstructions"], dtype=np.float32),
                    np.asarray(doc["steps"], dtype=np.float64))
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("%s: cannot read the pose perturbation (%s)", path, exc)
        return None


def pose_subsection(panel: np.ndarray, steps: np.ndarray, winner: str) -> dict[str, Any] | None:
    """The pose-perturbation panel of a capsule classifier (Sabour et al. 2017, figure 4).

    Args:
        panel: ``(D, steps, H, W)`` decoder reconstructions as each pose dimension of the winning
            class capsule is moved by ``steps`` (``{case}_poses.npz``, written by
            ``capsmed evaluate``).
        steps: The offset of each column; one of them is 0.
        winner: Name of the winning class.

    Returns:
        A subsection (:func:`capsmed.report.blocks.subsection`), or None when the panel does not
        have one column per step.
    """
    zero = np.flatnonzero(np.isclose(steps, 0.0))
    if panel.ndim != 4 or panel.shape[1] != len(steps) or not zero.size:
        logger.warning("pose perturbation of shape %s with steps %s: expected (D, steps, H, W) "
                       "and a 0 step; not shown", panel.shape, steps.tolist())
        return None
    effects = fig.pose_effects(panel, int(zero[0]))
    order = [int(i) for i in np.argsort(-effects, kind="mergesort")]
    top = order[:5]
    uri = fig.pose_grid(panel, order, [float(x) for x in steps], effects)
    lo, hi, step = float(steps.min()), float(steps.max()), float(np.diff(steps).mean())
    paragraphs = [
        f"Each of the {panel.shape[0]} pose dimensions of the winning capsule"
        + (f" ({winner})" if winner else "")
        + f" is moved in steps of {step:.2f} from {lo:+.2f} to {hi:+.2f} while the others stay, "
        "and the decoder "
        "redraws the input from the moved capsule (Sabour et al. 2017, figure 4). Rows are "
        "ranked by how much they change the reconstruction; dimensions that change it little "
        "carry little of what the decoder draws.",
        "Largest effects: " + ", ".join(f"dimension {d} ({effects[d]:.3g})" for d in top) + "."]
    table = b.table(["Rank", "Pose dimension", "Mean change of the reconstruction"],
                    [b.row([b.num_cell(i + 1), b.num_cell(d), b.num_cell(f"{effects[d]:.3g}")])
                     for i, d in enumerate(top)],
                    note="Mean absolute change of the reconstruction from the unmoved capsule, "
                         "over all offsets and pixels (the reconstruction's own units). The "
                         f"figure ranks all {panel.shape[0]} dimensions.")
    figure = b.figure(uri, "Decoder reconstructions as each pose dimension of the winning "
                      "capsule is moved", "Rows: pose dimensions, largest effect first (effect "
                      "under the name); columns: offset added to that dimension. 3D inputs show "
                      "their middle slice.") if uri else None
    return b.subsection("Pose perturbation", paragraphs, [table], [figure])


def write_study_report(out_path: Path, study: StudyInput | Mapping[str, Any], *,
                       assets: Path | None = None) -> Path:
    """Write one study's diagnostic report.

    Args:
        out_path: The HTML file to write (parent folders are created).
        study: The study, see :class:`StudyInput`. ``case_id`` is required.
        assets: Folder for the shared viewer scripts of segmentation reports (default
            ``assets/niivue-{version}`` beside the report); one copy serves every report.

    Returns:
        ``out_path``.

    Raises:
        CapsmedError: ``case_id`` is missing or ``task`` is unknown.
    """
    if not study.get("case_id") and study.get("case_id") != 0:
        raise CapsmedError("study report: the study dict has no 'case_id'")
    out_path = Path(out_path)
    case_id = str(study["case_id"])
    task = _infer_task(study)
    viewer = None
    if task == "segmentation":
        parts = _segmentation_parts(study)
        capsule = _capsule_section(study, {}, None, None)
        viewer = viewer_block(study, out_path, Path(assets) if assets is not None
                              else vw.assets_dir(out_path.parent))
    else:
        parts = _classification_parts(study)
        capsule = _capsule_section(study, parts["names"], parts["predicted"], parts["image"])
    sections = list(parts["sections"])
    if capsule is not None:
        sections.append(capsule)
    dicom = _dicom_section(study.get("dicom"))
    if dicom is not None:
        sections.append(dicom)
    sections.append(_provenance_section(study.get("provenance") or {}, study))
    nav = []
    for item in study.get("links") or []:
        href = safe_relative_link(item.get("href"))
        if href:
            nav.append(b.link(str(item.get("text") or item.get("href")), href))
    sub = " \u00b7 ".join(str(x) for x in (study.get("dataset"), study.get("model"),
                                            study.get("stage") and f"{study.get('stage')} stage",
                                            task) if x)
    extra = {"viewer": viewer, "csp": vw.CSP} if viewer is not None else {}
    return render_page(out_path, "page.html", title=f"Study {case_id}", subtitle=sub, nav=nav,
                       lead=parts["lead"], note=RESEARCH_NOTE, top_cards=parts["cards"],
                       sections=sections, **extra)


# ----------------------------------------------------------------------------- per stage


def training_volume_ranges(results_dir: Path, dataset: str, model: str,
                           label_names: Mapping[int, str], fold: int | None = None
                           ) -> dict[str, dict[str, float]]:
    """Range of true structure volumes among the training cases, per label name.

    Read from ``eval/{model}/train/cases.csv`` (``volume_true_ml_<label>``, else
    ``volume_ml_<label>``); empty when that table is absent.
    """
    df = read_table(DatasetLayout(Path(results_dir), dataset, fold).eval_dir(model, "train")
                    / "cases.csv")
    out: dict[str, dict[str, float]] = {}
    for k, name in label_names.items():
        if k == 0:
            continue
        col = class_column(df, "volume_true_ml", k, name) or class_column(df, "volume_ml", k, name)
        if col is None:
            continue
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            out[name] = {"min": float(v.min()), "max": float(v.max()),
                         "median": float(np.median(v)), "n": int(v.size)}
    return out


def study_from_row(row: Mapping[str, Any], task: str, names: Mapping[int, str],
                   bases: Sequence[Path]) -> dict[str, Any]:
    """A :class:`StudyInput` dict from one row of ``cases.csv`` (paths resolved against ``bases``)."""
    cols = list(row.keys())

    def path(key: str) -> str | None:
        found = resolve_path(row.get(key), *bases)
        if found is None and row.get(key) not in (None, "") and not (
                isinstance(row.get(key), float) and math.isnan(row.get(key))):
            return str(row.get(key))  # keep the name so the report can say it was not readable
        return str(found) if found is not None else None

    study: dict[str, Any] = {"case_id": str(row["case_id"]), "task": task,
                             "image": path("image"), "uncertainty": None}
    unc = row.get("uncertainty")
    if is_number(unc):
        study["uncertainty"] = float(unc)
    else:
        study["uncertainty"] = path("uncertainty")
    if task == "segmentation":
        study["labels"] = dict(names)
        study["label"] = path("label")
        study["prediction"] = path("prediction")
        vols, true_vols = {}, {}
        for k, name in names.items():
            if k == 0:
                continue
            c = class_column(cols, "volume_ml", k, name)
            if c is not None and is_number(row.get(c)):
                vols[name] = float(row[c])
            c = class_column(cols, "volume_true_ml", k, name)
            if c is not None and is_number(row.get(c)):
                true_vols[name] = float(row[c])
        spreads = {}
        for k, name in names.items():
            c = class_column(cols, "volume_spread_ml", k, name) if k != 0 else None
            if c is not None and is_number(row.get(c)):
                spreads[name] = float(row[c])
        study["volumes_ml"], study["volumes_true_ml"] = vols, true_vols
        pred = _as_path(study["prediction"])
        stem = pred.name.removesuffix(".gz").removesuffix(".nii") if pred else ""
        record = pred.with_name(stem + "_dicom.json") if pred else None
        if record is not None and record.is_file():  # evaluate.dicom_out wrote a SEG/SR
            study["dicom"] = str(record)
        study["volume_spread_ml"] = spreads
        if is_number(row.get("uncertainty_mean")):
            study["uncertainty_mean"] = float(row["uncertainty_mean"])
        study["evidence"] = path("evidence")
        study["probability_maps"] = path("probability_maps")
        if is_number(row.get("evidence_disagreement")):
            study["evidence_disagreement"] = float(row["evidence_disagreement"])
        metrics = {}
        for c in cols:
            base = c.split("_")[0]
            if base in ("dice", "hd95", "assd") and is_number(row.get(c)):
                metrics[c] = float(row[c])
            elif base in ("hd95", "assd") and isinstance(row.get(c), float) and math.isinf(row[c]):
                metrics[c] = float(row[c])
        study["case_metrics"] = metrics
    else:
        study["classes"] = dict(names)
        probs, lengths = {}, {}
        for k, name in names.items():
            c = class_column(cols, "prob", k, name)
            if c is not None:
                probs[k] = to_float(row.get(c))
            c = class_column(cols, "length", k, name)
            if c is not None:
                lengths[k] = to_float(row.get(c))
        study["probabilities"] = probs or None
        study["lengths"] = lengths if lengths and any(v is not None for v in lengths.values()) \
            else None
        study["predicted"] = row.get("predicted")
        study["true_class"] = row.get("class")
        study["confidence"] = to_float(row.get("confidence"))
        study["reconstruction"] = path("reconstruction")
        study["pose_perturbation"] = path("pose_perturbation")
    return study


def write_study_reports(results_dir: Path, dataset: str, model: str, stage: str = "test", *,
                        fold: int | None = None) -> dict[str, Path]:
    """Write one report per case of a stage's ``cases.csv``.

    Reports go to ``results/{ds}/reports/{model}/studies/{safe id}.html`` (see
    :func:`~capsmed.report.render.study_filename`); the page shows the original id, escaped.

    Args:
        results_dir: The results folder.
        dataset: Dataset name.
        model: Model name.
        stage: ``train``, ``val`` or ``test``.
        fold: The reported fold of a dataset with several folds (its files live in ``fold{k}``
            folders); ``None`` with one fold.

    Returns:
        ``{case_id: report path}`` in ``cases.csv`` order.

    Raises:
        CapsmedError: ``cases.csv`` is missing or has no ``case_id`` column.
    """
    results_dir = Path(results_dir)
    lay = DatasetLayout(results_dir, dataset, fold)
    edir = lay.eval_dir(model, stage)
    cases = read_table(edir / "cases.csv", required=True)
    if "case_id" not in cases.columns:
        raise CapsmedError(f"{edir / 'cases.csv'}: no 'case_id' column")
    metrics_doc = read_json(edir / "metrics.json")
    cases_doc = read_json(lay.cases)
    task = task_of(metrics_doc, cases_doc, columns=cases.columns)
    names = label_names(task, metrics_doc, cases_doc,
                        count=sum(c.startswith("prob_") for c in cases.columns))
    train_json = lay.model_dir(model) / "train.json"
    provenance = provenance_from_train(read_json(train_json), train_json)
    provenance.setdefault("model", model)
    ranges = training_volume_ranges(results_dir, dataset, model, names, fold) if task == \
        "segmentation" else {}
    calibration = read_calibration(lay, model) if task == "segmentation" else None
    studies_dir = lay.studies_dir(model)
    bases = [edir, results_dir, lay.dataset_dir, edir / "predictions"]
    out: dict[str, Path] = {}
    links = [b.link(f"{model} {stage} report", f"../{stage}.html"),
             b.link("All results", rel_href(results_dir / "index.html", studies_dir))]
    if (lay.reports_dir / "comparison.html").exists():
        links.append(b.link("Model comparison", "../../comparison.html"))
    for record in cases.to_dict(orient="records"):
        study = study_from_row(record, task, names, bases)
        # Files named by PLAN.md's layout when cases.csv leaves the column out.
        pred_dir = edir / "predictions"
        for key, suffix in (("prediction", ".nii.gz"), ("uncertainty", "_uncertainty.nii.gz"),
                            ("reconstruction", "_recon.npy"), ("pose_perturbation", "_poses.npz")):
            if key == "prediction" and task != "segmentation":
                continue
            if study.get(key) is None and key not in record:
                for stem in (study_filename(study["case_id"])[:-5], study["case_id"]):
                    candidate = pred_dir / f"{stem}{suffix}"
                    if candidate.is_file():
                        study[key] = str(candidate)
                        break
        study.update(dataset=dataset, model=model, stage=stage, provenance=provenance,
                     volume_range_ml=ranges, links=links, uncertainty_calibration=calibration,
                     evidence_kind=metrics_doc.get("evidence_kind"))
        case_id = study["case_id"]
        if case_id in out:
            logger.warning("%s: case id %r appears twice; the last row wins",
                           edir / "cases.csv", case_id)
        out[case_id] = write_study_report(studies_dir / study_filename(case_id), study,
                                          assets=vw.assets_dir(results_dir))
    logger.info("wrote %d study reports under %s", len(out), studies_dir)
    return out
