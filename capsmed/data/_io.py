"""Small file helpers shared by the data modules: paths, NIfTI and DICOM reading, JSON, hashing.

Nothing here imports torch or MONAI at module import time, so ``capsmed validate`` stays quick for
NIfTI and MedMNIST data; DICOM series are read through MONAI's ``PydicomReader`` (imported lazily)
so that validation sees exactly the geometry that ``LoadImaged`` will produce.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The writers and the hash live in capsmed.fileio; the data modules import them from here too.
from capsmed.fileio import json_dumps as json_dumps
from capsmed.fileio import save_nifti as save_nifti
from capsmed.fileio import stable_hash as stable_hash
from capsmed.fileio import write_text_if_changed as write_text_if_changed

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")

MRI_NAMES = {"mri", "mr", "t1", "t1w", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd", "pdw",
             "t1c", "t2f", "swi", "mri-t1", "mri-t2"}


def resolve(path: str | os.PathLike, base: Path | None = None) -> Path:
    """Resolve ``path`` against ``base`` (default: the working directory) to an absolute path.

    Args:
        path: a path, absolute or relative; ``~`` is expanded.
        base: the folder relative paths start from.

    Returns:
        The absolute, normalised path (symbolic links resolved).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = (base if base is not None else Path.cwd()) / p
    return p.resolve()


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved) lies inside the folder ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def is_nifti(path: Path) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz``."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    low = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def modality_name(value: Any) -> str:
    """Map a modality (dataset.json, DICOM tag, config) to ``"MRI"``, ``"CT"``, ``"US"`` or ``"other"``.

    Args:
        value: a string such as ``"MRI"``, ``"MR"``, ``"T2w"``, ``"CT"``; a dict of channel index to
            name (MSD ``modality``) is reduced to one name when all channels agree.

    Returns:
        ``"MRI"``, ``"CT"``, ``"US"`` (ultrasound) or ``"other"``.
    """
    if isinstance(value, dict):
        names = {modality_name(v) for v in value.values()}
        return names.pop() if len(names) == 1 else "other"
    text = str(value or "").strip().lower()
    if text in ("ct", "cta", "pet-ct", "ct scan"):
        return "CT"
    if text in MRI_NAMES or text.startswith("mri") or text.startswith("mr "):
        return "MRI"
    if text in ("us", "ultrasound", "ultrasonography", "sonography"):
        return "US"
    return "other"


@dataclass
class ImageInfo:
    """What a reader found in one image: header facts and, when loaded, the voxels.

    Attributes:
        shape: the full array shape (spatial axes first, channels last for NIfTI, as stored).
        affine: 4x4 voxel-to-world matrix (RAS, as nibabel and MONAI report it).
        dtype: the stored data type.
        data: the voxel array when loaded, else None.
        modality: DICOM ``Modality`` tag (DICOM series only).
        patient_id: DICOM ``PatientID`` tag (DICOM series only).
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype
    data: np.ndarray | None = None
    modality: str | None = None
    patient_id: str | None = None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each of the first three array axes (from the affine)."""
        from nibabel.affines import voxel_sizes

        return voxel_sizes(self.affine)


def read_nifti(path: Path, load: bool) -> ImageInfo:
    """Read a NIfTI header and, when ``load``, all its voxels.

    Args:
        path: the ``.nii``/``.nii.gz`` file.
        load: read the voxel data too (detects truncated files; needed for NaN/label checks).

    Returns:
        The :class:`ImageInfo`.

    Raises:
        OSError, ValueError, EOFError, zlib.error, nibabel errors: the file is unreadable.
    """
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) if load else None
    return ImageInfo(shape=tuple(int(s) for s in img.shape), affine=np.asarray(img.affine, float),
                  dtype=img.get_data_dtype(), data=data)


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (by the ``DICM`` preamble; no recursion)."""
    from pydicom.misc import is_dicom

    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != "DICOMDIR":
            try:
                if is_dicom(p):
                    out.append(p)
            except OSError:
                continue
    return out


def find_dicom_series(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that directly hold DICOM files, sorted.

    Args:
        root: the dataset folder.

    Returns:
        Absolute folder paths, one per DICOM series folder.
    """
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if dicom_files(d):
            found.append(d.resolve())
    return sorted(found)


def _slice_geometry_problems(folder: Path, slices: list[tuple[Path, Any, Any]]) -> list[str]:
    """Problems with how the slices of a series stack into one volume.

    Every slice must share one ``ImageOrientationPatient``, and the positions along the slice
    normal must be evenly spaced (1% tolerance): an uneven gap is a missing slice, a zero gap a
    duplicate.

    Args:
        folder: the series folder (named in the messages).
        slices: ``(file, ImageOrientationPatient, ImagePositionPatient)`` per slice.

    Returns:
        One line per problem, naming the folder and the files; empty when the stack is regular.
    """
    if any(o is None or len(o) != 6 for _, o, _ in slices):
        bad = next(f for f, o, _ in slices if o is None or len(o) != 6)
        return [f"{bad}: slice lacks ImageOrientationPatient, so the series geometry cannot be "
                "assembled"]
    orient = np.array([[float(v) for v in o] for _, o, _ in slices])
    if not np.allclose(orient, orient[0], atol=1e-4):
        return [f"{folder}: slices have different orientations (ImageOrientationPatient), so "
                "they are not one volume"]
    normal = np.cross(orient[0, :3], orient[0, 3:])
    dist = np.array([float(np.dot(normal, [float(v) for v in p])) for _, _, p in slices])
    order = np.argsort(dist)
    gaps = np.diff(dist[order])
    names = [slices[i][0].name for i in order]
    step = float(np.median(gaps))
    if step <= 1e-6 or np.any(gaps <= 1e-3 * max(step, 1e-3)):
        k = int(np.argmin(gaps))
        return [f"{folder}: slices {names[k]} and {names[k + 1]} lie at the same position "
                "(duplicate slice)"]
    uneven = np.abs(gaps - step) > 0.01 * step + 1e-3
    if np.any(uneven):
        k = int(np.argmax(np.abs(gaps - step)))
        missing = round(gaps[k] / step) - 1
        what = (f"about {missing} slice(s) missing" if missing >= 1
                else "uneven slice spacing")
        return [f"{folder}: {what} between {names[k]} and {names[k + 1]} (gap {gaps[k]:.3g} mm, "
                f"the other slices {step:.3g} mm apart)"]
    return []


def read_dicom_series(folder: Path, load: bool) -> tuple[ImageInfo | None, list[str]]:
    """Check a DICOM series folder file by file, then read it as MONAI's ``PydicomReader`` does.

    Args:
        folder: a folder directly holding the slices of one series.
        load: decode the voxel data (always needed to find truncated pixel data).

    Returns:
        The :class:`ImageInfo` (affine in RAS, array axes as ``LoadImaged`` yields them) or None in its
        place when the series cannot be assembled, and a list of problems (each naming a file).
    """
    import pydicom

    problems: list[str] = []
    files = dicom_files(folder)
    if not files:
        return None, [f"{folder}: holds no DICOM files"]
    series, shapes, modality, patient = set(), set(), None, None
    geometry: list[tuple[Path, Any, Any]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            if "PixelData" not in ds:
                problems.append(f"{f}: has no pixel data (not an image slice)")
                continue
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
            problems.append(f"{f}: unreadable or truncated DICOM ({type(exc).__name__}: {exc})")
            continue
        series.add(str(ds.get("SeriesInstanceUID", "")))
        shapes.add(tuple(arr.shape))
        modality = modality or ds.get("Modality")
        patient = patient or (str(ds.get("PatientID")) if ds.get("PatientID") else None)
        if len(files) > 1 and ("ImagePositionPatient" not in ds or "InstanceNumber" not in ds):
            problems.append(f"{f}: slice lacks ImagePositionPatient or InstanceNumber, so the "
                            "series geometry cannot be assembled")
        else:
            geometry.append((f, ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")))
    if len(series) > 1:
        problems.append(f"{folder}: holds {len(series)} DICOM series; put one series per folder")
    if len(shapes) > 1:
        problems.append(f"{folder}: slices have different sizes {sorted(shapes)}")
    if not problems and len(geometry) > 1:
        problems += _slice_geometry_problems(folder, geometry)
    if problems:
        return None, problems
    import warnings

    from monai.data import PydicomReader

    reader = PydicomReader()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr, meta = reader.get_data(reader.read(str(folder)))
    except Exception as exc:  # noqa: BLE001
        return None, [f"{folder}: the DICOM series cannot be read ({type(exc).__name__}: {exc})"]
    for w in caught:  # what the reader says about this series, said with its name
        logger.warning("%s: %s", folder, w.message)
    arr = np.asarray(arr)
    vol = ImageInfo(shape=tuple(int(s) for s in arr.shape), affine=np.asarray(meta["affine"], float),
                 dtype=arr.dtype, data=arr if load else None, modality=modality, patient_id=patient)
    return vol, []


def read_volume(path: Path, load: bool) -> tuple[ImageInfo | None, list[str]]:
    """Read a NIfTI file or a DICOM series folder; never raises for bad files.

    Args:
        path: NIfTI file or DICOM series folder.
        load: read the voxels too.

    Returns:
        (volume or None, problems naming the file).
    """
    if path.is_dir():
        return read_dicom_series(path, load)
    if not path.exists():
        return None, [f"{path}: file is missing"]
    if not is_nifti(path):
        return None, [f"{path}: not a NIfTI file (.nii/.nii.gz) or a DICOM series folder"]
    try:
        vol = read_nifti(path, load=False)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        return None, [f"{path}: unreadable NIfTI header ({type(exc).__name__}: {exc})"]
    if load:
        try:
            vol = read_nifti(path, load=True)
        except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, OSError, ValueError
            return None, [f"{path}: truncated or corrupt image data ({type(exc).__name__}: {exc})"]
    return vol, []
