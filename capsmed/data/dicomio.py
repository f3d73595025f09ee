"""DICOM files and series, torch-free: finding them, reading their headers, checking their geometry.

The one home of the rules a DICOM series must meet to be one volume, with one set of tolerances:
``capsmed validate`` (:func:`capsmed.data._io.read_dicom_series`) and the SEG writer
(:func:`capsmed.dicom.series.load_series`) both call :func:`slice_geometry_problems`, so a series that
passes validation is one the SEG can be written for. :func:`series_skip_reason` says which series of a
study a model cannot read (localisers, secondary captures, derived objects), for ``--dicomweb
--study`` and for a folder of several series.

Decoding: pydicom decodes compressed pixel data through its plugins; capsmed pins pylibjpeg (with
pylibjpeg-libjpeg, -openjpeg and -rle) and pyjpegls, so every transfer syntax in
:data:`DECODABLE_TRANSFER_SYNTAXES` reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Largest difference between two slices' ImageOrientationPatient direction cosines.
ORIENTATION_TOL = 1e-4
#: Largest difference, in mm, between two slices' PixelSpacing values.
PIXEL_SPACING_TOL_MM = 1e-4
#: Two slices closer than this along the normal (mm) are one position (a duplicate slice); a gap
#: that differs from the series' step by more than this or 1% of the step is uneven.
POSITION_TOL_MM = 1e-2
#: Relative tolerance of a slice gap against the series' step.
SPACING_REL_TOL = 0.01
#: A series with fewer slices than this is a localiser (scout), not a volume a model reads.
MIN_SLICES = 5

#: Modalities whose series are volumes of slices (a few slices of them are a localiser).
CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

#: Transfer syntaxes whose pixel data pydicom decodes with the pinned plugins (uncompressed,
#: deflate, RLE, JPEG baseline / extended / lossless (process 14 and SV1), JPEG-LS, JPEG 2000).
DECODABLE_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless (Process 14, SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}

#: SOP classes of secondary captures (screenshots, not acquisitions).
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"})
#: Pixel data elements dropped once a slice's pixels have been read.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (by the ``DICM`` preamble; no recursion)."""
    from pydicom.misc import is_dicom

    out = []
    for p in sorted(Path(folder).iterdir()):
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


def read_header(path: Path) -> Any:
    """One DICOM file as a header: read whole, its pixel data noted, then dropped.

    The returned dataset's ``has_pixels`` attribute says whether the file held pixel data; the
    data itself is not kept, so a study of several series holds no pixel arrays.

    Args:
        path: The DICOM file.

    Returns:
        The ``pydicom.Dataset`` without its pixel data.

    Raises:
        Whatever pydicom raises for a broken file.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    has_pixels = any(k in ds for k in PIXEL_KEYWORDS)
    drop_pixels(ds)
    ds.has_pixels = has_pixels  # a plain attribute, not a DICOM element
    return ds


def drop_pixels(ds: Any) -> None:
    """Remove the pixel data of a dataset (in place), keeping every header element."""
    for keyword in PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)


def is_multiframe(ds: Any) -> bool:
    """Whether an image holds more than one frame (an enhanced / multi-frame object)."""
    try:
        return int(ds.get("NumberOfFrames", 1) or 1) > 1
    except (TypeError, ValueError):
        return False


def multiframe_problem(where: str, ds: Any) -> str:
    """The one line that rejects an enhanced (multi-frame) image."""
    return (f"{where}: {ds.get('Modality', '?')} image {ds.get('SOPInstanceUID', '?')} is an "
            f"enhanced (multi-frame) object of {int(ds.NumberOfFrames)} frames, which capsmed does "
            "not read; export the series as single-frame (classic) images")


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) else None


def slice_geometry_problems(where: str, slices: Sequence[tuple[str, Any]]
                            ) -> tuple[list[int], list[str]]:
    """Check that single-frame slices stack into one evenly spaced volume; their order.

    The rules, with this module's tolerances: one FrameOfReferenceUID (where given), one size,
    every slice with ImageOrientationPatient and ImagePositionPatient, one orientation, one
    PixelSpacing, positions along the slice normal evenly spaced (an uneven gap is a missing slice,
    a zero gap a duplicate).

    Args:
        where: What the messages name first (the folder or ``series <UID>``).
        slices: ``(name, header)`` per slice, the name (a file name) used in the messages.

    Returns:
        The slice order along the normal (indices into ``slices``) and one line per problem; the
        order is the input order when there are problems.
    """
    order = list(range(len(slices)))
    frames = sorted({str(ds.FrameOfReferenceUID) for _, ds in slices
                     if ds.get("FrameOfReferenceUID")})
    if len(frames) > 1:
        return order, [f"{where}: slices lie in {len(frames)} frames of reference "
                       f"(FrameOfReferenceUID {', '.join(frames)}); one series has one"]
    sizes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in slices}
    if len(sizes) > 1:
        return order, [f"{where}: slices have different sizes {sorted(sizes)}"]
    if len(slices) < 2:
        return order, []
    for name, ds in slices:
        if _floats(ds.get("ImageOrientationPatient"), 6) is None or \
                _floats(ds.get("ImagePositionPatient"), 3) is None:
            return order, [f"{where}: slice {name} lacks ImagePositionPatient or "
                           "ImageOrientationPatient, so the series geometry cannot be assembled"]
    orient = np.array([_floats(ds.ImageOrientationPatient, 6) for _, ds in slices])
    if np.abs(orient - orient[0]).max() > ORIENTATION_TOL:
        return order, [f"{where}: slices have different orientations (ImageOrientationPatient), "
                       "so they are not one volume"]
    spacings = [_floats(ds.get("PixelSpacing"), 2) for _, ds in slices]
    if any(s is not None for s in spacings):
        if any(s is None for s in spacings) or \
                np.abs(np.array(spacings) - spacings[0]).max() > PIXEL_SPACING_TOL_MM:
            return order, [f"{where}: slices have different PixelSpacing values"]
    normal = np.cross(orient[0, :3], orient[0, 3:])
    dist = np.array([float(np.dot(normal, _floats(ds.ImagePositionPatient, 3)))
                     for _, ds in slices])
    ranked = [int(i) for i in np.argsort(dist, kind="stable")]
    gaps = np.diff(dist[ranked])
    names = [slices[i][0] for i in ranked]
    if gaps.min() < POSITION_TOL_MM:
        k = int(np.argmin(gaps))
        return order, [f"{where}: slices {names[k]} and {names[k + 1]} lie at the same position "
                       "(duplicate slice)"]
    step = float(np.median(gaps))
    dev = np.abs(gaps - step)
    if dev.max() > max(POSITION_TOL_MM, SPACING_REL_TOL * step):
        k = int(np.argmax(dev))
        missing = round(gaps[k] / step) - 1
        what = f"about {missing} slice(s) missing" if missing >= 1 else "uneven slice spacing"
        return order, [f"{where}: {what} between {names[k]} and {names[k + 1]} (gap "
                       f"{gaps[k]:.3g} mm, the other slices {step:.3g} mm apart)"]
    return ranked, []


def _image_type(ds: Any) -> list[str]:
    value = ds.get("ImageType") or []
    if isinstance(value, str):
        value = value.split("\\")
    return [str(v).upper() for v in value]


def series_skip_reason(headers: Sequence[Any]) -> str | None:
    """Why a model cannot read this series, or None when it is an image volume.

    A series is skipped when it is a localiser / scout (ImageType LOCALIZER, slices of mixed
    orientations, or a CT / MR / PET / NM series of fewer than :data:`MIN_SLICES` slices), a
    secondary capture, or a derived object (ImageType DERIVED: reformats, projections, maps); an
    enhanced (multi-frame) object is
    not skipped here: reading it fails with its own line.

    Args:
        headers: The series' instance headers (pydicom datasets, pixel data not needed).

    Returns:
        A short reason (``"a localizer (ImageType LOCALIZER)"``...) or None.
    """
    if not headers:
        return "no instances"
    types = [_image_type(ds) for ds in headers]
    if any("LOCALIZER" in t for t in types):
        return "a localizer (ImageType LOCALIZER)"
    if any(str(ds.get("SOPClassUID", "")) in SECONDARY_CAPTURE_CLASSES for ds in headers):
        return "a secondary capture"
    if any(t[:1] == ["DERIVED"] for t in types):
        return "a derived series (ImageType DERIVED)"
    if any(is_multiframe(ds) for ds in headers):
        return None
    orient = [_floats(ds.get("ImageOrientationPatient"), 6) for ds in headers]
    known = [o for o in orient if o is not None]
    if len(known) > 1 and np.abs(np.array(known) - known[0]).max() > ORIENTATION_TOL:
        return "a localizer (slices of mixed orientations)"
    if len(headers) < MIN_SLICES and str(headers[0].get("Modality", "")).upper() in \
            CROSS_SECTIONAL_MODALITIES:
        return f"a localizer ({len(headers)} slice(s), fewer than {MIN_SLICES})"
    return None
