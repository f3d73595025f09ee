"""validate_path / validate_dataset_config: one test per problem message, read-only checks."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import hash_tree, make_csv, make_dicom_dir, make_msd, tiny_case, write_nifti

from capsmed.data.validate import detect_kind, validate_dataset_config, validate_path

# --------------------------------------------------------------------------------------------
# MSD folders: each builder breaks one thing in a valid 3-case folder and returns
# (path to validate, file the message must name, text the message must hold)


def _json(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _dump(root: Path, doc: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(doc))


def msd_no_json(root):
    (root / "dataset.json").unlink()
    return root, "dataset.json", "missing (an MSD folder needs a dataset.json)"


def msd_bad_json(root):
    (root / "dataset.json").write_text('{"labels": {"0": "background"},')
    return root, "dataset.json", "malformed JSON"


def msd_missing_labels(root):
    doc = _json(root)
    del doc["labels"]
    _dump(root, doc)
    return root, "dataset.json", "missing key 'labels'"


def msd_missing_training(root):
    doc = _json(root)
    del doc["training"]
    del doc["numTraining"]
    _dump(root, doc)
    return root, "dataset.json", "missing key 'training'"


def msd_count_mismatch(root):
    doc = _json(root)
    doc["numTraining"] = 4
    _dump(root, doc)
    return root, "dataset.json", "count mismatch: numTraining is 4 but 'training' lists 3"


def msd_empty(root):
    doc = _json(root)
    doc["training"], doc["numTraining"] = [], 0
    _dump(root, doc)
    return root, "dataset.json", "empty dataset"


def msd_entry_lacks_label(root):
    doc = _json(root)
    del doc["training"][1]["label"]
    _dump(root, doc)
    return root, "dataset.json", "training[1] lacks 'label'"


def msd_label_key_not_int(root):
    doc = _json(root)
    doc["labels"]["one"] = "x"
    _dump(root, doc)
    return root, "dataset.json", "'labels' key 'one' is not a non-negative integer"


def msd_missing_file(root):
    (root / "imagesTr" / "case_001.nii.gz").unlink()
    return root, "imagesTr/case_001.nii.gz", "file is missing"


def msd_leaves_folder(root):
    doc = _json(root)
    shutil.copy(root / "imagesTr" / "case_000.nii.gz", root.parent / "outside.nii.gz")
    doc["training"][2]["image"] = "../outside.nii.gz"
    _dump(root, doc)
    return root, "dataset.json", "training[2] image '../outside.nii.gz' leaves the dataset folder"


def msd_duplicate(root):
    doc = _json(root)
    doc["training"].append(dict(doc["training"][0]))
    doc["numTraining"] = 4
    _dump(root, doc)
    return root, "dataset.json", "training[3]: duplicate case: image"


def msd_truncated(root):
    f = root / "imagesTr" / "case_002.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return root, "imagesTr/case_002.nii.gz", "truncated or corrupt image data"


def msd_unreadable(root):
    (root / "labelsTr" / "case_000.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    return root, "labelsTr/case_000.nii.gz", "unreadable NIfTI header"


def msd_shape_mismatch(root):
    write_nifti(root / "labelsTr" / "case_001.nii.gz", np.zeros((12, 14, 9), "u1"))
    return root, "labelsTr/case_001.nii.gz", "label shape [12, 14, 9] differs from image shape " \
        "[12, 14, 10]"


def msd_spacing_mismatch(root):
    write_nifti(root / "labelsTr" / "case_001.nii.gz", np.zeros((12, 14, 10), "u1"),
                np.diag([1.0, 1.0, 2.0, 1.0]))
    return root, "labelsTr/case_001.nii.gz", "label spacing [1.0, 1.0, 2.0] differs from image " \
        "spacing [1.0, 1.0, 1.0]"


def msd_affine_mismatch(root):
    aff = np.eye(4)
    aff[:3, 3] = [5, 0, 0]
    write_nifti(root / "labelsTr" / "case_001.nii.gz", np.zeros((12, 14, 10), "u1"), aff)
    return root, "labelsTr/case_001.nii.gz", "label affine (origin/orientation) differs"


def msd_nan(root):
    img, _ = tiny_case(np.random.default_rng(1))
    img[0, 0, :3] = np.nan
    img[1, 1, 1] = np.inf
    write_nifti(root / "imagesTr" / "case_001.nii.gz", img)
    return root, "imagesTr/case_001.nii.gz", "4 NaN/inf voxel(s)"


def msd_undeclared_label(root):
    _, lab = tiny_case(np.random.default_rng(1))
    lab[0, 0, 0] = 7
    write_nifti(root / "labelsTr" / "case_002.nii.gz", lab)
    return root, "labelsTr/case_002.nii.gz", "label values [7] not declared in labels (0, 1, 2)"


def msd_non_integer_label(root):
    _, lab = tiny_case(np.random.default_rng(1))
    lab = lab.astype(np.float32)
    lab[0, 0, 0] = 0.5
    write_nifti(root / "labelsTr" / "case_002.nii.gz", lab)
    return root, "labelsTr/case_002.nii.gz", "label values are not integers (e.g. 0.5)"


def msd_wrong_dims(root):
    write_nifti(root / "imagesTr" / "case_000.nii.gz", np.zeros((12, 14), "f4"))
    return root, "imagesTr/case_000.nii.gz", "wrong dimensionality: array shape [12, 14] for a " \
        "3D dataset"


MSD_BREAKERS = [msd_no_json, msd_bad_json, msd_missing_labels, msd_missing_training,
                msd_count_mismatch, msd_empty, msd_entry_lacks_label, msd_label_key_not_int,
                msd_missing_file, msd_leaves_folder, msd_duplicate, msd_truncated, msd_unreadable,
                msd_shape_mismatch, msd_spacing_mismatch, msd_affine_mismatch, msd_nan,
                msd_undeclared_label, msd_non_integer_label, msd_wrong_dims]


@pytest.mark.parametrize("breaker", MSD_BREAKERS, ids=lambda f: f.__name__)
def test_msd_problem(tmp_path, breaker):
    root = make_msd(tmp_path / "msd", n=3)
    target, file_part, text = breaker(root)
    problems = validate_path(target)
    assert len(problems) == 1, problems
    assert file_part in problems[0] and text in problems[0], problems[0]
    assert str(tmp_path) in problems[0]  # names the file by its full path


def test_valid_msd_and_float_labels_are_fine(tmp_path):
    root = make_msd(tmp_path / "msd", n=3)
    _, lab = tiny_case(np.random.default_rng(1))
    write_nifti(root / "labelsTr" / "case_001.nii.gz", lab.astype(np.float32))  # 0/1/2 as float
    assert validate_path(root) == []
    assert validate_path(root / "dataset.json") == []


def test_every_problem_is_reported(tmp_path):
    root = make_msd(tmp_path / "msd", n=3)
    msd_nan(root)  # case_001 image
    msd_undeclared_label(root)  # case_002 label
    msd_count_mismatch(root)  # dataset.json
    msd_unreadable(root)  # case_000 label
    problems = validate_path(root)
    assert len(problems) == 4, problems
    for part in ("dataset.json: count mismatch", "imagesTr/case_001.nii.gz: 4 NaN/inf",
                 "labelsTr/case_002.nii.gz: label values [7]",
                 "labelsTr/case_000.nii.gz: unreadable NIfTI header"):
        assert sum(part in p for p in problems) == 1, (part, problems)


def test_validation_changes_nothing(tmp_path, dicom_dir):
    root = make_msd(tmp_path / "msd", n=3)
    msd_truncated(root)
    csv = make_csv(tmp_path / "csv", task="segmentation")
    npz = tmp_path / "x.npz"
    np.savez(npz, train_images=np.zeros((2, 5, 5)), train_labels=np.array([0, 1.5]))
    for path in (root, csv, npz, dicom_dir):
        before = hash_tree(path)
        validate_path(path)
        validate_dataset_config({"source": detect_kind(path), "path": str(path)})
        assert hash_tree(path) == before


def test_real_hippocampus_is_valid(hippocampus):
    before = hash_tree(hippocampus)
    assert validate_path(hippocampus) == []
    assert hash_tree(hippocampus) == before


# --------------------------------------------------------------------------------------------
# MedMNIST archives


def _npz(path: Path, **arrays) -> Path:
    base = {"train_images": np.zeros((4, 8, 8), "u1"), "train_labels": np.array([0, 1, 0, 1]),
            "val_images": np.zeros((2, 8, 8), "u1"), "val_labels": np.array([[0], [1]]),
            "test_images": np.zeros((2, 8, 8), "u1"), "test_labels": np.array([1, 0])}
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


NPZ_CASES = {
    "missing_key": ({"val_labels": None}, "malformed .npz: missing key 'val_labels'"),
    "no_keys": ({k: None for k in ("train_images", "train_labels", "val_images", "val_labels",
                                   "test_images", "test_labels")} | {"x": np.zeros(2)},
                "malformed .npz: none of the keys"),
    "count_mismatch": ({"test_labels": np.array([1, 0, 1])},
                       "count mismatch: test_images has 2 item(s) but test_labels has 3"),
    "non_integer": ({"train_labels": np.array([0, 1.5, 0, 1])},
                    "train_labels holds non-integer classes"),
    "negative": ({"train_labels": np.array([0, -1, 0, 1])}, "train_labels holds negative classes"),
    "multi_label": ({"train_labels": np.zeros((4, 3), int)}, "multi-label (N, k) labels"),
    "wrong_dims": ({"train_images": np.zeros((4, 8))}, "wrong dimensionality: train_images has "
                   "shape [4, 8]"),
    "mixed_dims": ({"val_images": np.zeros((2, 8, 8, 8))}, "the splits mix 2D and 3D images"),
    "colour": ({"train_images": np.zeros((4, 8, 8, 3))}, "colour (N, H, W, 3) images are not "
               "supported"),
    "nan": ({"val_images": np.full((2, 8, 8), np.nan)}, "val_images holds 128 NaN/inf value(s)"),
    "empty": ({"train_images": np.zeros((0, 8, 8)), "train_labels": np.zeros(0, int),
               "val_images": None, "val_labels": None, "test_images": None, "test_labels": None},
              "empty dataset"),
}


@pytest.mark.parametrize("name", list(NPZ_CASES))
def test_npz_problem(tmp_path, name):
    arrays, text = NPZ_CASES[name]
    path = _npz(tmp_path / f"{name}.npz", **arrays)
    problems = validate_path(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: ") and text in problems[0], problems[0]


def test_npz_unreadable_and_truncated(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    good = _npz(tmp_path / "good.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:200])
    for path in (bad, cut):
        problems = validate_path(path)
        assert len(problems) == 1 and problems[0].startswith(f"{path}: unreadable or truncated")
    assert validate_path(good) == []


def test_npz_undeclared_class_from_config(tmp_path):
    path = _npz(tmp_path / "a.npz", test_labels=np.array([2, 0]))
    problems = validate_dataset_config({"source": "medmnist", "path": str(path),
                                        "spatial_dims": 2, "classes": {0: "a", 1: "b"}})
    assert problems == [f"{path}: classes [2] not declared in the config's classes (0, 1)"]


def test_real_medmnist_archives_are_valid(breastmnist, adrenalmnist):
    assert validate_path(breastmnist) == []
    assert validate_path(adrenalmnist) == []


# --------------------------------------------------------------------------------------------
# CSV manifests


def _csv(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        if not (root / f"{name}.nii.gz").exists():
            img, lab = tiny_case(np.random.default_rng(0), (10, 12))
            write_nifti(root / f"{name}.nii.gz", img)
            write_nifti(root / f"{name}_seg.nii.gz", lab)
    path = root / "m.csv"
    path.write_text(text)
    return path


CSV_CASES = {
    "malformed": ('case_id,image,class\n"a,a.nii.gz,0\n', "malformed CSV"),
    "missing_case_id": ("image,class\na.nii.gz,0\n", "malformed CSV: missing column 'case_id'"),
    "missing_image_col": ("case_id,class\na,0\n", "malformed CSV: missing column 'image'"),
    "no_target": ("case_id,image\na,a.nii.gz\n", "needs a 'label' (mask path) and/or 'class'"),
    "class_not_int": ("case_id,image,class\na,a.nii.gz,0\nb,b.nii.gz,benign\n",
                      "line 3: class 'benign' is not an integer"),
    "class_fraction": ("case_id,image,class\na,a.nii.gz,0.5\nb,b.nii.gz,1\n",
                       "line 2: class '0.5' is not an integer"),
    "class_negative": ("case_id,image,class\na,a.nii.gz,-1\nb,b.nii.gz,1\n",
                       "line 2: class -1 is negative"),
    "duplicate_id": ("case_id,image,class\na,a.nii.gz,0\na,b.nii.gz,1\n",
                     "line 3: duplicate case_id 'a' (also line 2)"),
    "duplicate_image": ("case_id,image,class\na,a.nii.gz,0\nb,./a.nii.gz,1\n",
                        "line 3: duplicate case: image"),
    "empty_id": ("case_id,image,class\n,a.nii.gz,0\nb,b.nii.gz,1\n", "line 2: empty case_id"),
    "leaves": ("case_id,image,class\na,../a.nii.gz,0\nb,b.nii.gz,1\n",
               "line 2: image '../a.nii.gz' leaves the dataset folder"),
    "empty": ("case_id,image,class\n", "empty dataset: the manifest has no rows"),
    "no_label_cell": ("case_id,image,label\na,a.nii.gz,\nb,b.nii.gz,b_seg.nii.gz\n",
                      "line 2: case 'a' has no label"),
}


@pytest.mark.parametrize("name", list(CSV_CASES))
def test_csv_problem(tmp_path, name):
    text, message = CSV_CASES[name]
    if name == "leaves":
        _csv(tmp_path, "")  # put a.nii.gz beside the dataset folder
    path = _csv(tmp_path / "ds", text)
    problems = validate_path(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: ") and message in problems[0], problems[0]


def test_csv_missing_image_file_and_wrong_dims(tmp_path):
    path = _csv(tmp_path, "case_id,image,class\na,a.nii.gz,0\nb,gone.nii.gz,1\n")
    assert validate_path(path) == [f"{tmp_path / 'gone.nii.gz'}: file is missing"]
    write_nifti(tmp_path / "c.nii.gz", np.zeros((6, 6, 6, 6), "f4"))
    path.write_text("case_id,image,class\na,a.nii.gz,0\nc,c.nii.gz,1\n")
    assert validate_path(path) == [f"{tmp_path / 'c.nii.gz'}: wrong dimensionality: array shape "
                                   "[6, 6, 6, 6] for a 2D dataset"]
    write_nifti(tmp_path / "c.nii.gz", np.zeros((10, 12, 3), "f4"))
    problems = validate_dataset_config({"source": "csv", "path": str(path), "spatial_dims": 2})
    assert problems == [f"{tmp_path / 'c.nii.gz'}: wrong dimensionality: array shape [10, 12, 3] "
                        "for a 2D dataset"]
    root = tmp_path / "mc"
    for name, ch in (("a", 2), ("b", 2), ("c", 3)):
        write_nifti(root / f"{name}.nii.gz", np.ones((6, 7, 8, ch), "f4"))
    (root / "m.csv").write_text("case_id,image,class\na,a.nii.gz,0\nb,b.nii.gz,1\nc,c.nii.gz,1\n")
    assert validate_path(root / "m.csv") == [f"{root / 'c.nii.gz'}: has 3 channel(s) but the "
                                             "dataset has 2"]


def test_csv_class_not_declared(tmp_path):
    path = _csv(tmp_path, "case_id,image,class\na,a.nii.gz,0\nb,b.nii.gz,3\n")
    problems = validate_dataset_config({"source": "csv", "path": str(path), "spatial_dims": 2,
                                        "classes": {"0": "x", "1": "y"}})
    assert problems == [f"{path}: line 3: class 3 not declared in classes (0, 1)"]


def test_csv_label_not_declared(tmp_path):
    path = _csv(tmp_path, "case_id,image,label\na,a.nii.gz,a_seg.nii.gz\n")
    problems = validate_dataset_config({"source": "csv", "path": str(path), "spatial_dims": 2,
                                        "task": "segmentation",
                                        "labels": {"0": "bg", "1": "x"}})
    assert problems == [f"{tmp_path / 'a_seg.nii.gz'}: label values [2] not declared in labels "
                        "(0, 1)"]


def test_csv_valid(tmp_path):
    assert validate_path(make_csv(tmp_path / "c", task="classification", dims=3)) == []
    assert validate_path(make_csv(tmp_path / "s", task="segmentation", dims=2)) == []


# --------------------------------------------------------------------------------------------
# DICOM folders


def test_dicom_valid(dicom_dir):
    assert detect_kind(dicom_dir) == "dicom"
    assert validate_path(dicom_dir) == []


def _by_position(folder):
    import numpy as np
    import pydicom

    def key(f):
        ds = pydicom.dcmread(f)
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        return float(np.dot(np.cross(o[:3], o[3:]), [float(v) for v in ds.ImagePositionPatient]))

    return sorted(folder.iterdir(), key=key)


def test_dicom_series_with_a_missing_slice_is_rejected_by_name(dicom_dir):
    series = dicom_dir / "studyB"
    slices = _by_position(series)
    slices[2].unlink()
    assert validate_path(dicom_dir) == [
        f"{series}: about 1 slice(s) missing between {slices[1].name} and {slices[3].name} "
        "(gap 5 mm, the other slices 2.5 mm apart)"]


def test_dicom_series_as_pydicom_ships_them_are_not_volumes(tmp_path):
    """CT2 lacks a stretch of slices, MR700 holds projections at several orientations."""
    import shutil

    from data_helpers import pydicom_series

    series = pydicom_series()
    root = tmp_path / "d"
    for name in ("studyA", "studyC"):
        (root / name).mkdir(parents=True)
        for f in series[name]:
            shutil.copy(f, root / name)
    (root / "manifest.csv").write_text("case_id,class\nstudyA,0\nstudyC,1\n")
    problems = validate_path(root)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{root / 'studyA'}: about 161 slice(s) missing between ")
    assert problems[1] == (f"{root / 'studyC'}: slices have different orientations "
                           "(ImageOrientationPatient), so they are not one volume")


def test_dicom_duplicate_slice(dicom_dir):
    import shutil

    series = dicom_dir / "studyB"
    first = _by_position(series)[0]
    shutil.copy(first, series / "copy_of_first")
    problems = validate_path(dicom_dir)
    assert len(problems) == 1 and "lie at the same position (duplicate slice)" in problems[0]
    assert problems[0].startswith(f"{series}: slices ")


def test_dicom_missing_manifest(tmp_path):
    root = make_dicom_dir(tmp_path / "d", manifest=None)
    assert validate_path(root) == [f"{root / 'manifest.csv'}: missing (a DICOM folder needs a "
                                   "manifest with case_id and class or label per series)"]


def test_dicom_truncated_slice(dicom_dir):
    f = sorted((dicom_dir / "studyB").iterdir())[1]
    f.write_bytes(f.read_bytes()[:-200])
    problems = validate_path(dicom_dir)
    assert len(problems) == 1 and problems[0].startswith(f"{f}: unreadable or truncated DICOM")


def test_dicom_two_series_in_one_folder(dicom_dir):
    for f in (dicom_dir / "studyA").iterdir():
        shutil.copy(f, dicom_dir / "studyB" / f"extra_{f.name}")
    problems = validate_path(dicom_dir)
    assert any(p.startswith(f"{dicom_dir / 'studyB'}: holds 2 DICOM series") for p in problems)


def test_dicom_case_without_series(dicom_dir):
    (dicom_dir / "manifest.csv").write_text("case_id,class\nstudyA,0\nstudyZ,1\n")
    assert validate_path(dicom_dir) == [f"{dicom_dir / 'manifest.csv'}: line 3: case 'studyZ' "
                                        "has no image (no DICOM series folder of that name)"]


def test_dicom_segmentation_label_geometry(dicom_dir):
    from capsmed.data._io import read_volume

    vol, _ = read_volume(dicom_dir / "studyB", load=False)
    write_nifti(dicom_dir / "studyB_seg.nii.gz", np.ones(vol.shape, "u1"), vol.affine)
    write_nifti(dicom_dir / "studyC_seg.nii.gz", np.ones(vol.shape, "u1"), vol.affine)
    (dicom_dir / "manifest.csv").write_text(
        "case_id,label\nstudyB,studyB_seg.nii.gz\nstudyC,studyC_seg.nii.gz\n")
    problems = validate_dataset_config({"source": "dicom", "path": str(dicom_dir),
                                        "task": "segmentation", "spatial_dims": 3})
    assert problems == [f"{dicom_dir / 'studyC_seg.nii.gz'}: label shape [16, 16, 5] differs from "
                        f"image shape [16, 16, 7] ({dicom_dir / 'studyC'})"]


# --------------------------------------------------------------------------------------------
# validate_path dispatch and dataset configs


def test_validate_path_unknown_and_missing(tmp_path):
    assert validate_path(tmp_path / "nope") == [f"{tmp_path / 'nope'}: does not exist"]
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    assert "not a dataset capsmed knows" in validate_path(tmp_path / "x.bin")[0]
    assert "not a dataset capsmed knows" in validate_path(tmp_path)[0]


CONFIG_CASES = [
    ({"source": "nifti"}, "source: 'nifti' is not one of"),
    ({"source": "synthetic", "task": "detection"}, "task: 'detection' is not one of"),
    ({"source": "synthetic", "spatial_dims": 4}, "spatial_dims: 4 is not one of [2, 3]"),
    ({"source": "msd"}, "source msd needs a path"),
    ({"source": "msd", "path": "/no/such/folder"}, "/no/such/folder: does not exist"),
    ({"source": "msd", "path": ".", "task": "classification"}, "source msd is a segmentation"),
    ({"source": "synthetic", "synthetic": {"num_cases": 1}},
     "synthetic.num_cases: 1 is less than the minimum of 4"),
    ({"source": "synthetic", "spatial_dims": 2, "synthetic": {"size": [32, 32, 32]}},
     "synthetic.size has 3 values but spatial_dims is 2"),
    ({"source": "synthetic", "synthetic": {"num_classes": 1}},
     "synthetic.num_classes: 1 is less than the minimum"),
    ({"source": "synthetic", "synthetic": {"noise": -1}},
     "synthetic.noise: -1 is less than the minimum of 0"),
    ({"source": "synthetic", "labels": {"x": "bg"}}, "'labels' key 'x' is not a non-negative"),
    ({"source": "synthetic", "labels": {"0": "bg"}}, "labels has 1 entries but "
     "synthetic.num_classes is 3"),
    ({"source": "synthetic", "max_cases": 0}, "max_cases: 0 is less than the minimum of 1"),
    ({"source": "synthetic", "spatial_dims": 3, "preprocess": {"patch_size": [32, 32]}},
     "preprocess.patch_size has 2 values but spatial_dims is 3"),
    ({"source": "synthetic", "preprocess": {"spacing": [1, -1, 1]}},
     "preprocess.spacing.1: -1 is less than or equal to the minimum"),
    ({"source": "synthetic", "preprocess": {"normalization": "l2"}},
     "preprocess.normalization: 'l2' is not one of"),
    ({"source": "synthetic", "preprocess": {"ct_window": [100, -100]}},
     "preprocess.ct_window must be [low, high]"),
    ({"source": "synthetic", "preprocess": {"crop_foreground": "yes"}},
     "preprocess.crop_foreground: 'yes' is not of type 'boolean'"),
    ({"source": "synthetic", "preprocess": {"image_size": 0}},
     "preprocess.image_size: 0 is less than the minimum of 8"),
    ({"source": "synthetic", "split": {"test_fraction": 1.0}},
     "split.test_fraction: 1.0 is greater than or equal to the maximum"),
    ({"source": "synthetic", "split": {"folds": 0}}, "split.folds: 0 is less than the minimum of 1"),
    ({"source": "synthetic", "split": {"val_fraction": 0}},
     "split.val_fraction: 0 is less than or equal to the minimum"),
    ({"source": "synthetic", "split": {"use_official": "no"}},
     "split.use_official: 'no' is not of type 'boolean'"),
]


@pytest.mark.parametrize("cfg,text", CONFIG_CASES, ids=[t for _, t in CONFIG_CASES])
def test_config_problem(cfg, text):
    problems = validate_dataset_config(cfg)
    assert len(problems) == 1, problems
    assert text in problems[0], problems[0]


def test_config_mismatch_with_data(tmp_path):
    root = make_msd(tmp_path / "msd", n=2)
    first = root / "imagesTr" / "case_000.nii.gz"
    assert validate_dataset_config({"source": "msd", "path": str(root), "spatial_dims": 2}) == [
        f"{first}: wrong dimensionality: images are 3D (array shape [12, 14, 10]) but the "
        "dataset config's spatial_dims says 2D"]
    doc = json.loads((root / "dataset.json").read_text())
    doc["tensorImageSize"] = "2D"
    (root / "dataset.json").write_text(json.dumps(doc))
    assert validate_path(root) == [
        f"{first}: wrong dimensionality: images are 3D (array shape [12, 14, 10]) but "
        f"{root / 'dataset.json'} (tensorImageSize 2D) says 2D"]
    csv = make_csv(tmp_path / "c", task="classification", dims=2)
    assert validate_dataset_config({"source": "csv", "path": str(csv),
                                    "task": "segmentation"}) == [
        f"{csv}: malformed CSV: task segmentation needs a 'label' column"]
    problems = validate_dataset_config({"source": "csv", "path": str(csv), "spatial_dims": 3})
    assert problems == [f"{tmp_path / 'c' / 'img' / 'c0.nii.gz'}: wrong dimensionality: images "
                        "are 2D (array shape [16, 18]) but the dataset config's spatial_dims says "
                        "3D"]
    assert validate_dataset_config({"source": "synthetic"}) == []
    assert validate_dataset_config("nope") == ["dataset config: must be a mapping, got str"]


# --------------------------------------------------------------------------------------------
# the remaining messages, one each


def msd_no_background(root):
    doc = _json(root)
    doc["labels"] = {"1": "a", "2": "b"}
    _dump(root, doc)
    return root, "dataset.json", "'labels' has no entry '0' (background)"


def msd_top_level_list(root):
    (root / "dataset.json").write_text("[1, 2]")
    return root, "dataset.json", "the top level must be an object"


def msd_training_not_list(root):
    doc = _json(root)
    doc["training"] = {"image": "x"}
    del doc["numTraining"]
    _dump(root, doc)
    return root, "dataset.json", "'training' must be a list"


def msd_entry_not_object(root):
    doc = _json(root)
    doc["training"][0] = "imagesTr/case_000.nii.gz"
    doc["training"][0:1] = [doc["training"][0]]
    _dump(root, doc)
    return root, "dataset.json", "training[0] must be an object with 'image' and 'label'"


def msd_duplicate_id(root):
    doc = _json(root)
    (root / "imagesTs").mkdir()
    shutil.copy(root / "imagesTr" / "case_000.nii.gz", root / "imagesTs" / "case_000.nii.gz")
    doc["training"].append({"image": "./imagesTs/case_000.nii.gz",
                            "label": "./labelsTr/case_000.nii.gz"})
    doc["numTraining"] = 4
    _dump(root, doc)
    return root, "dataset.json", "training[3]: duplicate case id 'case_000' (also training[0])"


def msd_label_nan(root):
    _, lab = tiny_case(np.random.default_rng(1))
    lab = lab.astype(np.float32)
    lab[0, 0, 0] = np.nan
    write_nifti(root / "labelsTr" / "case_002.nii.gz", lab)
    return root, "labelsTr/case_002.nii.gz", "label holds NaN/inf values"


def msd_not_nifti(root):
    doc = _json(root)
    (root / "imagesTr" / "case_000.png").write_bytes(b"\x89PNG")
    doc["training"][0]["image"] = "./imagesTr/case_000.png"
    _dump(root, doc)
    return root, "imagesTr/case_000.png", "not a NIfTI file (.nii/.nii.gz) or a DICOM series"


def msd_image_is_empty_folder(root):
    doc = _json(root)
    (root / "imagesTr" / "series0").mkdir()
    doc["training"][0]["image"] = "./imagesTr/series0"
    _dump(root, doc)
    return root, "imagesTr/series0", "holds no DICOM files"


@pytest.mark.parametrize("breaker", [msd_no_background, msd_top_level_list, msd_training_not_list,
                                     msd_entry_not_object, msd_duplicate_id, msd_label_nan,
                                     msd_not_nifti, msd_image_is_empty_folder],
                         ids=lambda f: f.__name__)
def test_msd_problem_more(tmp_path, breaker):
    test_msd_problem(tmp_path, breaker)


def test_npz_label_shape_and_dtype(tmp_path):
    path = _npz(tmp_path / "a.npz", train_labels=np.zeros((4, 1, 1), int))
    assert validate_path(path) == [f"{path}: train_labels has shape [4, 1, 1]; need (N,) or "
                                   "(N, 1)"]
    path = _npz(tmp_path / "b.npz", val_images=np.array([["a"] * 8] * 8 * 2).reshape(2, 8, 8))
    assert validate_path(path) == [f"{path}: val_images has non-numeric dtype <U1"]


def test_csv_more_problems(tmp_path):
    path = _csv(tmp_path / "ds", "case_id,image,label\na,a.nii.gz,../x_seg.nii.gz\n")
    assert validate_path(path) == [f"{path}: line 2: label '../x_seg.nii.gz' leaves the dataset "
                                   f"folder {tmp_path / 'ds'}"]
    path = _csv(tmp_path / "ds", "case_id,image,label\na,a.nii.gz,a_seg.nii.gz\n")
    assert validate_dataset_config({"source": "csv", "path": str(path), "spatial_dims": 2,
                                    "task": "classification"}) == [
        f"{path}: malformed CSV: task classification needs a 'class' column"]
    assert validate_dataset_config({"source": "csv", "path": str(path), "spatial_dims": 2,
                                    "labels": {"1": "x", "2": "y"}}) == [
        "dataset config: 'labels' has no entry '0' (background)"]
    path = _csv(tmp_path / "ds", "case_id,image,label,class\na,a.nii.gz,a_seg.nii.gz,1\n")
    assert validate_path(path) == []  # both columns: both checked
    assert validate_dataset_config({"source": "csv", "path": str(path), "spatial_dims": 2}) == [
        f"{path}: has both 'label' and 'class' columns; set the dataset config's task"]


def test_dicom_more_problems(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "manifest.csv").write_text("case_id,class\na,0\n")
    problems = validate_path(root)
    assert problems[0] == f"{root}: empty dataset: no folder below it holds DICOM files"
    root = make_dicom_dir(tmp_path / "e")
    import pydicom

    f = sorted((root / "studyB").iterdir())[0]
    ds = pydicom.dcmread(f)
    del ds.ImagePositionPatient
    ds.save_as(f)
    assert validate_path(root) == [f"{f.parent}: slice {f.name} lacks ImagePositionPatient or "
                                   "ImageOrientationPatient, so the series geometry cannot be "
                                   "assembled"]
    ds = pydicom.dcmread(sorted((root / "studyC").iterdir())[0])
    del ds.PixelData
    ds.save_as(root / "studyC" / "nopixels")
    assert validate_path(root)[1] == f"{root / 'studyC' / 'nopixels'}: has no pixel data (not " \
        "an image slice)"


def test_dicom_slices_of_different_sizes(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    root = make_dicom_dir(tmp_path / "d")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = pydicom.dcmread(sorted((root / "studyA").iterdir())[0]) \
        .SeriesInstanceUID
    ds.save_as(root / "studyA" / "big")
    problems = validate_path(root)
    assert problems == [f"{root / 'studyA'}: slices have different sizes [(16, 16), (128, 128)]"]


MORE_CONFIG_CASES = [
    ({"source": "synthetic", "labels": "bg"}, "labels: 'bg' is not of type 'object'"),
    ({"source": "synthetic", "modality": 3}, "modality: 3 is not of type 'string'"),
    ({"source": "synthetic", "synthetic": [1]}, "synthetic: [1] is not of type 'object'"),
    ({"source": "synthetic", "preprocess": 1}, "preprocess: 1 is not of type 'object'"),
    ({"source": "synthetic", "split": 1}, "split: 1 is not of type 'object'"),
    ({"source": "synthetic", "synthetic": {"seed": "a"}},
     "synthetic.seed: 'a' is not of type 'integer'"),
    ({"source": "synthetic", "preprocess": {"max_patch_size": 0}},
     "preprocess.max_patch_size: 0 is less than the minimum of 8"),
    ({"source": "medmnist", "path": ".", "task": "segmentation"},
     "source medmnist is a classification source"),
    ({"source": "synthetic", "task": "classification", "classes": {"0": "a"}},
     "classes has 1 entries but synthetic.num_classes is 3"),
]


# (key, a value the schema rejects, a value it accepts) for the checks the three validators once
# disagreed on: the JSON schema (Snakemake), ``capsmed validate`` and the split maker.
AGREEMENT_CASES = [
    ("synthetic", "num_cases", 3, 4),
    ("split", "test_fraction", 0.0, 0.5),
    ("preprocess", "image_size", 7, 8),
    ("synthetic", "seed", -1, 5),
]


@pytest.mark.parametrize("section,key,bad,good", AGREEMENT_CASES,
                         ids=[f"{s}.{k}" for s, k, _, _ in AGREEMENT_CASES])
def test_the_validators_agree(section, key, bad, good):
    from capsmed.config import validate_config
    from capsmed.data.splits import make_splits
    from capsmed.errors import CapsmedError

    def ds(value):
        return {"source": "synthetic", "task": "classification", "spatial_dims": 2,
                "synthetic": {"size": [32, 32], "num_cases": 8}, section: {key: value}} \
            if section != "synthetic" else {
                "source": "synthetic", "task": "classification", "spatial_dims": 2,
                "synthetic": {"size": [32, 32], key: value}}

    doc = {"task": "segmentation", "cases": [{"case_id": f"c{i}"} for i in range(8)]}
    for value, ok in ((bad, False), (good, True)):
        problems = validate_dataset_config(ds(value))
        assert (problems == []) is ok, problems
        if not ok:
            assert f"{section}.{key}" in problems[0]
        try:
            validate_config({"datasets": {"d": ds(value)}})
            schema_ok = True
        except CapsmedError as exc:
            schema_ok = False
            assert f"datasets.d.{section}.{key}" in str(exc)
        assert schema_ok is ok
        if section == "split":
            try:
                make_splits(doc, {key: value}, 0)
                split_ok = True
            except CapsmedError:
                split_ok = False
            assert split_ok is ok


@pytest.mark.parametrize("cfg,text", MORE_CONFIG_CASES, ids=[t for _, t in MORE_CONFIG_CASES])
def test_config_problem_more(cfg, text):
    test_config_problem(cfg, text)


def test_msd_source_needs_folder_or_json(tmp_path):
    csv = make_csv(tmp_path, task="classification")
    assert validate_dataset_config({"source": "msd", "path": str(csv)}) == [
        f"{csv}: source msd needs an MSD folder or its dataset.json"]
