"""capsmed predict --dicom-out: a SEG that lies on the source slices, an SR with the report's volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.dicom.dicom_helpers import check_dicom_outputs, referenced_uids
from tests.pipeline_helpers import run_cli


def test_oblique_anisotropic_series_gives_seg_on_its_slices_and_sr(seg_checkpoint, oblique_series,
                                                                     tmp_path):
    out = tmp_path / "pred"
    assert run_cli("-q", "predict", "--model", seg_checkpoint, oblique_series, "--out", out,
                   "--dicom-out") == 0
    record = check_dicom_outputs(out, "oblique", oblique_series)
    assert record["source"]["series_instance_uid"] == str(
        pydicom.dcmread(next(oblique_series.glob("*.dcm"))).SeriesInstanceUID)
    # the study report lists the objects with their SOP Instance UIDs
    html = (out / "oblique.html").read_text()
    for obj in record["objects"]:
        assert obj["sop_instance_uid"] in html
    # reruns give byte-identical files (deterministic UIDs, dates from the source)
    first = {p.name: p.read_bytes() for p in out.glob("*.dcm")}
    assert run_cli("-q", "predict", "--model", seg_checkpoint, oblique_series, "--out",
                   tmp_path / "again", "--dicom-out") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.dcm")} == first


def test_real_hippocampus_case_as_dicom(seg_checkpoint, hippocampus_series, tmp_path):
    out = tmp_path / "pred"
    assert run_cli("-q", "predict", "--model", seg_checkpoint, hippocampus_series, "--out", out,
                   "--dicom-out") == 0
    check_dicom_outputs(out, "hippocampus_001", hippocampus_series)


def test_classifier_gives_an_sr_with_the_predicted_class_and_its_probability(
        cls_checkpoint, oblique_series, tmp_path):
    import csv

    out = tmp_path / "pred"
    assert run_cli("-q", "predict", "--model", cls_checkpoint, oblique_series, "--out", out,
                   "--dicom-out") == 0
    record = json.loads((out / "oblique_dicom.json").read_text())
    assert [o["kind"] for o in record["objects"]] == ["SR"]
    assert not (out / "oblique_seg.dcm").exists()
    with open(out / "probabilities.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    predicted = int(row["predicted"])
    sr = hd.sr.srread(out / "oblique_sr.dcm")
    (group,) = sr.content.get_image_measurement_groups()
    (finding,) = group.get_qualitative_evaluations()
    assert finding.value.value == f"L{predicted}"
    (prob,) = group.get_measurements()
    assert prob.value == pytest.approx(float(row[f"prob_{predicted}"]))
    sources = {str(pydicom.dcmread(f).SOPInstanceUID) for f in oblique_series.glob("*.dcm")}
    assert sources <= referenced_uids(pydicom.dcmread(out / "oblique_sr.dcm"))


def test_nifti_input_writes_no_seg_and_says_why(seg_checkpoint, tmp_path, capsys):
    from tests.dicom.dicom_helpers import blob_volume

    image, _ = blob_volume((20, 22, 18))
    path = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), path)
    assert run_cli("predict", "--model", seg_checkpoint, path, "--out", tmp_path / "o",
                   "--dicom-out") == 0
    assert (tmp_path / "o" / "study_seg.nii.gz").is_file()
    assert not list((tmp_path / "o").glob("*.dcm"))
    assert not list((tmp_path / "o").glob("*_dicom.json"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "no DICOM SEG/SR" in line]
    assert len(lines) == 1 and "not a DICOM series" in lines[0]


def _missing_slice(series: Path) -> Path:
    files = sorted(series.glob("*.dcm"))
    files[len(files) // 2].unlink()
    return series


def _mixed_orientations(series: Path) -> Path:
    from tests.data.data_helpers import pydicom_series

    shutil.rmtree(series)
    series.mkdir()
    for f in pydicom_series()["studyC"]:  # pydicom's radial MR series: 7 orientations
        shutil.copy(f, series / Path(f).name)
    return series


def _non_image(series: Path) -> Path:
    sr = pydicom.dcmread(next(series.glob("*.dcm")))
    del sr.PixelData
    sr.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["no pixels"])
    sr.save_as(series / "nopixels.dcm")
    return series


@pytest.mark.parametrize("spoil, message", [
    (_missing_slice, "slice(s) missing between"),
    (_mixed_orientations, "slices have different orientations"),
    (_non_image, "is not an image (no pixel data)"),
])
def test_bad_series_is_one_line_naming_the_series_and_writes_nothing(
        seg_checkpoint, oblique_series, tmp_path, capsys, spoil, message):
    series = spoil(oblique_series)
    uid = str(pydicom.dcmread(sorted(series.iterdir())[0]).SeriesInstanceUID)
    out = tmp_path / "o"
    assert run_cli("predict", "--model", seg_checkpoint, series, "--out", out,
                   "--dicom-out") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "capsmed: error" in line]
    assert len(err) == 1 and message in err[0] and uid in err[0]
    assert not out.exists() or not any(out.iterdir())
