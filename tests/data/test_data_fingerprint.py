"""Fingerprint (nnU-Net style) and plan derivation."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import write_nifti

from capsmed.data.fingerprint import compute_fingerprint, make_plan
from capsmed.data.sources import prepare_dataset
from capsmed.errors import CapsmedError


def _seg_doc(tmp_path, shapes, spacings):
    cases = []
    for i, (shape, sp) in enumerate(zip(shapes, spacings, strict=True)):
        img = np.zeros(shape, np.float32)
        lab = np.zeros(shape, np.uint8)
        core = tuple(slice(2, s - 2) for s in shape)
        img[core] = 10.0 + i
        lab[tuple(slice(3, 5) for _ in shape)] = 1
        lab[tuple(slice(5, 6) for _ in shape)] = 2
        img[lab == 1] = 100.0
        img[lab == 2] = 200.0
        aff = np.diag(list(sp) + [1.0])
        cases.append({"case_id": f"c{i}", "patient_id": f"c{i}",
                      "image": str(write_nifti(tmp_path / f"i{i}.nii.gz", img, aff)),
                      "label": str(write_nifti(tmp_path / f"l{i}.nii.gz", lab, aff))})
    return {"task": "segmentation", "spatial_dims": 3, "modality": "MRI",
            "labels": {"0": "background", "1": "a", "2": "b"}, "cases": cases}


def test_fingerprint_segmentation(tmp_path):
    doc = _seg_doc(tmp_path, [(20, 24, 16), (22, 24, 18), (30, 24, 16)],
                   [(1, 1, 2), (1, 1, 2), (1, 1, 3)])
    fp = compute_fingerprint(doc)
    assert fp["n_cases"] == 3 and fp["in_channels"] == 1 and fp["case_ids"] == ["c0", "c1", "c2"]
    assert fp["shapes"] == [[20, 24, 16], [22, 24, 18], [30, 24, 16]]
    assert fp["shapes_after_crop"] == [[16, 20, 12], [18, 20, 14], [26, 20, 12]]
    assert fp["spacings"] == [[1, 1, 2], [1, 1, 2], [1, 1, 3]]
    assert fp["median_spacing"] == [1, 1, 2]
    assert fp["median_shape_after_crop"] == [18, 20, 12]
    # foreground intensities: label 1 -> 100 (8 voxels), label 2 -> 200 (1 voxel) per case
    assert fp["intensity"]["min"] == 100 and fp["intensity"]["max"] == 200
    assert fp["intensity"]["mean"] == pytest.approx((8 * 100 + 200) / 9)
    assert fp["label_voxels"]["1"] == 3 * 8 and fp["label_voxels"]["2"] == 3
    assert fp["labels"] == doc["labels"]

    plan = make_plan(fp, {}, size_divisible=8, fixed_size=None)
    assert plan["spacing"] == [1, 1, 2]  # spacings differ -> resample to the median
    assert plan["patch_size"] == [24, 24, 16]  # [18, 20, 12] rounded up to multiples of 8
    assert plan["normalization"] == "zscore" and plan["num_classes"] == 3
    assert plan["task"] == "segmentation" and plan["spatial_dims"] == 3
    assert plan["crop_foreground"] is True and plan["in_channels"] == 1
    capped = make_plan(fp, {"preprocess": {"max_patch_size": 16}}, 8, None)
    assert capped["patch_size"] == [16, 16, 16]
    cfg = {"preprocess": {"spacing": [2, 2, 2], "patch_size": [32, 32, 32],
                          "normalization": "ct", "ct_window": [-100, 300],
                          "crop_foreground": False}}
    fixed = make_plan(fp, cfg, 16, None)
    assert fixed["spacing"] == [2, 2, 2] and fixed["patch_size"] == [32, 32, 32]
    assert fixed["normalization"] == "ct" and fixed["ct_window"] == [-100, 300]
    assert fixed["crop_foreground"] is False
    with pytest.raises(CapsmedError, match="not divisible by the model's size_divisible 16"):
        make_plan(fp, {"preprocess": {"patch_size": [24, 32, 32]}}, 16, None)


def test_plan_keeps_spacing_none_when_all_equal_and_ct_window_from_data(tmp_path):
    doc = _seg_doc(tmp_path, [(20, 20, 20)] * 2, [(1, 1, 1)] * 2)
    doc["modality"] = "CT"
    fp = compute_fingerprint(doc)
    plan = make_plan(fp, {}, 4, None)
    assert plan["spacing"] is None
    assert plan["normalization"] == "ct"
    assert plan["ct_window"] == [fp["intensity"]["percentile_00_5"],
                                 fp["intensity"]["percentile_99_5"]]


def test_fingerprint_and_plan_classification(tmp_path):
    doc = prepare_dataset({"source": "synthetic", "task": "classification", "spatial_dims": 2,
                           "synthetic": {"num_cases": 6, "size": [28, 28], "num_classes": 2}},
                          tmp_path, 0)
    fp = compute_fingerprint(doc)
    assert fp["class_counts"] == {"0": 3, "1": 3}
    assert fp["median_shape"] == [28, 28] and fp["spatial_dims"] == 2
    plan = make_plan(fp, {}, 1, fixed_size=None)
    assert plan["image_size"] == 28 and plan["patch_size"] == [28, 28]
    assert plan["normalization"] == "minmax" and plan["spacing"] is None
    assert plan["num_classes"] == 2 and plan["crop_foreground"] is False
    assert make_plan(fp, {"preprocess": {"image_size": 32}}, 1, None)["patch_size"] == [32, 32]
    assert make_plan(fp, {}, 1, fixed_size=40)["image_size"] == 40
    with pytest.raises(CapsmedError, match="conflicts with the model's fixed input size 28"):
        make_plan(fp, {"preprocess": {"image_size": 32}}, 1, fixed_size=28)
    with pytest.raises(ValueError, match="size_divisible must be >= 1"):
        make_plan(fp, {}, 0, None)


def test_fingerprint_real_hippocampus(hippocampus, tmp_path):
    doc = prepare_dataset({"source": "msd", "path": str(hippocampus), "max_cases": 6}, tmp_path, 0)
    fp = compute_fingerprint(doc)
    assert fp["median_spacing"] == [1.0, 1.0, 1.0] and fp["modality"] == "MRI"
    assert set(fp["label_voxels"]) == {"0", "1", "2"}
    assert fp["intensity"]["percentile_00_5"] < fp["intensity"]["mean"] < \
        fp["intensity"]["percentile_99_5"]
    plan = make_plan(fp, {"preprocess": {"max_patch_size": 64}}, 8, None)
    assert plan["spacing"] is None
    assert all(p % 8 == 0 and p <= 64 for p in plan["patch_size"])
    assert plan["patch_size"] == [40, 56, 40]


def test_fingerprint_empty_and_unreadable(tmp_path):
    with pytest.raises(CapsmedError, match="empty dataset"):
        compute_fingerprint({"task": "segmentation", "spatial_dims": 3, "cases": []})
    doc = {"task": "classification", "spatial_dims": 2, "modality": "other",
           "cases": [{"case_id": "a", "image": str(tmp_path / "gone.nii.gz"), "class": 0}]}
    with pytest.raises(CapsmedError, match="gone.nii.gz: file is missing"):
        compute_fingerprint(doc)
