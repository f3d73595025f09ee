"""Builders for capsmed.data tests: tiny MSD folders, CSV manifests, DICOM series, folder hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.require import skip_or_fail


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def tiny_case(rng: np.random.Generator, shape=(12, 14, 10), label_dtype=np.uint8):
    """An image with a bright blob holding labels 1 (left half) and 2 (right half)."""
    img = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, label_dtype)
    sl = tuple(slice(s // 4, 3 * s // 4) for s in shape)
    lab[sl] = 1
    lab[(slice(shape[0] // 2, 3 * shape[0] // 4),) + sl[1:]] = 2
    img[lab > 0] += 80
    return img, lab


def make_msd(root: Path, n: int = 3, shape=(12, 14, 10), seed: int = 0) -> Path:
    """A valid little MSD folder with ``n`` cases."""
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n):
        img, lab = tiny_case(rng, shape)
        write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", img)
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab)
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz",
                         "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    doc = {"name": "tiny", "tensorImageSize": "3D", "modality": {"0": "MRI"},
           "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": n,
           "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(doc, indent=1))
    return root


def make_csv(root: Path, task: str = "classification", n: int = 4, dims: int = 2,
             seed: int = 0) -> Path:
    """A CSV manifest with images (and masks) under ``root``; patients p0, p0, p1, p1, ..."""
    rng = np.random.default_rng(seed)
    shape = (16, 18) if dims == 2 else (12, 14, 10)
    rows = ["case_id,image,label,class,patient_id"]
    for i in range(n):
        img, lab = tiny_case(rng, shape)
        write_nifti(root / "img" / f"c{i}.nii.gz", img)
        write_nifti(root / "lab" / f"c{i}.nii.gz", lab)
        rows.append(f"c{i},img/c{i}.nii.gz,lab/c{i}.nii.gz,{i % 2},p{i // 2}")
    if task == "classification":
        rows = [",".join(r.split(",")[:2] + r.split(",")[3:]) for r in rows]
    else:
        rows = [",".join(r.split(",")[:3] + r.split(",")[4:]) for r in rows]
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def pydicom_series() -> dict[str, list[str]]:
    """Three small multi-slice series shipped with pydicom (two CT, one oblique MR)."""
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that it cannot download extra files
        return {"studyA": get_testdata_files("dicomdirtests/77654033/CT2/*"),
                "studyB": get_testdata_files("dicomdirtests/98892001/CT5N/*"),
                "studyC": get_testdata_files("dicomdirtests/98892003/MR700/*")}


def make_dicom_dir(root: Path, manifest: str | None = "case_id,class\nstudyA,0\nstudyB,1\n"
                   "studyC,0\n") -> Path:
    """Copy pydicom's test series into ``root/<study>/`` as whole volumes; write ``manifest.csv``.

    pydicom's series are not all volumes: CT2's first slice lies 200 mm from the other three (a
    stretch of missing slices) and is left out; MR700's slices are projections at seven
    orientations, so they are restacked as one oblique volume (the first slice's orientation,
    3 mm apart along its normal). ``capsmed validate`` rejects both as shipped.
    """
    import numpy as np
    import pydicom

    series = pydicom_series()
    if not all(series.values()):
        skip_or_fail("DATA", "pydicom's test series are not installed")
    for name, files in series.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        files = sorted(files)
        if name == "studyA":
            files = files[1:]
        for i, f in enumerate(files):
            dest = root / name / Path(f).name
            shutil.copy(f, dest)
            if name == "studyC":
                ds = pydicom.dcmread(dest)
                first = pydicom.dcmread(files[0])
                orient = np.array([float(v) for v in first.ImageOrientationPatient])
                normal = np.cross(orient[:3], orient[3:])
                origin = np.array([float(v) for v in first.ImagePositionPatient])
                ds.ImageOrientationPatient = [f"{v:.6f}" for v in orient]
                ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + 3.0 * i * normal]
                ds.InstanceNumber = i + 1
                ds.save_as(dest)
    if manifest is not None:
        (root / "manifest.csv").write_text(manifest)
    return root


def hash_tree(path: Path) -> str:
    """Hash of every file's relative name, content and modification time under ``path``."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        if f.is_file():
            h.update(f.read_bytes())
            h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()
