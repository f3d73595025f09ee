"""One DICOM source series: read and check it, map a prediction onto its slices, derive UIDs.

A SEG must overlay the source slices exactly, so the series must be a proper volume: one series,
single-frame image slices of one size, one orientation, one frame of reference, evenly spaced along
the slice normal (no missing slice); the rules and tolerances are :mod:`capsmed.data.dicomio`'s, the
same ``capsmed validate`` applies. Enhanced (multi-frame) CT / MR objects are rejected with one line.
:func:`load_series` checks that before anything is predicted, naming the series and the problem.
:func:`frames_from_prediction` then samples the label map that ``capsmed predict`` wrote (in the
geometry MONAI read from the series, RAS affine) at the centre of every pixel of every source slice,
so frame ``i`` of the result lies exactly on source slice ``i`` for any orientation and spacing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capsmed.data.dicomio import (
    dicom_files,
    is_multiframe,
    multiframe_problem,
    read_header,
    slice_geometry_problems,
)
from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

#: UID root used for every UID capsmed derives (pydicom's registered root for generated UIDs).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
#: LPS (DICOM patient coordinates) <-> RAS (NIfTI, MONAI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class SourceSeries:
    """A checked source series, slices in order along the slice normal.

    Attributes:
        folder: Folder the slices were read from.
        datasets: One pydicom dataset per slice (headers: no pixel data), sorted by position
            along the normal.
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        modality: Modality tag.
    """

    folder: Path
    datasets: list
    series_uid: str
    study_uid: str
    modality: str

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUID of every slice, in slice order."""
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def load_series(folder: Path) -> SourceSeries:
    """Read a DICOM series folder and check that it forms one evenly spaced volume.

    Each file is read whole once (so that a broken one is found here), then kept as its header
    only: its pixel data is dropped (:func:`capsmed.data.dicomio.read_header`), so the series (and a
    study of several) holds no pixel arrays. The geometry rules and their tolerances are those of
    ``capsmed validate`` (:func:`capsmed.data.dicomio.slice_geometry_problems`).

    Args:
        folder: Folder directly holding the series' files.

    Returns:
        The :class:`SourceSeries`.

    Raises:
        CapsmedError: No DICOM files, more than one series, a non-image or enhanced (multi-frame)
            object, slices without geometry, of different sizes, orientations, pixel spacings or
            frames of reference, a duplicate or missing slice; one line naming the series (its UID
            when known) and the problem.
    """
    folder = Path(folder)
    files = dicom_files(folder) if folder.is_dir() else []
    if not files:
        raise CapsmedError(f"{folder}: holds no DICOM files")
    datasets = []
    for f in files:
        try:
            datasets.append(read_header(f))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
            raise CapsmedError(f"{f}: not a readable DICOM file ({type(exc).__name__})") from None
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    where = f"series {uids[0]}" if len(uids) == 1 and uids[0] else str(folder)
    if len(uids) > 1:
        raise CapsmedError(f"{folder}: holds {len(uids)} series ({', '.join(uids)}); "
                           "put one series per folder")
    for ds in datasets:
        if not ds.has_pixels:
            raise CapsmedError(f"{where}: {ds.get('Modality', '?')} object "
                               f"{ds.get('SOPInstanceUID', '?')} is not an image (no pixel data)")
        if is_multiframe(ds):
            raise CapsmedError(multiframe_problem(where, ds))
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise CapsmedError(f"{where}: slice {ds.SOPInstanceUID} lacks {tag}, so its "
                                   "geometry is unknown")
    named = [(f.name, ds) for f, ds in zip(files, datasets, strict=True)]
    order, problems = slice_geometry_problems(where, named)
    if problems:
        raise CapsmedError(problems[0])
    datasets = [datasets[i] for i in order]
    return SourceSeries(folder=folder, datasets=datasets, series_uid=uids[0],
                        study_uid=str(datasets[0].get("StudyInstanceUID", "")),
                        modality=str(datasets[0].get("Modality", "")))


def pixel_centres_ras(ds) -> np.ndarray:
    """World (RAS, mm) position of the centre of every pixel of one slice.

    Args:
        ds: A single-frame image dataset with ``ImagePositionPatient``, ``ImageOrientationPatient``
            and ``PixelSpacing``.

    Returns:
        ``(Rows, Columns, 3)`` positions.
    """
    iop = np.asarray(ds.ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]  # direction of increasing column / row index
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    origin = np.asarray(ds.ImagePositionPatient, float)
    j, k = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    lps = origin + k[..., None] * dc * row_dir + j[..., None] * dr * col_dir
    return lps @ LPS_TO_RAS.T


def frames_from_prediction(pred: np.ndarray, affine: np.ndarray, series: SourceSeries) -> np.ndarray:
    """The label map on the source slices: frame ``i`` is source slice ``i``, pixel for pixel.

    Args:
        pred: ``(X, Y, Z)`` label map as ``capsmed predict`` wrote it.
        affine: Its 4x4 voxel-to-world matrix (RAS, mm).
        series: The source series the prediction was made from.

    Returns:
        ``(slices, Rows, Columns)`` array of the same dtype.

    Raises:
        CapsmedError: The prediction grid does not pass through the source pixel centres (it was
            not made in this series' geometry).
    """
    pred = np.asarray(pred)
    if pred.ndim != 3:
        raise CapsmedError(f"series {series.series_uid}: a 3D prediction is needed for a SEG, "
                           f"got shape {pred.shape}")
    inv = np.linalg.inv(np.asarray(affine, float))
    frames = np.zeros((len(series.datasets), int(series.datasets[0].Rows),
                       int(series.datasets[0].Columns)), dtype=pred.dtype)
    for i, ds in enumerate(series.datasets):
        world = pixel_centres_ras(ds)
        idx = world @ inv[:3, :3].T + inv[:3, 3]
        near = np.rint(idx)
        off = float(np.abs(idx - near).max())
        inside = np.all((near >= 0) & (near < np.array(pred.shape)), axis=-1)
        if off > 0.05 or not inside.all():
            raise CapsmedError(f"series {series.series_uid}: the prediction grid does not match "
                               f"slice {ds.SOPInstanceUID} (off by {off:.3g} voxel); it was not "
                               "made in this series' geometry")
        n = near.astype(np.int64)
        frames[i] = pred[n[..., 0], n[..., 1], n[..., 2]]
    return frames


def derived_uid(role: str, *parts: str) -> str:
    """A UID that depends only on ``role`` and ``parts`` (reruns give the same UID).

    Args:
        role: What the UID names, e.g. ``"seg-series"``, ``"seg"``, ``"sr"``.
        parts: What the object is made from: source SOP Instance UIDs, checkpoint hash, options.

    Returns:
        A UID under :data:`UID_PREFIX` (pydicom ``generate_uid`` with these entropy sources).
    """
    from pydicom.uid import generate_uid

    digest = hashlib.sha256("\n".join((role, *parts)).encode()).hexdigest()
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[digest]))
