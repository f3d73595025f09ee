"""Readers for the evaluation files that reports are built from (no torch, tolerant of gaps).

The layout is :class:`capsmed.paths.Layout`'s (pages use its per-dataset view,
:class:`capsmed.paths.DatasetLayout`): everything lives under a results folder, per
dataset ``{ds}``, model ``{model}`` (and fold, where folds are used) and stage ``{stage}``.
Optional files that are missing give empty values; a required file that is missing or unreadable
raises :class:`capsmed.errors.CapsmedError` naming it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import voxel_sizes

from capsmed import fileio
from capsmed.data.labels import name_map as name_map  # one home of label names, re-exported
from capsmed.errors import CapsmedError
from capsmed.paths import STAGES as STAGES  # re-exported for the pages

logger = logging.getLogger(__name__)

# Columns of cases.csv that hold numbers (prefix match); everything else stays text.
_NUMERIC_PREFIXES = ("dice", "hd95", "assd", "volume_", "confidence", "prob_", "length_", "class",
                     "predicted", "entropy", "uncertainty_mean")


# ----------------------------------------------------------------------------- JSON and CSV


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    """Read a JSON object (:func:`capsmed.fileio.read_json`); ``{}`` when an optional file is absent.

    Args:
        path: The file.
        required: Raise when the file is missing instead of returning ``{}``.

    Returns:
        The parsed object.

    Raises:
        CapsmedError: The file is required and missing, is not valid JSON, or is not an object.
    """
    doc = fileio.read_json(path, "file", required=required, default={})
    if not isinstance(doc, dict):
        raise CapsmedError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def read_table(path: Path, required: bool = False) -> pd.DataFrame:
    """Read a CSV file keeping ids as text; numeric columns of cases/history files become floats.

    ``case_id`` values such as ``001`` or ``NA`` stay strings; empty cells become ``""`` in text
    columns and NaN in numeric ones.

    Args:
        path: The CSV file.
        required: Raise when the file is missing instead of returning an empty frame.

    Returns:
        The table (empty when an optional file is absent).

    Raises:
        CapsmedError: The file is required and missing, or cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        if required:
            raise CapsmedError(f"{path}: file not found (run `capsmed evaluate` first)")
        return pd.DataFrame()
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CapsmedError(f"{path}: not readable as CSV ({exc})") from exc
    for col in df.columns:
        if col == "case_id":
            continue
        if col.startswith(_NUMERIC_PREFIXES) or path.name == "history.csv":
            converted = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
            # keep a text column (e.g. 'class' holding names) when nothing parses as a number
            if converted.notna().any() or (df[col] == "").all():
                df[col] = converted.astype(float)
    return df


def file_date(path: Path) -> str:
    """The modification time of a file as ``YYYY-MM-DD HH:MM`` (empty when absent)."""
    try:
        stamp = Path(path).stat().st_mtime
    except OSError:
        return ""
    return _dt.datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


def task_of(*docs: Mapping[str, Any], columns: Collection[str] = (),
            default: str = "segmentation") -> str:
    """The dataset's task: the rule of every page.

    Args:
        *docs: documents that may hold ``task`` (``metrics.json``, ``cases.json``, the
            fingerprint, the plan), most specific first; the first that names one wins.
        columns: columns of ``cases.csv``; ``prob_*`` columns mean classification when no
            document names the task.
        default: the task when nothing names it (``""`` where a page says "unknown").

    Returns:
        ``"segmentation"``, ``"classification"`` or ``default``.
    """
    for doc in docs:
        if doc.get("task"):
            return str(doc["task"])
    if any(str(c).startswith("prob_") for c in columns):
        return "classification"
    return default


def label_names(task: str, *docs: Mapping[str, Any], count: int = 0) -> dict[int, str]:
    """Label (segmentation) or class (classification) names: the one rule of every page.

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        *docs: documents that may hold ``labels`` / ``classes`` (``metrics.json``,
            ``cases.json``, the fingerprint), most specific first; the first with names wins.
        count: number of labels or classes, for the fallback names.

    Returns:
        ``{index: name}``; without names in any document ``{0: "background", 1: "foreground"}``
        (segmentation, two labels), ``background, label 1, ...`` (more labels) or ``class 0,
        class 1, ...`` (classification).
    """
    key = "labels" if task == "segmentation" else "classes"
    for doc in docs:
        names = name_map(doc, key)
        if names:
            return names
    if task == "segmentation":
        n = max(count, 2)
        return {0: "background", **{k: "foreground" if n == 2 else f"label {k}"
                                    for k in range(1, n)}}
    return {k: f"class {k}" for k in range(count)}


def class_column(columns: Collection[str], prefix: str, index: int, name: str) -> str | None:
    """The column ``{prefix}_{name}`` or ``{prefix}_{index}`` among ``columns``, whichever exists."""
    for candidate in (f"{prefix}_{name}", f"{prefix}_{index}", f"{prefix}_{name.lower()}"):
        if candidate in columns:
            return candidate
    return None


def finite(values: Any) -> np.ndarray:
    """The finite entries of ``values`` as a 1-D float array."""
    arr = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    return arr[np.isfinite(arr)]


def to_float(value: Any) -> float | None:
    """``value`` as a float, or None when missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


# ----------------------------------------------------------------------------- paths


def resolve_path(value: Any, *bases: Path) -> Path | None:
    """Find a file named in an evaluation table.

    Absolute paths are used when they exist; relative ones are tried against each folder in ``bases``
    in turn; finally the bare file name is looked up in each base (results folders that were moved).

    Args:
        value: The path text (empty, NaN or None mean "no file").
        *bases: Folders to try relative paths against.

    Returns:
        An existing path, or None.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() == "nan":
        return None
    path = Path(text)
    if path.is_absolute() and path.exists():
        return path
    for base in bases:
        if base is None:
            continue
        candidate = Path(base) / text
        if not path.is_absolute() and candidate.exists():
            return candidate
    for base in bases:
        if base is None:
            continue
        candidate = Path(base) / path.name
        if candidate.exists():
            return candidate
    return None


# ----------------------------------------------------------------------------- images


@dataclass
class Volume:
    """An image reoriented to RAS for display, with its original geometry.

    Attributes:
        data: Array ``(X, Y, Z)`` in closest-canonical (RAS) orientation; 2-D images get ``Z = 1``.
            Multichannel images keep their first channel.
        spacing: Voxel size in mm along the three display axes.
        shape: The shape stored in the file (before reorientation, all channels).
        zooms: Voxel sizes in mm along the stored axes, from the affine (as every stage reads
            them; a header's pixdim may disagree).
        axcodes: Orientation of the stored image, e.g. ``("R", "A", "S")``.
        channels: Number of channels in the file (1 for single-channel images).
        path: The file.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    axcodes: tuple[str, ...]
    channels: int
    path: Path

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing)) / 1000.0


def load_volume(path: Path | None) -> Volume | None:
    """Load a NIfTI (or other nibabel-readable) image for display; None when not readable.

    Args:
        path: The image file. Folders (DICOM series) and unreadable files give None with a log
            message; reports then say the image is not shown.

    Returns:
        The volume, reoriented to RAS, or None.
    """
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        logger.info("%s: not a file; image not shown", path)
        return None
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(float(z) for z in voxel_sizes(img.affine))
        if len(shape) >= 4:
            data = np.asarray(img.dataobj[..., 0], dtype=np.float32)
            channels = int(np.prod(shape[3:]))
        else:
            data = np.asarray(img.dataobj, dtype=np.float32)
            channels = 1
        while data.ndim < 3:
            data = data[..., None]
        affine = img.affine
        three_d = nib.Nifti1Image(data, affine)
        axcodes = tuple(nib.aff2axcodes(affine))
        canonical = nib.as_closest_canonical(three_d)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
        spacing = tuple(float(z) for z in voxel_sizes(canonical.affine)[:3])
    except Exception as exc:  # nibabel raises many types for broken files
        logger.warning("%s: cannot read image (%s); image not shown", path, exc)
        return None
    spacing = tuple(s if s > 0 and math.isfinite(s) else 1.0 for s in spacing)
    while len(spacing) < 3:
        spacing = (*spacing, 1.0)
    return Volume(data=data, spacing=spacing, shape=shape, zooms=zooms, axcodes=axcodes,
                  channels=channels, path=path)


def load_array(path: Path | None) -> np.ndarray | None:
    """Load a ``.npy`` array (a capsule reconstruction); None when absent or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        logger.warning("%s: cannot read array (%s)", path, exc)
        return None
    return np.asarray(arr, dtype=np.float32)
