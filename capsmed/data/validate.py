"""Dataset validation: find every problem in a dataset or a dataset config, change nothing.

Each problem is one human-readable line that names the file (or the config key) and the problem, for
example ``/data/msd/labelsTr/case_3.nii.gz: label values [7] not declared in labels (0, 1, 2)``.

Supported inputs (see :func:`validate_path`):

- a Medical Segmentation Decathlon folder, or its ``dataset.json``;
- a MedMNIST ``.npz`` archive (``{train,val,test}_{images,labels}``);
- a CSV manifest (``case_id``, ``image``, ``label`` and/or ``class``, optional ``patient_id``; paths
  relative to the CSV's folder; an image may be a NIfTI file or a DICOM series folder);
- a folder of DICOM series (one folder per series) with a ``manifest.csv`` beside them.

The scanners here also return the parsed cases, so :func:`capsmed.data.sources.prepare_dataset`
reads each source exactly once. Files are opened read-only; nothing on disk is created or modified.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.config import (
    FILE_SOURCES,
    dataset_defaults,
    dataset_rule_problems,
    dataset_schema_problems,
)
from capsmed.data._io import (
    ImageInfo,
    dicom_files,
    find_dicom_series,
    is_within,
    modality_name,
    read_volume,
    resolve,
    strip_nifti_suffix,
)
from capsmed.data.labels import code_problems, label_name

logger = logging.getLogger(__name__)

NPZ_SPLITS = ("train", "val", "test")
DICOM_MANIFEST = "manifest.csv"
_INT_RE = re.compile(r"^\s*[+-]?\d+(\.0*)?\s*$")


@dataclass
class Scan:
    """What a scanner found in a dataset source.

    Attributes:
        kind: ``"synthetic"``, ``"msd"``, ``"medmnist"``, ``"csv"`` or ``"dicom"``.
        path: the resolved dataset path (folder or file) as given.
        task: ``"segmentation"``, ``"classification"`` or None when it cannot be told.
        spatial_dims: 2, 3 or None when no image could be read.
        labels: segmentation label names keyed by the value as a string, or None.
        classes: class names keyed by the index as a string, or None.
        modality: ``"MRI"``, ``"CT"`` or ``"other"``.
        in_channels: image channels (modalities).
        cases: case dicts (see PLAN.md "Data API"); MedMNIST cases hold ``"index"`` (row in the
            array of their ``"split"``) instead of ``"image"`` until materialised.
        problems: one line per problem.
        arrays: MedMNIST only: ``{split: (images, labels)}`` as loaded from the archive.
    """

    kind: str
    path: Path
    task: str | None = None
    spatial_dims: int | None = None
    labels: dict[str, str] | None = None
    classes: dict[str, str] | None = None
    modality: str = "other"
    in_channels: int = 1
    cases: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


# --------------------------------------------------------------------------------------------------
# helpers


def _int_keyed_mapping(value: Any, where: str, what: str,
                       problems: list[str]) -> dict[str, str] | None:
    """Normalise ``{0: "background", "1": "liver"}`` to ``{"0": "background", "1": "liver"}``.

    A ``labels`` entry may be ``{name, snomed}`` (:mod:`capsmed.data.labels`): its name is kept, its
    codes are checked.

    Problems (non-mapping, non-integer keys, negative keys) are appended naming ``where``.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.append(f"{where}: '{what}' must be a mapping of integer to name, got "
                        f"{type(value).__name__}")
        return None
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(k, bool) or not _INT_RE.match(str(k)) or int(float(str(k))) < 0:
            problems.append(f"{where}: '{what}' key {k!r} is not a non-negative integer")
            continue
        if what == "labels" and isinstance(v, Mapping):  # {name, snomed} (capsmed.data.labels)
            problems += code_problems(v, f"{where}: '{what}' {k!r}")
        out[str(int(float(str(k))))] = label_name(v) if what == "labels" else str(v)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _as_int(text: Any) -> int | None:
    """Parse an integer written as ``3``, ``"3"``, ``"3.0"``; None when it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, np.integer)):
        return int(text)
    if isinstance(text, (float, np.floating)):
        return int(text) if math.isfinite(text) and float(text).is_integer() else None
    if isinstance(text, str) and _INT_RE.match(text):
        return int(float(text))
    return None


@dataclass
class _Geometry:
    """Running expectations across the cases of one dataset (first readable case sets them).

    Attributes:
        spatial_dims: expected spatial dimensionality (None: from the first image).
        channels: expected channels (None: from the first image).
        declared_labels: label values a label map may hold (None: any).
        found_labels: label values seen so far.
        modalities: DICOM modalities seen so far.
        first_shape: (image, array shape) of the first image whose shape does not fit
            ``spatial_dims`` when most do not (the dimensionality is then taken from the data).
        dims_from: where the expected dimensionality came from (for messages).
        expected_dims: the expected dimensionality as given.
    """

    spatial_dims: int | None
    channels: int | None
    declared_labels: set[int] | None
    found_labels: set[int] = field(default_factory=set)
    modalities: set[str] = field(default_factory=set)
    first_shape: tuple[Path, tuple[int, ...]] | None = None
    dims_from: str = "the dataset config's spatial_dims"
    expected_dims: int | None = field(init=False, default=None)

    def dims_problem(self) -> str | None:
        """One line for a dataset whose images do not have the expected dimensionality."""
        if self.first_shape is None:
            return None
        image, shape = self.first_shape
        return (f"{image}: wrong dimensionality: images are {self.spatial_dims}D (array shape "
                f"{list(shape)}) but {self.dims_from} says {self.expected_dims}D")

    def __post_init__(self) -> None:
        self.expected_dims = self.spatial_dims

    def decide(self, images: list[Path]) -> None:
        """Fix dimensionality and channels from what most images hold (headers only).

        When most images do not fit the expected dimensionality, it is taken from the data and
        the conflict is reported once (:meth:`dims_problem`) rather than once per case; images
        that differ from the majority are then reported one by one.
        """
        shapes = [(img, s) for img in images if (s := _header_shape(img)) is not None]
        if not shapes:
            return
        dims = self.spatial_dims
        if dims is not None:
            misfits = [(img, s) for img, s in shapes if not self._fits(s, dims)]
            if 2 * len(misfits) > len(shapes):
                self.first_shape = misfits[0]
                dims = None
        if dims is None:
            ndim = Counter(len(s) for _, s in shapes).most_common(1)[0][0]
            extra = 1 if self.channels is not None and self.channels > 1 else 0
            dims = min(3, ndim - extra) if ndim > 1 else ndim
        self.spatial_dims = dims
        if self.channels is None:
            # MONAI loads channels only from a 4th NIfTI axis, so 2D images have one channel
            chans = [1 if len(s) == dims else s[-1] for _, s in shapes
                     if len(s) == dims or (dims == 3 and len(s) == 4)]
            self.channels = Counter(chans).most_common(1)[0][0] if chans else 1


    def _fits(self, shape: tuple[int, ...], dims: int) -> bool:
        if self.channels is None:
            return dims <= len(shape) <= dims + 1
        return (len(shape) == dims and self.channels == 1) or (
            dims == 3 and len(shape) == 4 and shape[-1] == self.channels > 1)


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """Array shape from the NIfTI header, or (rows, cols, slices) guessed for a DICOM folder."""
    try:
        if path.is_dir():
            n = len(dicom_files(path))
            return (0, 0, n) if n > 1 else (0, 0)
        import nibabel as nib

        return tuple(int(v) for v in nib.load(str(path)).shape)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the full check
        return None


def _split_channels(image: Path, vol: ImageInfo, geo: _Geometry,
                    problems: list[str]) -> tuple[tuple[int, ...], int] | None:
    """Split an array shape into (spatial shape, channels) as decided by :meth:`_Geometry.decide`.

    Shapes that do not fit are reported (naming the file) and give None.
    """
    shape = tuple(vol.shape)
    ndim = len(shape)
    if geo.spatial_dims is None or geo.channels is None:  # decide() found no readable header
        geo.decide([image])
        if geo.spatial_dims is None or geo.channels is None:
            geo.spatial_dims = geo.spatial_dims or min(ndim, 3)
            geo.channels = geo.channels or 1
    dims, channels = geo.spatial_dims, geo.channels
    if ndim == dims and channels == 1:
        return shape, 1
    if dims == 3 and ndim == 4 and shape[-1] == channels > 1:
        return shape[:dims], channels
    if dims == 3 and ndim == 4:
        problems.append(f"{image}: has {shape[-1]} channel(s) but the dataset has {channels}")
    else:
        problems.append(f"{image}: wrong dimensionality: array shape {list(shape)} for a "
                        f"{dims}D dataset")
    return None


def _check_case(image: Path, label: Path | None, geo: _Geometry, problems: list[str],
                load: bool = True) -> ImageInfo | None:
    """Check one image (and its label map): readability, dimensionality, NaN/inf, geometry, values.

    Args:
        image: NIfTI file or DICOM series folder.
        label: NIfTI label map, or None (classification).
        geo: expectations shared across the dataset; the first readable image fills the unknowns.
        problems: list the problems are appended to.
        load: read the voxels (NaN/inf, label values, truncation); header checks only when False.

    Returns:
        The image volume (its voxels dropped), or None when unreadable.
    """
    vol, probs = read_volume(image, load=load)
    problems.extend(probs)
    if vol is None:
        return None
    split = _split_channels(image, vol, geo, problems)
    spatial = split[0] if split is not None else None
    if vol.data is not None and vol.data.dtype.kind in "fc":
        bad = int(np.size(vol.data) - np.count_nonzero(np.isfinite(vol.data)))
        if bad:
            problems.append(f"{image}: {bad} NaN/inf voxel(s)")
    if vol.modality:
        geo.modalities.add(modality_name(vol.modality))
    if label is not None:
        _check_label(image, vol, spatial, label, geo, problems, load)
    vol.data = None
    return vol


def _check_label(image: Path, vol: ImageInfo, spatial: tuple[int, ...] | None, label: Path,
                 geo: _Geometry, problems: list[str], load: bool) -> None:
    """Check a label map against its image and the declared label values."""
    lab, probs = read_volume(label, load=load)
    problems.extend(probs)
    if lab is None:
        return
    if spatial is not None:
        lshape = lab.shape[:-1] if len(spatial) == 3 and len(lab.shape) == 4 and \
            lab.shape[-1] == 1 else lab.shape
        if tuple(lshape) != tuple(spatial):
            problems.append(f"{label}: label shape {list(lshape)} differs from image shape "
                            f"{list(spatial)} ({image})")
        else:
            if not np.allclose(lab.spacing, vol.spacing, rtol=1e-3, atol=1e-4):
                problems.append(f"{label}: label spacing {np.round(lab.spacing, 4).tolist()} "
                                f"differs from image spacing {np.round(vol.spacing, 4).tolist()} "
                                f"({image})")
            elif not np.allclose(lab.affine, vol.affine, rtol=1e-3, atol=1e-3):
                problems.append(f"{label}: label affine (origin/orientation) differs from the "
                                f"image affine ({image})")
    if lab.data is None:
        return
    data = lab.data
    if data.dtype.kind in "fc":
        if not np.isfinite(data).all():
            problems.append(f"{label}: label holds NaN/inf values")
            data = data[np.isfinite(data)]
        values = np.unique(data)
        frac = values[values != np.round(values)]
        if frac.size:
            problems.append(f"{label}: label values are not integers (e.g. "
                            f"{', '.join(f'{v:g}' for v in frac[:3])})")
        values = np.unique(np.round(values)).astype(np.int64)
    elif data.dtype.kind in "iub":
        values = np.unique(data).astype(np.int64)
    else:
        problems.append(f"{label}: label data type {data.dtype} is not numeric")
        return
    found = {int(v) for v in values}
    geo.found_labels |= found
    if geo.declared_labels is not None:
        undeclared = sorted(found - geo.declared_labels)
        if undeclared:
            problems.append(f"{label}: label values {undeclared} not declared in labels "
                            f"({', '.join(str(v) for v in sorted(geo.declared_labels))})")


# --------------------------------------------------------------------------------------------------
# MSD


def _read_msd_json(jpath: Path, p: list[str]) -> dict[str, Any] | None:
    """An MSD ``dataset.json`` as a dict, or None with the reason appended to ``p``."""
    if not jpath.is_file():
        p.append(f"{jpath}: missing (an MSD folder needs a dataset.json)")
        return None
    try:
        doc = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        p.append(f"{jpath}: malformed JSON ({exc})")
        return None
    except OSError as exc:
        p.append(f"{jpath}: unreadable ({exc})")
        return None
    if not isinstance(doc, dict):
        p.append(f"{jpath}: malformed dataset.json: the top level must be an object")
        return None
    return doc


def _msd_entries(training: list[Any], jpath: Path, root: Path,
                 p: list[str]) -> list[tuple[str, Path, Path]]:
    """``(case id, image, label)`` of each well-formed, unique ``training`` entry.

    Entries that are no object, lack a path, point outside ``root`` or repeat an image or a
    case id are left out, each with its problem appended to ``p``.
    """
    seen_img: dict[Path, int] = {}
    seen_id: dict[str, int] = {}
    entries = []
    for i, entry in enumerate(training):
        where = f"{jpath}: training[{i}]"
        if not isinstance(entry, dict):
            p.append(f"{where} must be an object with 'image' and 'label'")
            continue
        paths = {}
        for key in ("image", "label"):
            val = entry.get(key)
            if not isinstance(val, str) or not val:
                p.append(f"{where} lacks '{key}'")
                continue
            full = resolve(val, root)
            if not is_within(full, root):
                p.append(f"{where} {key} '{val}' leaves the dataset folder {root}")
                continue
            paths[key] = full
        if len(paths) < 2:
            continue
        case_id = strip_nifti_suffix(paths["image"].name)
        if paths["image"] in seen_img:
            p.append(f"{where}: duplicate case: image {paths['image']} is also "
                     f"training[{seen_img[paths['image']]}]")
            continue
        if case_id in seen_id:
            p.append(f"{where}: duplicate case id '{case_id}' (also training[{seen_id[case_id]}])")
            continue
        seen_img[paths["image"]] = i
        seen_id[case_id] = i
        entries.append((case_id, paths["image"], paths["label"]))
    return entries


def scan_msd(path: Path, *, spatial_dims: int | None = None, max_cases: int | None = None,
             load: bool = True) -> Scan:
    """Check a Medical Segmentation Decathlon folder (or its ``dataset.json``) and list its cases.

    Args:
        path: the MSD folder or its ``dataset.json``.
        spatial_dims: expected dimensionality (None: from ``tensorImageSize`` / the images).
        max_cases: check and list only the first N ``training`` entries (the JSON is checked whole).
        load: read voxels (NaN/inf, label values, truncation), not only headers.

    Returns:
        The :class:`Scan`; ``cases`` hold ``case_id`` (image file name without suffix), ``image``,
        ``label`` (absolute paths) and ``patient_id`` (= ``case_id``).
    """
    path = resolve(path)
    if path.is_dir():
        root, jpath = path, path / "dataset.json"
    else:
        root, jpath = path.parent, path
    scan = Scan(kind="msd", path=path, task="segmentation")
    p = scan.problems
    doc = _read_msd_json(jpath, p)
    if doc is None:
        return scan
    for key in ("labels", "training"):
        if key not in doc:
            p.append(f"{jpath}: malformed dataset.json: missing key '{key}'")
    labels = _int_keyed_mapping(doc.get("labels"), str(jpath), "labels", p) if "labels" in doc \
        else None
    if labels is not None and "0" not in labels:
        p.append(f"{jpath}: 'labels' has no entry '0' (background)")
    scan.labels = labels
    modality = doc.get("modality")
    channels = len(modality) if isinstance(modality, dict) and modality else 1
    scan.modality = modality_name(modality)
    scan.in_channels = channels
    tis = str(doc.get("tensorImageSize", "")).upper()
    dims_from = "the dataset config's spatial_dims"
    if spatial_dims is None and tis in ("2D", "3D", "4D"):
        spatial_dims = {"2D": 2, "3D": 3 if channels == 1 else 2, "4D": 3}[tis]
        dims_from = f"{jpath} (tensorImageSize {tis})"
    training = doc.get("training", [])
    if not isinstance(training, list):
        p.append(f"{jpath}: malformed dataset.json: 'training' must be a list")
        training = []
    elif "training" in doc and not training:
        p.append(f"{jpath}: empty dataset: 'training' lists no cases")
    num = doc.get("numTraining")
    if num is not None and _as_int(num) != len(training):
        p.append(f"{jpath}: count mismatch: numTraining is {num} but 'training' lists "
                 f"{len(training)} case(s)")
    geo = _Geometry(spatial_dims=spatial_dims, channels=channels,
                    # background 0 counts as declared (a missing "0" is reported once above)
                    declared_labels={0} | {int(k) for k in labels} if labels else None,
                    dims_from=dims_from)
    to_check = _msd_entries(training, jpath, root, p)
    if max_cases is not None:
        to_check = to_check[:max_cases]
    geo.decide([image for _, image, _ in to_check])
    for case_id, image, label in to_check:
        n_before = len(p)
        _check_case(image, label, geo, p, load=load)
        if len(p) == n_before:
            scan.cases.append({"case_id": case_id, "image": str(image), "label": str(label),
                               "patient_id": case_id})
    if (line := geo.dims_problem()) is not None:
        p.append(line)
    scan.spatial_dims = geo.spatial_dims
    return scan


# --------------------------------------------------------------------------------------------------
# MedMNIST


def scan_npz(path: Path, *, spatial_dims: int | None = None, classes: Any = None,
             max_cases: int | None = None) -> Scan:
    """Check a MedMNIST ``.npz`` archive (read with numpy only) and list its cases.

    Args:
        path: the ``.npz`` file.
        spatial_dims: expected dimensionality (None: 2 for ``(N, H, W)``, 3 for ``(N, D, H, W)``).
        classes: declared class names (index -> name), or None to use ``class_<k>``.
        max_cases: keep only N cases, taken from the start of each official split in proportion
            to its size (at least one per non-empty split when N allows).

    Returns:
        The :class:`Scan`; ``cases`` hold ``case_id`` (``<stem>_<split>_<index>``), ``class``,
        ``patient_id`` (= ``case_id``), ``split`` and ``index``; ``arrays`` holds the arrays.
    """
    path = resolve(path)
    scan = Scan(kind="medmnist", path=path, task="classification")
    p = scan.problems
    declared = _int_keyed_mapping(classes, "dataset config", "classes", p)
    if not path.is_file():
        p.append(f"{path}: file is missing")
        return scan
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        p.append(f"{path}: unreadable or truncated .npz ({type(exc).__name__}: {exc})")
        return scan
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in NPZ_SPLITS:
        ik, lk = f"{s}_images", f"{s}_labels"
        if (ik in arrays) != (lk in arrays):
            missing = lk if ik in arrays else ik
            p.append(f"{path}: malformed .npz: missing key '{missing}'")
            continue
        if ik in arrays:
            splits[s] = (arrays[ik], arrays[lk])
    if not splits:
        p.append(f"{path}: malformed .npz: none of the keys "
                 f"{', '.join(f'{s}_images/{s}_labels' for s in NPZ_SPLITS)}")
        return scan
    dims_seen = set()
    max_label = -1
    for s, (imgs, labs) in splits.items():
        problem = _npz_split_problem(path, s, imgs, labs)
        if problem:
            p.append(problem)
            continue
        if imgs.dtype.kind == "f":
            bad = int(imgs.size - np.count_nonzero(np.isfinite(imgs)))
            if bad:
                p.append(f"{path}: {s}_images holds {bad} NaN/inf value(s)")
        dims_seen.add(imgs.ndim - 1)
        if labs.size:
            max_label = max(max_label, int(labs.max()))
    if len(dims_seen) > 1:
        p.append(f"{path}: wrong dimensionality: the splits mix 2D and 3D images")
    elif dims_seen:
        found_dims = dims_seen.pop()
        if spatial_dims is not None and found_dims != spatial_dims:
            p.append(f"{path}: wrong dimensionality: images are {found_dims}D but the dataset "
                     f"config says spatial_dims {spatial_dims}")
        scan.spatial_dims = found_dims
    total = sum(v[0].shape[0] for v in splits.values())
    if total == 0:
        p.append(f"{path}: empty dataset: no images in any split")
    if declared is not None:
        undeclared = [] if p else sorted({int(c) for _, labs in splits.values()
                                          for c in np.unique(labs) if str(int(c)) not in declared})
        if undeclared:
            p.append(f"{path}: classes {undeclared} not declared in the config's classes "
                     f"({', '.join(declared)})")
        scan.classes = declared
    else:
        scan.classes = {str(k): f"class_{k}" for k in range(max(max_label + 1, 2))}
    if p:
        return scan
    scan.arrays = splits
    scan.cases = _npz_cases(path.stem, splits, max_cases)
    return scan


def _npz_split_problem(path: Path, split: str, imgs: np.ndarray, labs: np.ndarray) -> str | None:
    """The first problem that makes one official split of a MedMNIST archive unusable, or None.

    Args:
        path: the ``.npz`` file (named in the message).
        split: ``train``, ``val`` or ``test``.
        imgs: ``{split}_images``, ``(N, H, W)`` or ``(N, D, H, W)`` when valid.
        labs: ``{split}_labels``, ``(N,)`` or ``(N, 1)`` integer classes when valid.
    """
    s = split
    if imgs.shape[:1] != labs.shape[:1]:
        return (f"{path}: count mismatch: {s}_images has {imgs.shape[0]} item(s) but "
                f"{s}_labels has {labs.shape[0] if labs.ndim else 0}")
    if labs.ndim == 2 and labs.shape[1] != 1:
        return (f"{path}: {s}_labels has shape {list(labs.shape)}: multi-label "
                "(N, k) labels are not supported (need (N,) or (N, 1))")
    if labs.ndim not in (1, 2):
        return f"{path}: {s}_labels has shape {list(labs.shape)}; need (N,) or (N, 1)"
    flat = labs.reshape(-1)
    if flat.dtype.kind not in "iuf" or (flat.dtype.kind == "f" and (
            not np.isfinite(flat).all() or (flat != np.round(flat)).any())):
        return f"{path}: {s}_labels holds non-integer classes (dtype {flat.dtype})"
    if flat.size and flat.min() < 0:
        return f"{path}: {s}_labels holds negative classes ({int(flat.min())})"
    if imgs.ndim == 4 and imgs.shape[-1] in (3, 4) and imgs.shape[1] != imgs.shape[-1]:
        return (f"{path}: {s}_images has shape {list(imgs.shape)}: colour (N, H, W, "
                f"{imgs.shape[-1]}) images are not supported; convert them to grey")
    if imgs.ndim not in (3, 4):
        return (f"{path}: wrong dimensionality: {s}_images has shape {list(imgs.shape)}; "
                "need (N, H, W) or (N, D, H, W)")
    if imgs.dtype.kind not in "iufb":
        return f"{path}: {s}_images has non-numeric dtype {imgs.dtype}"
    return None


def _npz_cases(stem: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
               max_cases: int | None) -> list[dict[str, Any]]:
    """The case list of a checked MedMNIST archive (see :func:`scan_npz`)."""
    take = _proportional_take({s: v[0].shape[0] for s, v in splits.items()}, max_cases)
    width = max(5, len(str(max(v[0].shape[0] for v in splits.values()))))
    cases = []
    for s, (_, labs) in splits.items():
        flat = labs.reshape(-1)
        for i in range(take[s]):
            cid = f"{stem}_{s}_{i:0{width}d}"
            cases.append({"case_id": cid, "class": int(flat[i]), "patient_id": cid,
                          "split": s, "index": i})
    return cases


def _proportional_take(sizes: dict[str, int], max_cases: int | None) -> dict[str, int]:
    """How many cases to keep from the start of each split for ``max_cases`` (all when None)."""
    total = sum(sizes.values())
    if max_cases is None or max_cases >= total:
        return dict(sizes)
    take = {s: min(n, max(1 if n and max_cases >= len(sizes) else 0,
                          math.floor(max_cases * n / total))) for s, n in sizes.items()}
    order = sorted(sizes, key=lambda s: -sizes[s])
    while sum(take.values()) < max_cases:
        for s in order:
            if take[s] < sizes[s] and sum(take.values()) < max_cases:
                take[s] += 1
    while sum(take.values()) > max_cases:
        s = max(take, key=lambda k: take[k])
        take[s] -= 1
    return take


# --------------------------------------------------------------------------------------------------
# CSV manifests and DICOM folders


def _read_csv(path: Path, problems: list[str]) -> list[dict[str, str]] | None:
    """Read a CSV as strings; None (and a problem) when malformed."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        problems.append(f"{path}: malformed CSV ({type(exc).__name__}: {str(exc).strip()})")
        return None
    df.columns = [str(c).strip() for c in df.columns]
    return [{k: str(v).strip() for k, v in row.items()} for row in df.to_dict("records")]


@dataclass
class _Manifest:
    """A manifest to check: its rows and where their paths start.

    Attributes:
        csv_path: the CSV file (named in the messages).
        root: the folder relative paths start from and must not leave.
        rows: one dict per data row.
        columns: the header.
        default_images: DICOM: series folder per case id, for rows without ``image``.
    """

    csv_path: Path
    root: Path
    rows: list[dict[str, str]]
    columns: list[str]
    default_images: dict[str, Path] | None = None


@dataclass
class _Declared:
    """What the dataset config says about a manifest's cases (see :func:`scan_csv`)."""

    task: str | None = None
    spatial_dims: int | None = None
    labels: Any = None
    classes: Any = None
    max_cases: int | None = None
    load: bool = True


def _manifest_task(m: _Manifest, task: str | None, p: list[str]) -> tuple[str | None, bool]:
    """The task the columns allow, and whether the required columns are there."""
    required = ["case_id"] + ([] if m.default_images is not None else ["image"])
    for col in required:
        if col not in m.columns:
            p.append(f"{m.csv_path}: malformed CSV: missing column '{col}'")
    has_label, has_class = "label" in m.columns, "class" in m.columns
    if task is None and has_label != has_class:
        task = "segmentation" if has_label else "classification"
    if not has_label and not has_class:
        p.append(f"{m.csv_path}: malformed CSV: needs a 'label' (mask path) and/or 'class' column")
    elif task == "segmentation" and not has_label:
        p.append(f"{m.csv_path}: malformed CSV: task segmentation needs a 'label' column")
    elif task == "classification" and not has_class:
        p.append(f"{m.csv_path}: malformed CSV: task classification needs a 'class' column")
    return task, all(c in m.columns for c in required)


@dataclass
class _RowChecks:
    """What the row checks share: the columns to check and the ids, images, classes seen."""

    check_label: bool
    check_class: bool
    declared_classes: dict[str, str] | None
    seen_id: dict[str, int] = field(default_factory=dict)
    seen_img: dict[Path, int] = field(default_factory=dict)
    found_classes: set[int] = field(default_factory=set)


def _row_case(m: _Manifest, i: int, row: dict[str, str], rc: _RowChecks, p: list[str]
              ) -> tuple[dict[str, Any], Path, Path | None] | None:
    """Check one manifest row (no file is read): ``(case, image, label)`` or None when unusable."""
    line = i + 2
    where = f"{m.csv_path}: line {line}"
    cid = row.get("case_id", "")
    if not cid:
        p.append(f"{where}: empty case_id")
        return None
    if cid in rc.seen_id:
        p.append(f"{where}: duplicate case_id '{cid}' (also line {rc.seen_id[cid]})")
        return None
    rc.seen_id[cid] = line
    img_txt = row.get("image", "")
    if img_txt:
        image = resolve(img_txt, m.root)
    elif m.default_images is not None and cid in m.default_images:
        image = m.default_images[cid]
    else:
        p.append(f"{where}: case '{cid}' has no image" + (
            " (no DICOM series folder of that name)" if m.default_images is not None else ""))
        return None
    if not is_within(image, m.root):
        p.append(f"{where}: image '{img_txt}' leaves the dataset folder {m.root}")
        return None
    if image in rc.seen_img:
        p.append(f"{where}: duplicate case: image {image} is also on line {rc.seen_img[image]}")
        return None
    rc.seen_img[image] = line
    case: dict[str, Any] = {"case_id": cid, "image": str(image)}
    bad = False
    label = None
    if rc.check_label:
        lab_txt = row.get("label", "")
        if not lab_txt:
            p.append(f"{where}: case '{cid}' has no label")
            bad = True
        else:
            label = resolve(lab_txt, m.root)
            if not is_within(label, m.root):
                p.append(f"{where}: label '{lab_txt}' leaves the dataset folder {m.root}")
                bad = True
            else:
                case["label"] = str(label)
    if rc.check_class:
        value = _as_int(row.get("class", ""))
        declared = rc.declared_classes
        if value is None:
            p.append(f"{where}: class {row.get('class', '')!r} is not an integer")
            bad = True
        elif value < 0:
            p.append(f"{where}: class {value} is negative")
            bad = True
        elif declared is not None and str(value) not in declared:
            p.append(f"{where}: class {value} not declared in classes ({', '.join(declared)})")
            bad = True
        else:
            case["class"] = value
            rc.found_classes.add(value)
    if row.get("patient_id"):
        case["patient_id"] = row["patient_id"]
    return None if bad else (case, image, label)


def _scan_rows(scan: Scan, m: _Manifest, d: _Declared) -> None:
    """Check the rows of a manifest (CSV or DICOM ``manifest.csv``) and fill ``scan.cases``.

    The steps: the columns decide the task; each row is checked without reading files; the first
    ``max_cases`` usable rows have their images and labels read against the dataset's geometry;
    label and class names come from the config or from what was found.
    """
    p = scan.problems
    task, columns_ok = _manifest_task(m, d.task, p)
    if not columns_ok:
        return
    scan.task = task
    declared_labels = _int_keyed_mapping(d.labels, "dataset config", "labels", p)
    rc = _RowChecks(check_label="label" in m.columns and task in (None, "segmentation"),
                    check_class="class" in m.columns and task in (None, "classification"),
                    declared_classes=_int_keyed_mapping(d.classes, "dataset config", "classes",
                                                        p))
    if not m.rows:
        p.append(f"{m.csv_path}: empty dataset: the manifest has no rows")
        return
    geo = _Geometry(spatial_dims=d.spatial_dims, channels=None,
                    declared_labels={0} | {int(k) for k in declared_labels}
                    if declared_labels else None)
    pending = [c for c in (_row_case(m, i, row, rc, p) for i, row in enumerate(m.rows)) if c]
    if d.max_cases is not None:
        pending = pending[:d.max_cases]
    geo.decide([image for _, image, _ in pending])
    _read_cases(scan, pending, geo, d.load)
    _record_names(scan, rc, geo, declared_labels)


def _read_cases(scan: Scan, pending: list[tuple[dict, Path, Path | None]], geo: _Geometry,
                load: bool) -> None:
    """Read each pending case's image and label against the geometry; keep the clean ones.

    Fills ``scan.cases`` (with a ``patient_id``: the row's, the DICOM tag's, or the case id),
    ``spatial_dims``, ``in_channels`` and ``modality``.
    """
    p = scan.problems
    for case, image, label in pending:
        n_before = len(p)
        vol = _check_case(image, label, geo, p, load=load)
        if vol is not None and "patient_id" not in case:
            case["patient_id"] = vol.patient_id or case["case_id"]
        if len(p) == n_before:
            case.setdefault("patient_id", case["case_id"])
            scan.cases.append(case)
    if (line := geo.dims_problem()) is not None:
        p.append(line)
    scan.spatial_dims = geo.spatial_dims
    scan.in_channels = geo.channels or 1
    if geo.modalities:
        scan.modality = geo.modalities.pop() if len(geo.modalities) == 1 else "other"


def _record_names(scan: Scan, rc: _RowChecks, geo: _Geometry,
                  declared_labels: dict[str, str] | None) -> None:
    """Label and class names: the config's where declared, else from the values found."""
    if rc.check_label:
        if declared_labels is not None:
            if "0" not in declared_labels:
                scan.problems.append("dataset config: 'labels' has no entry '0' (background)")
            scan.labels = declared_labels
        else:
            found = sorted(geo.found_labels | {0})
            scan.labels = {str(v): ("background" if v == 0 else f"label_{v}") for v in found}
    if rc.check_class:
        if rc.declared_classes is not None:
            scan.classes = rc.declared_classes
        elif rc.found_classes:
            scan.classes = {str(k): f"class_{k}"
                            for k in range(max(max(rc.found_classes) + 1, 2))}


def scan_csv(path: Path, *, task: str | None = None, spatial_dims: int | None = None,
             labels: Any = None, classes: Any = None, max_cases: int | None = None,
             load: bool = True) -> Scan:
    """Check a CSV manifest and list its cases.

    Args:
        path: the CSV file (columns ``case_id``, ``image``, ``label`` and/or ``class``, optional
            ``patient_id``; paths relative to the CSV's folder, which they must not leave).
        task: ``"segmentation"`` or ``"classification"``; None: from the columns (both checked
            when both are present).
        spatial_dims: expected dimensionality (None: from the first image).
        labels: declared label names (value -> name); None: found values become ``label_<k>``.
        classes: declared class names (index -> name); None: ``class_<k>`` up to the largest.
        max_cases: check and list only the first N usable rows.
        load: read voxels (NaN/inf, label values, truncation), not only headers.

    Returns:
        The :class:`Scan`.
    """
    path = resolve(path)
    scan = Scan(kind="csv", path=path, task=task)
    if not path.is_file():
        scan.problems.append(f"{path}: file is missing")
        return scan
    rows = _read_csv(path, scan.problems)
    if rows is None:
        return scan
    columns = list(rows[0]) if rows else _csv_header(path)
    _scan_rows(scan, _Manifest(path, path.parent, rows, columns),
               _Declared(task, spatial_dims, labels, classes, max_cases, load))
    return scan


def _csv_header(path: Path) -> list[str]:
    """Column names of a CSV that has a header but no rows."""
    import pandas as pd

    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    except Exception:  # noqa: BLE001
        return []


def dicom_case_id(folder: Path, root: Path) -> str:
    """Case id of a DICOM series folder: its path below ``root`` with ``/`` replaced by ``_``."""
    rel = folder.relative_to(root)
    return "_".join(rel.parts) if rel.parts else root.name


def scan_dicom(path: Path, *, task: str | None = None, spatial_dims: int | None = None,
               labels: Any = None, classes: Any = None, max_cases: int | None = None,
               load: bool = True) -> Scan:
    """Check a folder of DICOM series (one folder per series) and its ``manifest.csv``.

    The manifest (in ``path``) has ``case_id`` (the series folder's path below ``path`` with ``/``
    replaced by ``_``, e.g. ``patient1_study2``) and ``class`` and/or ``label`` (a NIfTI mask in the
    series' geometry, relative to ``path``); optional ``image`` (a series folder, overriding the
    default) and ``patient_id`` (default: the DICOM PatientID). ``path`` may also be a CSV
    manifest anywhere, whose ``image`` column names the series folders.

    Args:
        path: the folder (or a CSV manifest).
        task: as for :func:`scan_csv`.
        spatial_dims: as for :func:`scan_csv`.
        labels: as for :func:`scan_csv`.
        classes: as for :func:`scan_csv`.
        max_cases: as for :func:`scan_csv`.
        load: as for :func:`scan_csv`.

    Returns:
        The :class:`Scan` (``modality`` from the DICOM Modality tag).
    """
    path = resolve(path)
    if path.is_file():
        scan = scan_csv(path, task=task, spatial_dims=spatial_dims, labels=labels,
                        classes=classes, max_cases=max_cases, load=load)
        scan.kind = "dicom"
        return scan
    scan = Scan(kind="dicom", path=path, task=task)
    p = scan.problems
    if not path.is_dir():
        p.append(f"{path}: folder is missing")
        return scan
    series = find_dicom_series(path)
    if not series:
        p.append(f"{path}: empty dataset: no folder below it holds DICOM files")
    manifest = path / DICOM_MANIFEST
    if not manifest.is_file():
        p.append(f"{manifest}: missing (a DICOM folder needs a manifest with case_id and class "
                 "or label per series)")
        return scan
    rows = _read_csv(manifest, p)
    if rows is None:
        return scan
    default_images = {dicom_case_id(s, path): s for s in series}
    columns = list(rows[0]) if rows else _csv_header(manifest)
    _scan_rows(scan, _Manifest(manifest, path, rows, columns, default_images),
               _Declared(task, spatial_dims, labels, classes, max_cases, load))
    listed = {Path(c["image"]) for c in scan.cases}
    unlisted = [s for s in series if s not in listed]
    if unlisted and max_cases is None and not p:
        logger.warning("%s: %d DICOM series folder(s) are not in %s and are left out (e.g. %s)",
                       path, len(unlisted), DICOM_MANIFEST, unlisted[0])
    return scan


# --------------------------------------------------------------------------------------------------
# public entry points


def detect_kind(path: Path) -> str | None:
    """Tell the kind of a dataset path: ``"msd"``, ``"medmnist"``, ``"csv"``, ``"dicom"`` or None.

    By suffix first (``dataset.json``/``.json``, ``.npz``, ``.csv``), then by contents (a zip
    archive, a JSON object, a folder with ``dataset.json`` or with DICOM series).
    """
    if path.is_dir():
        if (path / "dataset.json").is_file() or (path / "imagesTr").is_dir():
            return "msd"
        if (path / DICOM_MANIFEST).is_file() or find_dicom_series(path):
            return "dicom"
        return None
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "msd"
    if suffix == ".npz":
        return "medmnist"
    if suffix in (".csv", ".tsv"):
        return "csv"
    try:
        head = path.read_bytes()[:64]
    except OSError:
        return None
    if head.startswith(b"PK"):
        return "medmnist"
    if head.lstrip().startswith(b"{"):
        return "msd"
    if b"case_id" in head:
        return "csv"
    return None


def validate_path(path: str | Path) -> list[str]:
    """Check a dataset on disk and return every problem found, one line each, naming the file.

    Reads every case (headers with nibabel, voxels for NaN/inf, label values and truncation);
    changes nothing on disk.

    Args:
        path: an MSD folder or its ``dataset.json``, a MedMNIST ``.npz``, a CSV manifest, or a
            folder of DICOM series with a ``manifest.csv``.

    Returns:
        The problems; empty when the dataset is usable.
    """
    p = resolve(path)
    if not p.exists():
        return [f"{p}: does not exist"]
    kind = detect_kind(p)
    if kind is None:
        return [f"{p}: not a dataset capsmed knows (an MSD folder or dataset.json, a MedMNIST "
                ".npz, a CSV manifest, or a folder of DICOM series with manifest.csv)"]
    return scan_source(kind, p, {}).problems


def scan_source(kind: str, path: Path, ds_cfg: Mapping[str, Any]) -> Scan:
    """Run the scanner for ``kind`` on ``path`` with the options of a dataset config."""
    opts = {"spatial_dims": ds_cfg.get("spatial_dims"), "max_cases": ds_cfg.get("max_cases")}
    if kind == "msd":
        return scan_msd(path, **opts)
    if kind == "medmnist":
        return scan_npz(path, classes=ds_cfg.get("classes"), **opts)
    extra = {"task": ds_cfg.get("task"), "labels": ds_cfg.get("labels"),
             "classes": ds_cfg.get("classes")}
    if kind == "csv":
        return scan_csv(path, **opts, **extra)
    if kind == "dicom":
        return scan_dicom(path, **opts, **extra)
    raise ValueError(f"unknown dataset kind {kind!r}")


def normalise_config(ds_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a dataset config without ``None`` values, ``synthetic`` defaults filled in.

    The config schema fills unset keys with ``null``; dropping them lets a reader tell "unset"
    from a value. The generator's settings take the schema's defaults (one home: the schema).
    """
    out: dict[str, Any] = {}
    for k, v in ds_cfg.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and k in ("synthetic", "preprocess", "split"):
            v = {kk: vv for kk, vv in v.items() if vv is not None}
        out[k] = v
    syn = out.get("synthetic", {})
    if isinstance(syn, Mapping):
        out["synthetic"] = {**{k: v for k, v in dataset_defaults("synthetic").items()
                               if v is not None}, **syn}
    return out


def _config_problems(ds: Mapping[str, Any]) -> list[str]:
    """Problems with the keys and values of a dataset config (no file is read but ``path``).

    The schema's rules for ``datasets.NAME`` (:func:`capsmed.config.dataset_schema_problems`),
    the rules across keys (:func:`capsmed.config.dataset_rule_problems`), then what only the
    data side knows: the source path exists, label and class keys are integers.
    """
    w = "dataset config"
    p = dataset_schema_problems(ds, w)
    p += dataset_rule_problems(ds, w)
    source = ds.get("source", "synthetic")
    if source in FILE_SOURCES and ds.get("path") and not resolve(ds["path"]).exists():
        p.append(f"{resolve(ds['path'])}: does not exist (dataset config 'path')")
    for key in ("labels", "classes"):
        if isinstance(ds.get(key), Mapping):  # other types are the schema's to report
            _int_keyed_mapping(ds[key], w, key, p)
    return p


def scan_config(ds_cfg: Mapping[str, Any]) -> tuple[list[str], Scan | None]:
    """Check a dataset config and the source it names.

    Args:
        ds_cfg: the dataset config (see :func:`validate_dataset_config`).

    Returns:
        (problems, scan): the scan is None when the config is too broken to read the source.
    """
    if not isinstance(ds_cfg, Mapping):
        return [f"dataset config: must be a mapping, got {type(ds_cfg).__name__}"], None
    ds_cfg = normalise_config(ds_cfg)
    problems = _config_problems(ds_cfg)
    if problems:
        return problems, None
    source = ds_cfg.get("source", "synthetic")
    if source == "synthetic":
        syn = ds_cfg["synthetic"]
        task = ds_cfg.get("task") or "segmentation"
        dims = ds_cfg.get("spatial_dims") or len(syn["size"])
        k = int(syn["num_classes"])
        scan = Scan(kind="synthetic", path=Path("."), task=task, spatial_dims=dims,
                    modality=modality_name(ds_cfg.get("modality")))
        if task == "segmentation":
            declared = _int_keyed_mapping(ds_cfg.get("labels"), "dataset config", "labels",
                                          problems)
            scan.labels = declared or {str(i): ("background" if i == 0 else f"class_{i}")
                                       for i in range(k)}
            if len(scan.labels) != k:
                problems.append(f"dataset config: labels has {len(scan.labels)} entries but "
                                f"synthetic.num_classes is {k}")
        else:
            declared = _int_keyed_mapping(ds_cfg.get("classes"), "dataset config", "classes",
                                          problems)
            scan.classes = declared or {str(i): f"class_{i}" for i in range(k)}
            if len(scan.classes) != k:
                problems.append(f"dataset config: classes has {len(scan.classes)} entries but "
                                f"synthetic.num_classes is {k}")
        return problems, scan
    path = resolve(ds_cfg["path"])
    kind = source
    if source == "msd" and path.suffix.lower() not in (".json", "") and path.is_file():
        problems.append(f"{path}: source msd needs an MSD folder or its dataset.json")
        return problems, None
    scan = scan_source(kind, path, ds_cfg)
    problems.extend(scan.problems)
    task = ds_cfg.get("task")
    if scan.task is None and task is None and source in ("csv", "dicom") and not scan.problems:
        problems.append(f"{path}: has both 'label' and 'class' columns; set the dataset config's "
                        "task")
    if ds_cfg.get("modality"):
        scan.modality = modality_name(ds_cfg["modality"])
    if not scan.cases and not problems:
        problems.append(f"{path}: empty dataset: no usable cases")
    return problems, scan


def validate_dataset_config(ds_cfg: Mapping[str, Any]) -> list[str]:
    """Check a dataset config (keys, values) and the dataset it points to; change nothing.

    Args:
        ds_cfg: ``{"source", "task", "spatial_dims", "path", "modality", "labels", "classes",
            "synthetic", "preprocess", "split", "max_cases"}`` (see config.yaml); relative paths
            are resolved against the working directory. With ``max_cases`` only the first N cases
            are read.

    Returns:
        One line per problem, naming the file or the config key; empty when usable.
    """
    return scan_config(ds_cfg)[0]
