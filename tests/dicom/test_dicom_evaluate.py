"""evaluate.dicom_out: the pipeline's evaluation of DICOM series writes a SEG/SR per case."""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom

from capsmed.evaluate.run import evaluate_stage
from capsmed.train.loop import train_model
from tests.dicom.dicom_helpers import blob_volume, oblique_mr_affine, write_mr_series
from tests.pipeline_helpers import prepare_all, tiny_config, write_config


def test_evaluating_a_dicom_dataset_writes_an_sr_per_case(tmp_path):
    data = tmp_path / "data"
    rows = ["case_id,image,class"]
    for k in range(16):
        image, _ = blob_volume((16, 18, 12), seed=k)
        scale = 300 if k % 2 else 900  # the classes differ in brightness
        write_mr_series(image * scale + 100, oblique_mr_affine((16, 18, 12)), data / f"s{k}",
                        seed=f"eval{k}", patient_id=f"P{k}")
        rows.append(f"s{k},s{k},{k % 2}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tmp_path / "results", task="classification", source="dicom", spatial_dims=3,
                      path=str(data / "manifest.csv"), preprocess={"cache": "none",
                                                                    "image_size": 16},
                      train={"epochs": 1, "batch_size": 4})
    cfg["evaluate"]["dicom_out"] = True
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    train_model(cfg, "ds", "seed_cnn")
    doc = evaluate_stage(cfg, "ds", "seed_cnn", "test")
    pred_dir = tmp_path / "results/ds/eval/seed_cnn/test/predictions"
    ids = json.loads((tmp_path / "results/ds/splits.json").read_text())["test"]
    assert doc["n_cases"] == len(ids) >= 1
    for case_id in ids:
        record = json.loads((pred_dir / f"{case_id}_dicom.json").read_text())
        (sr_entry,) = record["objects"]
        sr = hd.sr.srread(pred_dir / sr_entry["file"])
        assert sr.PatientID == pydicom.dcmread(next((data / case_id).glob("*.dcm"))).PatientID
        (group,) = sr.content.get_image_measurement_groups()
        (prob,) = group.get_measurements()
        assert 0.5 <= prob.value <= 1.0 and np.isfinite(prob.value)


def test_evaluating_dicom_segmentation_writes_seg_and_sr_and_the_study_report_lists_them(
        seg_checkpoint, tmp_path):
    """A DICOM-series dataset with NIfTI masks: SEG + SR per test case, SR volumes = cases.csv's."""
    import csv

    import nibabel as nib
    import torch
    from monai.transforms import LoadImage

    from capsmed import report

    data = tmp_path / "data"
    rows = ["case_id,image,label"]
    for k in range(6):
        shape = (20 + k, 22, 14 + k % 3)
        image, label = blob_volume(shape, seed=k)
        affine = oblique_mr_affine(shape)
        write_mr_series(image * 400 + 400, affine, data / f"s{k}", seed=f"evalseg{k}",
                        patient_id=f"P{k}")
        # the mask in the geometry (and array layout) MONAI reads from the series
        lab_series = write_mr_series(label, affine, tmp_path / "labels" / f"s{k}",
                                     seed=f"evalseglab{k}")
        lab = LoadImage(image_only=True)(str(lab_series))
        nib.save(nib.Nifti1Image(np.rint(lab.numpy()).astype(np.uint8), lab.affine.numpy()),
                 data / f"l{k}.nii.gz")
        rows.append(f"s{k},s{k},l{k}.nii.gz")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tmp_path / "results", task="segmentation", source="dicom",
                      path=str(data / "manifest.csv"),
                      labels={"0": "background", "1": "anterior", "2": "posterior"},
                      preprocess={"patch_size": [16, 16, 16], "cache": "none"})
    cfg["evaluate"]["dicom_out"] = True
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    # the tiny segmenter trained elsewhere, put where this dataset's model goes
    model_dir = tmp_path / "results/ds/models/unet"
    model_dir.mkdir(parents=True)
    ckpt = torch.load(seg_checkpoint, map_location="cpu", weights_only=False)
    torch.save(ckpt, model_dir / "best.pt")
    evaluate_stage(cfg, "ds", "unet", "test")
    eval_dir = tmp_path / "results/ds/eval/unet/test"
    with open(eval_dir / "cases.csv") as fh:
        table = list(csv.DictReader(fh))
    assert table
    pages = report.write_study_reports(tmp_path / "results", "ds", "unet", stage="test")
    for row in table:
        record = json.loads((eval_dir / "predictions" / f"{row['case_id']}_dicom.json").read_text())
        kinds = {o["kind"]: o for o in record["objects"]}
        assert set(kinds) == {"SEG", "SR"}
        sr = hd.sr.srread(eval_dir / "predictions" / kinds["SR"]["file"])
        from pydicom.sr.codedict import codes

        for group in sr.content.get_volumetric_roi_measurement_groups():
            (m,) = group.get_measurements(name=codes.SCT.Volume)
            assert m.value == float(row[f"volume_ml_{group.tracking_identifier}"])
        html = pages[row["case_id"]].read_text()
        assert kinds["SEG"]["sop_instance_uid"] in html and kinds["SR"]["sop_instance_uid"] in html
