"""Real-world DICOM in and out: compressed series, enhanced objects, series choice, frames of
reference, headers only, UIDs from every option, label gaps in the SR, SNOMED CT codes."""

from __future__ import annotations

import json
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from capsmed.data._io import read_dicom_series
from capsmed.data.dicomio import series_skip_reason
from capsmed.dicom.outputs import write_case_dicom
from capsmed.dicom.series import load_series
from capsmed.errors import CapsmedError
from tests.dicom.dicom_helpers import (
    blob_volume,
    dcmtk_tool,
    oblique_mr_affine,
    sr_volumes,
    write_mr_series,
    write_scout,
)

SHAPE = (17, 21, 9)


@pytest.fixture
def series_and_label(tmp_path):
    image, label = blob_volume(SHAPE, seed=4)
    affine = oblique_mr_affine(SHAPE)
    folder = write_mr_series(image * 300 + 300, affine, tmp_path / "s", seed="realworld")
    return folder, label, affine


# -- decoding ----------------------------------------------------------------------------------

def _dcmtk_copy(src, dst, tool: str, *args: str):
    dst.mkdir()
    binary = dcmtk_tool(tool)
    for f in sorted(src.glob("*.dcm")):
        subprocess.run([binary, *args, str(f), str(dst / f.name)], check=True, timeout=60,
                       capture_output=True)
    return dst


def _pydicom_copy(src, dst, syntax):
    dst.mkdir()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


@pytest.mark.parametrize(("tool", "args", "syntax"), [
    ("dcmcjpeg", (), "1.2.840.10008.1.2.4.70"),  # its default: lossless process 14, SV1
    ("dcmcjpeg", ("--encode-lossless",), "1.2.840.10008.1.2.4.57"),
    ("dcmcjpls", (), "1.2.840.10008.1.2.4.80"),
    ("dcmcrle", (), "1.2.840.10008.1.2.5"),
    (None, (), "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless (pydicom's openjpeg encoder)
])
def test_compressed_copies_read_equal_to_the_uncompressed_series(tmp_path, tool, args, syntax):
    shape = (40, 36, 6)  # JPEG 2000's default six resolutions need 32 pixels a side
    image, _ = blob_volume(shape, seed=5)
    folder = write_mr_series(image * 300 + 300, oblique_mr_affine(shape), tmp_path / "s",
                             seed="compressed")
    if tool is None:
        copy = _pydicom_copy(folder, tmp_path / "c", syntax)
    else:
        copy = _dcmtk_copy(folder, tmp_path / "c", tool, *args)
    assert {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in copy.glob("*.dcm")} \
        == {syntax}
    plain, problems = read_dicom_series(folder, load=True)
    packed, packed_problems = read_dicom_series(copy, load=True)
    assert problems == [] and packed_problems == []
    np.testing.assert_array_equal(packed.data, plain.data)
    np.testing.assert_array_equal(packed.affine, plain.affine)
    assert load_series(copy).sop_instance_uids == load_series(folder).sop_instance_uids


# -- what a series must be -------------------------------------------------------------------

def test_enhanced_multiframe_objects_are_rejected_in_one_line(series_and_label, tmp_path):
    folder, _, _ = series_and_label
    files = sorted(folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    ds.save_as(enhanced / "emr.dcm", enforce_file_format=True)
    line = (f"MR image {ds.SOPInstanceUID} is an enhanced (multi-frame) object of 3 frames, which "
            "capsmed does not read; export the series as single-frame (classic) images")
    with pytest.raises(CapsmedError) as info:
        load_series(enhanced)
    assert str(info.value) == f"series {ds.SeriesInstanceUID}: {line}"
    assert read_dicom_series(enhanced, load=True)[1] == [f"{enhanced / 'emr.dcm'}: {line}"]


def test_two_frames_of_reference_in_one_series_are_an_error(series_and_label):
    folder, _, _ = series_and_label
    f = sorted(folder.glob("*.dcm"))[4]
    ds = pydicom.dcmread(f)
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["other frame"])
    ds.save_as(f, enforce_file_format=True)
    with pytest.raises(CapsmedError, match=r"slices lie in 2 frames of reference "
                                           r"\(FrameOfReferenceUID .*\); one series has one"):
        load_series(folder)
    problems = read_dicom_series(folder, load=False)[1]
    assert len(problems) == 1 and "2 frames of reference" in problems[0]


def test_series_is_held_as_headers_without_pixel_data(series_and_label):
    folder, _, _ = series_and_label
    series = load_series(folder)
    assert len(series.datasets) == SHAPE[2]
    assert all("PixelData" not in ds and ds.has_pixels for ds in series.datasets)


def test_a_series_without_pixels_is_still_named_as_such(series_and_label):
    folder, _, _ = series_and_label
    f = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(f, enforce_file_format=True)
    with pytest.raises(CapsmedError, match=f"object {ds.SOPInstanceUID} is not an image"):
        load_series(folder)


# -- series choice ---------------------------------------------------------------------------

def _headers(folder):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]


def test_series_choice_skips_scouts_secondary_captures_and_derived(series_and_label, tmp_path):
    folder, _, _ = series_and_label
    assert series_skip_reason(_headers(folder)) is None
    scout = write_scout(folder, tmp_path / "scout")
    assert series_skip_reason(_headers(scout)) == "a localizer (ImageType LOCALIZER)"
    untyped = _headers(scout)
    for ds in untyped:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    assert series_skip_reason(untyped) == "a localizer (slices of mixed orientations)"
    few = _headers(folder)[:3]
    assert series_skip_reason(few) == "a localizer (3 slice(s), fewer than 5)"
    capture = _headers(folder)
    capture[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert series_skip_reason(capture) == "a secondary capture"
    derived = _headers(folder)
    for ds in derived:
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    assert series_skip_reason(derived) == "a derived series (ImageType DERIVED)"


# -- derived objects -------------------------------------------------------------------------

def _write(folder, label, affine, out, names=None, **kw):
    out.mkdir(exist_ok=True)
    record = write_case_dicom(out, "case", "case", load_series(folder), "segmentation",
                              names or {"0": "background", "1": "anterior", "2": "posterior"},
                              {"pred": label, "affine": affine}, model="unet",
                              checkpoint_sha256="cd" * 32, **kw)
    doc = json.loads(record.read_text())
    return {o["kind"]: o for o in doc["objects"]}, out


OPTIONS = {"overlap": 0.5, "tta": True, "tta_flips": "axes", "largest_component": False,
           "mode": "gaussian", "ensemble": None}


def test_identical_runs_write_identical_bytes_and_every_option_changes_the_uids(
        series_and_label, tmp_path):
    folder, label, affine = series_and_label
    first, a = _write(folder, label, affine, tmp_path / "a", options=OPTIONS)
    again, b = _write(folder, label, affine, tmp_path / "b", options=dict(reversed(OPTIONS.items())))
    for kind in ("SEG", "SR"):
        assert (a / first[kind]["file"]).read_bytes() == (b / again[kind]["file"]).read_bytes()
    seen = {first["SEG"]["sop_instance_uid"], first["SR"]["sop_instance_uid"]}
    changes = [{"overlap": 0.25}, {"tta": False}, {"tta_flips": "all"},
               {"largest_component": True}, {"mode": "constant"}, {"ensemble": ["fold0", "fold1"]}]
    for i, change in enumerate(changes):
        objs, _ = _write(folder, label, affine, tmp_path / f"c{i}", options={**OPTIONS, **change})
        uids = {objs["SEG"]["sop_instance_uid"], objs["SR"]["sop_instance_uid"],
                objs["SEG"]["series_instance_uid"]}
        assert not uids & seen, change
        seen |= uids
    other_checkpoint = write_case_dicom(
        tmp_path / "a", "ck", "ck", load_series(folder), "segmentation", {"1": "anterior"},
        {"pred": label, "affine": affine}, model="unet", checkpoint_sha256="ef" * 32,
        options=OPTIONS)
    objs = json.loads(other_checkpoint.read_text())["objects"]
    assert not {o["sop_instance_uid"] for o in objs} & seen
    # without options (a caller that names none) the objects still get their own UIDs
    plain, _ = _write(folder, label, affine, tmp_path / "t0")
    assert plain["SEG"]["sop_instance_uid"] not in seen


def test_sr_measures_a_label_value_that_has_no_name(series_and_label, tmp_path):
    folder, label, affine = series_and_label
    pred = label.copy()
    pred[label == 2] = 3  # values 1 and 3 named, 2 a gap
    pred[0, 0, 0] = 2
    objs, out = _write(folder, pred, affine, tmp_path / "gap",
                       names={"0": "background", "1": "anterior", "3": "posterior"})
    seg = hd.seg.segread(out / objs["SEG"]["file"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "label 2", "posterior"]
    volumes = sr_volumes(out / objs["SR"]["file"])
    voxel_ml = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0))) / 1000
    assert volumes["label 2"] == pytest.approx(voxel_ml)
    assert volumes["posterior"] == pytest.approx(np.count_nonzero(pred == 3) * voxel_ml)


def test_segments_carry_the_snomed_codes_the_config_gives(series_and_label, tmp_path):
    folder, label, affine = series_and_label
    hippocampus = {"value": "5366008", "meaning": "Hippocampus"}
    category = {"value": "91723000", "meaning": "Anatomical Structure"}
    names = {"0": "background",
             "1": {"name": "anterior", "snomed": {"category": category, "type": hippocampus,
                                                  "modifier": {"value": "7771000",
                                                               "meaning": "Left"}}},
             "2": "posterior"}
    objs, out = _write(folder, label, affine, tmp_path / "codes", names=names)
    seg = hd.seg.segread(out / objs["SEG"]["file"])
    first, second = seg.SegmentSequence
    assert first.SegmentLabel == "anterior"
    kind = first.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("5366008", "SCT")
    modifier = kind.SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodeMeaning) == ("7771000", "Left")
    assert first.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    plain = second.SegmentedPropertyTypeCodeSequence[0]  # no codes given: the private scheme
    assert (plain.CodeValue, plain.CodingSchemeDesignator) == ("L2", "99CAPSMED")
