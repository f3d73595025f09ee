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

# DICOM files and the series geometry rules live in capsmed.data.dicomio (shared with capsmed.dicom).
from capsmed.data.dicomio import dicom_files as dicom_files
from capsmed.data.dicomio import (
    drop_pixels,
    is_multiframe,
    multiframe_problem,
    slice_geometry_problems,
)
from capsmed.data.dicomio import find_dicom_series as find_dicom_series

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
    geometry: list[tuple[str, Any]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            if "PixelData" not in ds:
                problems.append(f"{f}: has no pixel data (not an image slice)")
                continue
            if is_multiframe(ds):
                problems.append(multiframe_problem(str(f), ds))
                continue
            shape = tuple(ds.pixel_array.shape)  # decodes: finds truncated or undecodable data
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
            problems.append(f"{f}: unreadable or truncated DICOM ({type(exc).__name__}: {exc})")
            continue
        drop_pixels(ds)  # the header is what the checks need
        series.add(str(ds.get("SeriesInstanceUID", "")))
        shapes.add(shape)
        modality = modality or ds.get("Modality")
        patient = patient or (str(ds.get("PatientID")) if ds.get("PatientID") else None)
        geometry.append((f.name, ds))
    if len(series) > 1:
        problems.append(f"{folder}: holds {len(series)} DICOM series; put one series per folder")
    if len(shapes) > 1:
        problems.append(f"{folder}: slices have different sizes {sorted(shapes)}")
    if not problems and len(geometry) > 1:
        problems += slice_geometry_problems(str(folder), geometry)[1]
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
