"""The SEG writer on its own: a known label map in the source geometry comes back exactly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import highdicom as hd
import numpy as np
import pydicom
import pytest

from capsmed.dicom.seg import Algorithm, build_seg
from capsmed.dicom.series import derived_uid, load_series
from capsmed.errors import CapsmedError
from tests.dicom.dicom_helpers import blob_volume, oblique_mr_affine, write_mr_series

ALGO = Algorithm(model="unet", checkpoint_sha256="ab" * 32, capsmed_version="0.1.0")


@pytest.fixture
def series_and_label(tmp_path):
    shape = (17, 21, 9)
    image, label = blob_volume(shape, seed=2)
    affine = oblique_mr_affine(shape)
    folder = write_mr_series(image * 300 + 300, affine, tmp_path / "s", seed="unit")
    return folder, label, affine


def test_seg_frames_are_the_label_map_on_each_source_slice(series_and_label):
    folder, label, affine = series_and_label
    series = load_series(folder)
    seg = build_seg(label, affine, series, {0: "background", 1: "anterior", 2: "posterior"}, ALGO)
    assert seg.NumberOfFrames == len(series.datasets) * 2  # every slice, both segments
    for ds in series.datasets:
        z = int(ds.InstanceNumber) - 1  # write_mr_series: slice z holds label[:, :, z]
        frame = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID)], combine_segments=True)[0]
        np.testing.assert_array_equal(frame, label[:, :, z].T)


def test_prediction_off_the_source_grid_is_refused(series_and_label):
    folder, label, affine = series_and_label
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 0]  # half a voxel along the first axis
    with pytest.raises(CapsmedError, match="does not match slice"):
        build_seg(label, shifted, load_series(folder), {1: "a", 2: "b"}, ALGO)


def test_derived_uids_are_valid_stable_and_distinct():
    a, b = derived_uid("seg", "1.2.3", "x"), derived_uid("sr", "1.2.3", "x")
    assert a == derived_uid("seg", "1.2.3", "x") and a != b
    for uid in (a, b):
        assert pydicom.uid.UID(uid).is_valid and len(uid) <= 64


def test_writer_imports_no_torch_or_monai(series_and_label, tmp_path, repo_root):
    folder, label, affine = series_and_label
    np.save(tmp_path / "label.npy", label)
    np.save(tmp_path / "affine.npy", affine)
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        from capsmed.dicom.outputs import write_dicom_outputs
        from capsmed.dicom.seg import Algorithm
        from capsmed.dicom.series import load_series
        import capsmed.dicom.web
        write_dicom_outputs(Path({str(tmp_path)!r}), "s", "s", load_series(Path({str(folder)!r})),
                            Algorithm("unet", "ab" * 32, "0.1.0"),
                            labels={{0: "background", 1: "a", 2: "b"}},
                            prediction=np.load({str(tmp_path / "label.npy")!r}),
                            affine=np.load({str(tmp_path / "affine.npy")!r}),
                            volumes_ml={{"a": 1.0, "b": 2.0}})
        print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai")))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout
    assert hd.seg.segread(tmp_path / "s_seg.dcm").NumberOfFrames == 18
