"""prepare_dataset for every source: cases.json shape, materialising, idempotence, read-only."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import hash_tree, make_csv, write_nifti

from capsmed.data.sources import load_cases, prepare_dataset
from capsmed.errors import CapsmedError


def _check_doc(doc: dict, out: Path, task: str, dims: int) -> None:
    assert json.loads((out / "cases.json").read_text()) == doc
    assert list(doc) == ["task", "spatial_dims", "labels" if task == "segmentation" else "classes",
                         "modality", "cases"]
    assert doc["task"] == task and doc["spatial_dims"] == dims
    assert doc["modality"] in ("MRI", "CT", "other")
    ids = [c["case_id"] for c in doc["cases"]]
    assert len(ids) == len(set(ids)) > 0
    for c in doc["cases"]:
        assert Path(c["image"]).is_absolute() and Path(c["image"]).exists()
        assert isinstance(c["patient_id"], str) and c["patient_id"]
        if task == "segmentation":
            assert Path(c["label"]).is_absolute() and Path(c["label"]).is_file()
            assert "class" not in c
        else:
            assert isinstance(c["class"], int) and str(c["class"]) in doc["classes"]
            assert "label" not in c


@pytest.mark.parametrize("task,size", [("segmentation", [24, 20, 16]),
                                       ("classification", [28, 28])])
def test_synthetic_source(tmp_path, task, size):
    cfg = {"source": "synthetic", "task": task, "spatial_dims": len(size),
           "synthetic": {"num_cases": 4, "size": size, "num_classes": 3, "noise": 0.1}}
    doc = prepare_dataset(cfg, tmp_path / "out", seed=0)
    _check_doc(doc, tmp_path / "out", task, len(size))
    assert [c["case_id"] for c in doc["cases"]] == [f"case_{i:03d}" for i in range(4)]
    img = nib.load(doc["cases"][0]["image"])
    assert img.shape == tuple(size)
    if task == "segmentation":
        assert doc["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    else:
        assert doc["classes"] == {"0": "class_0", "1": "class_1", "2": "class_2"}


def test_synthetic_is_idempotent_and_deterministic(tmp_path):
    cfg = {"source": "synthetic", "task": "segmentation",
           "synthetic": {"num_cases": 4, "size": [20, 20, 20]}}
    prepare_dataset(cfg, tmp_path / "a", seed=5)
    before = hash_tree(tmp_path / "a")
    prepare_dataset(cfg, tmp_path / "a", seed=5)
    assert hash_tree(tmp_path / "a") == before  # nothing rewritten (mtimes kept)
    prepare_dataset(cfg, tmp_path / "b", seed=5)
    for sub in ("images", "labels"):
        for f in (tmp_path / "a" / sub).iterdir():
            assert f.read_bytes() == (tmp_path / "b" / sub / f.name).read_bytes()
    prepare_dataset(cfg, tmp_path / "c", seed=6)
    a0 = (tmp_path / "a" / "images" / "case_000.nii.gz").read_bytes()
    assert (tmp_path / "c" / "images" / "case_000.nii.gz").read_bytes() != a0


def test_synthetic_regenerates_when_config_changes_or_file_missing(tmp_path):
    cfg = {"source": "synthetic", "task": "segmentation",
           "synthetic": {"num_cases": 5, "size": [20, 20, 20]}}
    out = tmp_path / "out"
    prepare_dataset(cfg, out, seed=0)
    (out / "labels" / "case_001.nii.gz").unlink()
    prepare_dataset(cfg, out, seed=0)
    assert (out / "labels" / "case_001.nii.gz").is_file()
    cfg["synthetic"]["num_cases"] = 4
    doc = prepare_dataset(cfg, out, seed=0)
    assert len(doc["cases"]) == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"case_{i:03d}.nii.gz" for i in range(4)]


def test_synthetic_null_values_from_schema_defaults(tmp_path):
    cfg = {"source": "synthetic", "task": "classification", "spatial_dims": 2, "path": None,
           "labels": None, "classes": {"0": "few", "1": "many"}, "max_cases": None,
           "modality": None, "synthetic": {"num_cases": 4, "size": [28, 28], "num_classes": 2},
           "preprocess": {"spacing": None, "patch_size": None}, "split": {}}
    doc = prepare_dataset(cfg, tmp_path, seed=0)
    assert doc["classes"] == {"0": "few", "1": "many"}
    assert sorted(c["class"] for c in doc["cases"]) == [0, 0, 1, 1]


def test_msd_source_real_hippocampus(hippocampus, tmp_path):
    before = hash_tree(hippocampus)
    doc = prepare_dataset({"source": "msd", "task": "segmentation", "path": str(hippocampus),
                           "max_cases": 5}, tmp_path, seed=0)
    _check_doc(doc, tmp_path, "segmentation", 3)
    assert doc["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert doc["modality"] == "MRI"
    assert [c["case_id"] for c in doc["cases"]] == [
        "hippocampus_001", "hippocampus_008", "hippocampus_019", "hippocampus_026",
        "hippocampus_037"]
    assert doc["cases"][0]["image"] == str(hippocampus / "imagesTr" / "hippocampus_001.nii.gz")
    assert not (tmp_path / "images").exists()  # referenced in place, never copied
    assert hash_tree(hippocampus) == before


def test_msd_source_accepts_dataset_json_and_relative_path(msd_factory, tmp_path, monkeypatch):
    root = msd_factory(3)
    monkeypatch.chdir(root.parent)
    doc = prepare_dataset({"source": "msd", "path": "msd/dataset.json"}, tmp_path / "o", 0)
    assert len(doc["cases"]) == 3 and doc["task"] == "segmentation"
    assert doc["cases"][0]["label"] == str(root / "labelsTr" / "case_000.nii.gz")


def test_msd_source_2d(tmp_path):
    root = tmp_path / "msd2d"
    training = []
    for i in range(2):
        write_nifti(root / "imagesTr" / f"s{i}.nii.gz", np.random.rand(16, 12).astype("f4"))
        write_nifti(root / "labelsTr" / f"s{i}.nii.gz", (np.arange(192).reshape(16, 12) % 2)
                    .astype("u1"))
        training.append({"image": f"./imagesTr/s{i}.nii.gz", "label": f"./labelsTr/s{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"}, "modality": {"0": "CT"}, "training": training,
        "tensorImageSize": "2D", "numTraining": 2}))
    doc = prepare_dataset({"source": "msd", "path": str(root), "spatial_dims": 2}, tmp_path / "o",
                          0)
    assert doc["spatial_dims"] == 2 and doc["modality"] == "CT" and len(doc["cases"]) == 2


def test_medmnist_2d_breast(breastmnist, tmp_path):
    doc = prepare_dataset({"source": "medmnist", "task": "classification", "spatial_dims": 2,
                           "path": str(breastmnist), "max_cases": 12,
                           "classes": {"0": "malignant", "1": "normal_benign"}}, tmp_path, 0)
    _check_doc(doc, tmp_path, "classification", 2)
    splits = [c["split"] for c in doc["cases"]]
    # proportional to 546/78/156, at least one per official split
    assert splits.count("train") == 9 and splits.count("val") == 1 and splits.count("test") == 2
    with np.load(breastmnist) as npz:
        first = npz["train_images"][0]
        assert doc["cases"][0]["class"] == int(npz["train_labels"][0])
        t0 = [c for c in doc["cases"] if c["split"] == "test"][0]
        assert t0["class"] == int(npz["test_labels"][0])
    img = nib.load(doc["cases"][0]["image"])
    assert img.shape == (28, 28)
    assert np.array_equal(np.asarray(img.dataobj), first)
    assert doc["cases"][0]["case_id"] == "breastmnist_train_00000"


def test_medmnist_3d_adrenal_labels_n_by_1(adrenalmnist, tmp_path):
    doc = prepare_dataset({"source": "medmnist", "path": str(adrenalmnist), "spatial_dims": 3,
                           "max_cases": 6}, tmp_path, 0)
    _check_doc(doc, tmp_path, "classification", 3)
    assert nib.load(doc["cases"][0]["image"]).shape == (28, 28, 28)
    assert doc["classes"] == {"0": "class_0", "1": "class_1"}
    assert {c["split"] for c in doc["cases"]} == {"train", "val", "test"}
    assert len(list((tmp_path / "images").iterdir())) == 6


def test_medmnist_materialising_is_idempotent(tmp_path):
    npz = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, train_images=rng.integers(0, 255, (5, 10, 10), dtype=np.uint8),
             train_labels=np.array([0, 1, 0, 1, 2]), val_images=np.zeros((2, 10, 10), "u1"),
             val_labels=np.array([[0], [1]]), test_images=np.ones((2, 10, 10), "u1"),
             test_labels=np.array([2, 2]))
    npz_hash = hash_tree(npz)
    doc = prepare_dataset({"source": "medmnist", "path": str(npz), "spatial_dims": 2},
                          tmp_path / "o", 0)
    assert len(doc["cases"]) == 9 and doc["classes"] == {"0": "class_0", "1": "class_1",
                                                         "2": "class_2"}
    before = hash_tree(tmp_path / "o")
    prepare_dataset({"source": "medmnist", "path": str(npz), "spatial_dims": 2}, tmp_path / "o", 0)
    assert hash_tree(tmp_path / "o") == before
    assert hash_tree(npz) == npz_hash


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_csv_source(tmp_path, task):
    csv = make_csv(tmp_path / "ds", task=task, n=4, dims=2)
    before = hash_tree(tmp_path / "ds")
    doc = prepare_dataset({"source": "csv", "task": task, "spatial_dims": 2, "path": str(csv)},
                          tmp_path / "out", 0)
    _check_doc(doc, tmp_path / "out", task, 2)
    assert [c["patient_id"] for c in doc["cases"]] == ["p0", "p0", "p1", "p1"]
    assert doc["cases"][1]["image"] == str(tmp_path / "ds" / "img" / "c1.nii.gz")
    if task == "segmentation":
        assert doc["labels"] == {"0": "background", "1": "label_1", "2": "label_2"}
    else:
        assert doc["classes"] == {"0": "class_0", "1": "class_1"}
    assert hash_tree(tmp_path / "ds") == before


def test_csv_patient_id_defaults_to_case_id_and_declared_names(tmp_path):
    root = tmp_path / "ds"
    write_nifti(root / "a.nii.gz", np.ones((8, 8, 8), "f4"))
    write_nifti(root / "b.nii.gz", np.ones((8, 8, 8), "f4"))
    (root / "m.csv").write_text("case_id,image,class\na,a.nii.gz,1\nb,b.nii.gz,0\n")
    doc = prepare_dataset({"source": "csv", "path": str(root / "m.csv"),
                           "classes": {0: "neg", 1: "pos"}}, tmp_path / "o", 0)
    assert doc["task"] == "classification" and doc["spatial_dims"] == 3
    assert doc["classes"] == {"0": "neg", "1": "pos"}
    assert [c["patient_id"] for c in doc["cases"]] == ["a", "b"]


def test_dicom_source(dicom_dir, tmp_path):
    before = hash_tree(dicom_dir)
    doc = prepare_dataset({"source": "dicom", "task": "classification", "spatial_dims": 3,
                           "path": str(dicom_dir)}, tmp_path / "o", 0)
    _check_doc(doc, tmp_path / "o", "classification", 3)
    assert [c["case_id"] for c in doc["cases"]] == ["studyA", "studyB", "studyC"]
    assert doc["cases"][0]["image"] == str(dicom_dir / "studyA")
    assert doc["modality"] == "other"  # two CT series and one MR series
    # patient ids from the DICOM PatientID tag: studyB and studyC share a patient
    assert doc["cases"][1]["patient_id"] == doc["cases"][2]["patient_id"] != \
        doc["cases"][0]["patient_id"]
    assert hash_tree(dicom_dir) == before


def test_dicom_source_from_csv_manifest(dicom_dir, tmp_path):
    csv = dicom_dir / "list.csv"
    csv.write_text("case_id,image,class,patient_id\nA,studyA,0,x\nB,studyB,1,y\n")
    doc = prepare_dataset({"source": "dicom", "path": str(csv)}, tmp_path / "o", 0)
    assert [c["image"] for c in doc["cases"]] == [str(dicom_dir / "studyA"),
                                                  str(dicom_dir / "studyB")]
    assert doc["modality"] == "CT" and [c["patient_id"] for c in doc["cases"]] == ["x", "y"]


def test_prepare_dataset_lists_every_problem(msd_factory, tmp_path):
    root = msd_factory(3)
    (root / "imagesTr" / "case_001.nii.gz").unlink()
    (root / "labelsTr" / "case_002.nii.gz").write_bytes(b"garbage")
    with pytest.raises(CapsmedError) as err:
        prepare_dataset({"source": "msd", "path": str(root)}, tmp_path / "o", 0)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "imagesTr/case_001.nii.gz: file is missing" in msg
    assert "labelsTr/case_002.nii.gz: unreadable NIfTI header" in msg
    assert not (tmp_path / "o" / "cases.json").exists()


def test_load_cases(tmp_path):
    doc = prepare_dataset({"source": "synthetic", "task": "classification", "spatial_dims": 2,
                           "synthetic": {"num_cases": 4, "size": [16, 16], "num_classes": 2}},
                          tmp_path, 0)
    assert load_cases(tmp_path) == doc == load_cases(tmp_path / "cases.json")
    with pytest.raises(CapsmedError, match="cannot be read"):
        load_cases(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CapsmedError, match="missing key"):
        load_cases(tmp_path / "bad.json")


def test_package_exports():
    import capsmed.data as data

    for name in data.__all__:
        assert callable(getattr(data, name))
    with pytest.raises(AttributeError):
        data.nope  # noqa: B018
