"""New studies (``capsmed predict``), multiclass tasks, missing files and loose fingerprints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from reporthtml import parse

from capsmed.dicom.outputs import volumes_ml
from capsmed.errors import CapsmedError
from capsmed.report import (
    write_comparison_report,
    write_index,
    write_qc_report,
    write_stage_report,
    write_study_report,
    write_study_reports,
)


def _json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _alts(page) -> str:
    return " ".join(img["alt"] for img in page.images)


def test_new_unlabeled_segmentation_study(tmp_path, facts):
    rng = np.random.default_rng(0)
    image = facts.save_nifti(tmp_path / "new.nii.gz", rng.random(facts.SHAPE, np.float32))
    pred = np.zeros(facts.SHAPE, np.uint8)
    pred[4:10, 5:12, 3:8] = 1  # 6*7*5 voxels of 3 mm^3 = 0.63 mL
    pred_path = facts.save_nifti(tmp_path / "pred.nii.gz", pred)
    labels = {"0": "background", "1": "tumour"}
    # the volumes as `capsmed predict` computes them for the page
    volumes = volumes_ml(pred, nib.load(pred_path).affine, labels)
    out = write_study_report(tmp_path / "out" / "new.html", {
        "case_id": "patient 7", "task": "segmentation", "image": image, "prediction": pred_path,
        "labels": labels, "volumes_ml": volumes,
        "volume_range_ml": {"tumour": [0.1, 0.5]},
        "provenance": {"model": "ucaps", "checkpoint_sha256": "f" * 64, "config_hash": "abc",
                       "versions": {"capsmed": "0.1.0"}, "date": "2026-01-01"}})
    page = parse(out)
    text = page.text
    assert "The model marks tumour 0.63 mL (above the training range)" in text
    assert "True (mL)" in text and "unknown" in text
    assert "Ground truth" not in _alts(page) and "ground truth" not in _alts(page)
    assert "test-time augmentation did not run" in text
    assert "f" * 64 in text and "For research use only" in text
    assert not page.errors


def test_new_classification_study_from_probabilities_only(tmp_path):
    out = write_study_report(tmp_path / "c.html", {
        "case_id": "x1", "probabilities": [0.1, 0.7, 0.2], "uncertainty": 0.05,
        "lengths": [0.2, 0.8, 0.3]})
    text = parse(out).text
    assert "Predicted class: class 1, probability 0.700" in text
    assert "Test-time-augmentation uncertainty: 0.050" in text
    assert "Capsule evidence" in text and "The longest capsule is class 1 (0.800)" in text
    assert "No image was given" in text


def test_study_report_errors(tmp_path):
    with pytest.raises(CapsmedError, match="case_id"):
        write_study_report(tmp_path / "x.html", {"task": "segmentation"})
    with pytest.raises(CapsmedError, match="unknown task"):
        write_study_report(tmp_path / "x.html", {"case_id": "a", "task": "detection"})


def _multiclass_dataset(root: Path) -> None:
    """Three classes, no roc/pr/confusion/reliability in metrics.json, class names in prob_ columns."""
    ds = root / "mc"
    names = {"0": "liver", "1": "kidney", "2": "spleen"}
    rng = np.random.default_rng(3)
    edir = ds / "eval" / "efficient_capsnet" / "test"
    edir.mkdir(parents=True)
    rows = []
    for i in range(12):
        img = ds / "images" / f"v{i}.nii.gz"
        img.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), img)
        t = i % 3
        p = rng.dirichlet(np.ones(3) + 3 * np.eye(3)[t])
        rows.append({"case_id": f"v{i}", "image": str(img), "class": t,
                     "predicted": int(p.argmax()), "confidence": float(p.max()),
                     **{f"prob_{names[str(k)]}": float(p[k]) for k in range(3)}})
    with (edir / "cases.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _json(edir / "metrics.json", {"task": "classification", "n_cases": 12, "classes": names,
                                  "metrics": {"accuracy": 0.75, "auc": 0.88}})


def test_multiclass_stage_and_studies_without_optional_files(tmp_path):
    _multiclass_dataset(tmp_path)
    out = write_stage_report(tmp_path, "mc", "efficient_capsnet", "test")
    page = parse(out)
    alts = _alts(page)
    for expected in ("ROC curves", "Precision-recall curves", "Confusion matrix",
                     "Reliability diagram"):
        assert expected in alts
    assert "No history.csv was found." in page.text and "No train.json was found." in page.text
    studies = write_study_reports(tmp_path, "mc", "efficient_capsnet")
    assert len(studies) == 12
    text = parse(studies["v0"]).text
    assert "liver" in text and "kidney" in text and "spleen" in text
    assert "Orthogonal slices through the centre" in text  # 3D classification input


def test_stage_report_needs_metrics(tmp_path):
    with pytest.raises(CapsmedError, match="metrics.json"):
        write_stage_report(tmp_path, "nope", "unet", "test")
    with pytest.raises(CapsmedError, match="stage"):
        write_stage_report(tmp_path, "nope", "unet", "holdout")
    with pytest.raises(CapsmedError, match="cases.csv"):
        write_study_reports(tmp_path, "nope", "unet")


def test_stage_report_with_metrics_only_and_missing_images(tmp_path):
    edir = tmp_path / "ds" / "eval" / "unet" / "test"
    _json(edir / "metrics.json", {"task": "segmentation", "metrics": {"dice": 0.5}})
    out = write_stage_report(tmp_path, "ds", "unet", "test")
    assert "No per-case table" in parse(out).text
    (edir / "cases.csv").write_text("case_id,image,label,prediction,dice,hd95\n"
                                    "a,/gone/a.nii.gz,/gone/l.nii.gz,predictions/a.nii.gz,0.4,inf\n")
    out = write_stage_report(tmp_path, "ds", "unet", "test")
    text = parse(out).text
    assert "Best case a: its images could not be read." in text
    studies = write_study_reports(tmp_path, "ds", "unet")
    assert "The image could not be read for display" in parse(studies["a"]).text


def test_qc_report_missing_and_empty_fingerprint(tmp_path):
    with pytest.raises(CapsmedError, match="fingerprint.json"):
        write_qc_report(tmp_path, "ds")
    _json(tmp_path / "ds" / "preprocessed" / "fingerprint.json", {})
    text = parse(write_qc_report(tmp_path, "ds")).text
    assert "no spacing or shape" in text and "records no intensity statistics" in text


def test_qc_report_from_compute_fingerprint(tmp_path, facts):
    """Geometry outliers, per-channel intensities and balance, from the real fingerprint."""
    from capsmed.data.fingerprint import compute_fingerprint

    rng = np.random.default_rng(0)
    cases = []
    for i, spacing in enumerate([(1.0, 1.0, 3.0), (1.0, 1.0, 3.5), (0.8, 0.8, 3.0),
                                 (4.0, 1.0, 3.0)]):
        img = rng.normal(40.0, 5.0, (12, 10, 8, 2)).astype(np.float32)
        path = facts.save_nifti(tmp_path / "in" / f"c{i}.nii.gz", img, spacing=spacing)
        cases.append({"case_id": f"c{i}", "image": path, "class": int(i == 0)})
    fp = compute_fingerprint({"task": "classification", "spatial_dims": 3, "modality": "CT",
                              "classes": {"0": "no", "1": "yes"}, "cases": cases})
    _json(tmp_path / "ds" / "preprocessed" / "fingerprint.json", fp)
    page = parse(write_qc_report(tmp_path, "ds"))
    text = page.text
    assert "Median spacing 1 x 1 x 3 mm" in text and "Median shape 12 x 10 x 8" in text
    assert "c3" in text and "spacing 4 x 1 x 3" in text
    assert "Channel 0" in text and "Channel 1" in text
    assert "no 75.0%" in text and "yes 25.0%" in text
    assert "Histograms of voxel spacing" in _alts(page)


def test_comparison_with_one_family_and_missing_model(tmp_path):
    edir = tmp_path / "ds" / "eval" / "unet" / "test"
    _json(edir / "metrics.json", {"task": "segmentation", "metrics": {"dice": 0.7},
                                  "ci95": {"dice": [0.6, 0.8]}})
    _json(tmp_path / "ds" / "models" / "unet" / "train.json", {"family": "cnn", "params": 10})
    text = parse(write_comparison_report(tmp_path, "ds", ["unet", "ghost"])).text
    assert "Only CNN baselines were evaluated" in text
    assert "No train.json or metrics.json was found for: ghost." in text
    with pytest.raises(CapsmedError, match="no models"):
        write_comparison_report(tmp_path, "ds", [])


def test_comparison_and_stage_report_of_the_reported_fold_with_cross_validation(tmp_path):
    for model, dice in (("ucaps", 0.71), ("unet", 0.8)):
        edir = tmp_path / "ds" / "eval" / model / "fold1" / "test"
        _json(edir / "metrics.json", {"task": "segmentation", "metrics": {"dice": dice},
                                      "ci95": {"dice": [dice - 0.1, dice + 0.1]}})
        _json(tmp_path / "ds" / "cv" / f"{model}.json", {
            "folds": [0, 1, 2], "per_fold": [{}, {}, {}],
            "mean": {"dice": dice - 0.05, "hd95": None}, "sd": {"dice": 0.0125, "hd95": None}})
    page = parse(write_comparison_report(tmp_path, "ds", ["ucaps", "unet"], fold=1))
    text = page.text
    assert "Cross-validation (validation cases of each fold)" in text
    assert "0.660 \u00b1 0.013" in text and "0.750 \u00b1 0.013" in text
    assert "fold 1, the fold evaluated on every stage" in text
    assert "0.710" in text and "0.800" in text  # the reported fold's test metrics
    assert not page.errors
    # without the fold the files are not found: the models are missing
    text = parse(write_comparison_report(tmp_path, "ds", ["ucaps", "unet"])).text
    assert "No train.json or metrics.json was found for: ucaps, unet." in text
    stage = parse(write_stage_report(tmp_path, "ds", "unet", "test", fold=1)).text
    assert "0.800" in stage


def test_index_rejects_a_bad_summary_and_handles_an_empty_one(tmp_path):
    with pytest.raises(CapsmedError, match="summary.json"):
        write_index(tmp_path, {"models": {}})
    text = parse(write_index(tmp_path, {"datasets": {}})).text
    assert "no datasets yet" in text


def test_real_hippocampus_study(shared_data, tmp_path):
    folder = shared_data / "msd_hippocampus_subset"
    image = sorted((folder / "imagesTr").glob("*.nii.gz"))[0]
    label = folder / "labelsTr" / image.name
    out = write_study_report(tmp_path / "h.html", {
        "case_id": image.name.split(".")[0], "task": "segmentation", "image": str(image),
        "prediction": str(label), "label": str(label),
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}})
    page = parse(out)
    assert "RAS" in page.text and "Anterior" in page.text and "mL" in page.text
    assert len(page.images) == 1 and not page.errors


def test_2d_segmentation_study_with_multichannel_image(tmp_path):
    rng = np.random.default_rng(5)
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((24, 20, 1, 3)).astype(np.float32), np.eye(4)), image)
    pred = np.zeros((24, 20, 1), np.uint8)
    pred[5:12, 4:9] = 1
    pred_path = tmp_path / "pred.nii.gz"
    nib.save(nib.Nifti1Image(pred, np.eye(4)), pred_path)
    page = parse(write_study_report(tmp_path / "s.html", {
        "case_id": "slice_1", "image": str(image), "prediction": str(pred_path),
        "labels": {"0": "background", "1": "lesion"},
        "volumes_ml": volumes_ml(pred, np.eye(4), {"0": "background", "1": "lesion"})}))
    assert "first channel" in page.text and "24 x 20 x 1 x 3" in page.text
    assert "lesion 0.04 mL" in page.text  # 35 voxels of 1 mm^3
    assert len(page.images) == 1


def test_study_files_found_by_layout_when_columns_are_missing(tmp_path, facts):
    edir = tmp_path / "ds" / "eval" / "segcaps" / "test"
    _json(edir / "metrics.json", {"task": "segmentation", "labels": {"0": "bg", "1": "organ"},
                                  "metrics": {"dice": 0.5}})
    pred = np.zeros(facts.SHAPE, np.uint8)
    pred[2:6, 2:6, 2:6] = 1
    facts.save_nifti(edir / "predictions" / "c1.nii.gz", pred)
    facts.save_nifti(edir / "predictions" / "c1_uncertainty.nii.gz",
                     np.full(facts.SHAPE, 0.2, np.float32))
    (edir / "cases.csv").write_text("case_id,dice,volume_ml_organ\nc1,0.5,0.192\n")
    text = parse(write_study_reports(tmp_path, "ds", "segcaps")["c1"]).text
    assert "organ 0.19 mL" in text  # the table's volume (64 voxels of 3 mm^3)
    assert "evenly spread) inside the predicted structures: mean 0.200" in text
    assert "No calibration from a validation stage is available" in text
    _json(edir.parent / "val" / "metrics.json", {"uncertainty_calibration": {
        "voxel_threshold": None, "voxel_auc": 0.49, "youden_j": 0.0, "study_threshold": 0.15,
        "n_cases": 2}})
    text = parse(write_study_reports(tmp_path, "ds", "segcaps")["c1"]).text
    assert "No entropy threshold separated wrong from right voxels on the validation stage " \
        "(AUC 0.49)" in text
    assert "Flagged: more uncertain than any of the 2 validation studies (highest 0.150)" in text
