"""MONAI dictionary transform pipelines built from a preprocessing plan.

Dictionaries carry ``"image"`` and ``"label"`` (segmentation) or ``"image"`` and ``"class"``
(classification); ``"image"``/``"label"`` start as file paths (NIfTI file or DICOM series folder).

Deterministic part (:func:`build_preprocess_transforms`), in order:

1. :class:`LoadPinnedImaged` (``LoadImaged`` with its reader pinned, MetaTensors: NIfTI through
   MONAI's ``NibabelReader``, DICOM series folders through its ``PydicomReader``, the readers
   ``capsmed validate`` checks with; installing ITK changes nothing), ``EnsureChannelFirstd``;
2. 3D: ``Orientationd("RAS")``; ``Spacingd`` when the plan sets a spacing (bilinear image,
   nearest label);
3. segmentation with ``crop_foreground``: ``CropForegroundd`` to the non-zero box of the image
   (``allow_smaller=True``, invertible);
4. normalisation of the image: ``zscore`` (``NormalizeIntensityd``, non-zero voxels, per channel),
   ``ct`` (``ScaleIntensityRanged`` over ``ct_window`` to [0, 1], clipped), ``percentile``
   (``ScaleIntensityRangePercentilesd`` 0.5 / 99.5 to [0, 1], clipped) or ``minmax``
   (``ScaleIntensityd`` to [0, 1]);
5. segmentation: ``SpatialPadd`` to ``patch_size`` and ``DivisiblePadd`` to ``size_divisible``;
   the label becomes int64. Classification: ``Resized`` to ``image_size`` per axis; ``"class"``
   becomes an int64 tensor (a batch of them collates to ``(B,)``).

Every spatial step is invertible, so ``monai.transforms.Invertd(keys="pred",
transform=build_preprocess_transforms(plan), orig_keys="image", nearest_interp=True)`` maps a
prediction back to the geometry of the original file.

Random part (:func:`build_augment_transforms`), only through MONAI randomizable transforms
(seed with ``monai.utils.set_determinism`` or ``Compose.set_random_state``): segmentation
:class:`RandClassLocationsd` (sampled foreground and background locations, so that no index
array over every voxel is built), then ``RandCropByPosNegLabeld`` to ``patch_size``
(``samples_per_case`` patches, half centred on foreground: the output is a list of dicts, so
use ``monai.data.DataLoader``/``list_data_collate``), then ``RandFlipd`` on each axis,
``RandRotate90d`` in a plane whose two patch axes are equal, ``RandScaleIntensityd`` and
``RandShiftIntensityd``. Ultrasound (plan ``modality`` ``US``) keeps its top-down geometry:
flips on every axis but the first (vertical) one, no 90-degree turns, and ``RandAffined``
(rotation up to 10 degrees, scaling 10%, shifts 5%) with ``RandAdjustContrastd``.
With ``spatial=False`` (``train.spatial_augment: false``) every spatial step but the crop is left out
(no flips, turns, rotations, scalings or shifts); the crop stays, so patches of one size still batch,
and so do the intensity changes.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader, NibabelReader, PydicomReader
from monai.transforms import (
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

logger = logging.getLogger(__name__)

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class PinnedImageReader(ImageReader):
    """The image reader of every capsmed pipeline: the one ``capsmed validate`` checks with.

    NIfTI files (``.nii``, ``.nii.gz``) are read by MONAI's ``NibabelReader`` and DICOM series
    folders by its ``PydicomReader``, both with their defaults: ``capsmed validate`` reads NIfTI
    headers with nibabel and DICOM series with ``PydicomReader()``
    (:mod:`capsmed.data.validate`). Left to choose, ``LoadImage`` would read DICOM folders with
    ``ITKReader`` as soon as ITK is installed, with another geometry path than the one validated.

    ``read`` returns ``(reader, image)`` so that ``get_data`` asks the same reader.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nifti = NibabelReader()
        self.dicom = PydicomReader()

    @staticmethod
    def _paths(data: Sequence[Any] | Any) -> list[Path]:
        items = data if isinstance(data, (list, tuple)) else [data]
        return [Path(str(item)) for item in items]

    def reader_for(self, data: Sequence[Any] | Any) -> ImageReader:
        """The reader of ``data`` (a path, or several of one kind stacked as channels).

        Raises:
            ValueError: ``data`` mixes DICOM folders and files, or names a file that is not NIfTI.
        """
        paths = self._paths(data)
        folders = {p.is_dir() for p in paths}
        if len(folders) != 1:
            raise ValueError(f"cannot read DICOM series folders and files together: {paths}")
        if folders.pop():
            return self.dicom
        bad = [str(p) for p in paths if not p.name.lower().endswith(NIFTI_SUFFIXES)]
        if bad:
            raise ValueError(f"{bad[0]}: not a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
        return self.nifti

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        """Whether every path is a NIfTI file or a folder (a DICOM series)."""
        return all(p.is_dir() or p.name.lower().endswith(NIFTI_SUFFIXES)
                   for p in self._paths(filename))

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> tuple[ImageReader, Any]:
        """Read with the reader :meth:`reader_for` names; returns ``(reader, image)``."""
        reader = self.reader_for(data)
        return reader, reader.read(data, **kwargs)

    def get_data(self, img: tuple[ImageReader, Any]) -> tuple[Any, dict]:
        """``(array, metadata)`` from the reader that read ``img``."""
        reader, image = img
        return reader.get_data(image)


class LoadPinnedImaged(LoadImaged):
    """``LoadImaged`` that reads with :class:`PinnedImageReader` and no other reader.

    Given a reader, ``LoadImaged`` still falls back to its default readers (ITK first among them
    for DICOM) when that reader fails; here the pinned reader is passed at call time, so a file it
    cannot read raises its error instead.

    Args:
        keys: Keys of the paths to load.
        **kwargs: ``LoadImaged``'s other arguments (``image_only``, ``allow_missing_keys``, ...).
    """

    def __init__(self, keys: Any, **kwargs: Any) -> None:
        self.pinned_reader = PinnedImageReader()
        with warnings.catch_warnings():
            # LoadImage registers every reader; the optional nvImageCodec one warns when absent
            warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
            super().__init__(keys, reader=self.pinned_reader, **kwargs)

    def __call__(self, data: Mapping[Any, Any], reader: ImageReader | None = None) -> dict:
        """Load every key with the pinned reader (or ``reader`` when one is given)."""
        return super().__call__(data, reader or self.pinned_reader)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground selector for ``CropForegroundd``: voxels different from 0 (any channel).

    A module-level function (not a lambda) so the pipeline pickles for worker processes.
    """
    return x != 0


def _check_plan(plan: Mapping[str, Any]) -> None:
    for key in ("task", "spatial_dims", "patch_size", "normalization"):
        if key not in plan:
            raise ValueError(f"plan lacks {key!r} (make plans with "
                             "capsmed.data.fingerprint.make_plan)")
    if plan["task"] not in ("segmentation", "classification"):
        raise ValueError(f"plan task must be segmentation or classification, got {plan['task']!r}")
    if plan["spatial_dims"] not in (2, 3):
        raise ValueError(f"plan spatial_dims must be 2 or 3, got {plan['spatial_dims']!r}")
    if len(plan["patch_size"]) != plan["spatial_dims"]:
        raise ValueError(f"plan patch_size {plan['patch_size']} must have spatial_dims "
                         f"({plan['spatial_dims']}) entries")


def _normalise(plan: Mapping[str, Any]) -> Any:
    norm = plan["normalization"]
    if norm == "zscore":
        return NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    if norm == "ct":
        lo, hi = plan.get("ct_window") or (-1000.0, 1000.0)
        return ScaleIntensityRanged(keys="image", a_min=float(lo), a_max=float(hi), b_min=0.0,
                                    b_max=1.0, clip=True)
    if norm == "percentile":
        return ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0,
                                               b_max=1.0, clip=True, channel_wise=True)
    if norm == "minmax":
        return ScaleIntensityd(keys="image", minv=0.0, maxv=1.0, channel_wise=True)
    raise ValueError(f"plan normalization must be zscore, ct, percentile or minmax, got {norm!r}")


def build_preprocess_transforms(plan: Mapping[str, Any]) -> Compose:
    """Deterministic, invertible preprocessing (training, validation and inference).

    Args:
        plan: from :func:`capsmed.data.fingerprint.make_plan`.

    Returns:
        A ``Compose`` mapping ``{"image": path, "label": path}`` (segmentation; ``"label"`` may be
        absent at inference) to ``{"image": (C, *S) float32, "label": (1, *S) int64}`` MetaTensors,
        or ``{"image": path, "class": int}`` to ``{"image": (C, *image_size) float32,
        "class": () int64}``. ``S`` is the cropped, padded shape (each axis >= ``patch_size`` and a
        multiple of ``size_divisible``).

    Raises:
        ValueError: the plan is incomplete or inconsistent.
    """
    _check_plan(plan)
    seg = plan["task"] == "segmentation"
    dims = int(plan["spatial_dims"])
    keys = ["image", "label"] if seg else ["image"]
    load = LoadPinnedImaged(keys=keys, image_only=True, allow_missing_keys=True)
    t: list[Any] = [load, EnsureChannelFirstd(keys=keys, allow_missing_keys=True)]
    if dims == 3:
        t.append(Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS,
                              allow_missing_keys=True))
    if plan.get("spacing"):
        t.append(Spacingd(keys=keys, pixdim=[float(v) for v in plan["spacing"]],
                          mode=("bilinear", "nearest")[: len(keys)], allow_missing_keys=True))
    if seg and plan.get("crop_foreground", True):
        t.append(CropForegroundd(keys=keys, source_key="image", select_fn=nonzero,
                                 allow_smaller=True, allow_missing_keys=True))
    t.append(_normalise(plan))
    if seg:
        t.append(SpatialPadd(keys=keys, spatial_size=[int(v) for v in plan["patch_size"]],
                             allow_missing_keys=True))
        t.append(DivisiblePadd(keys=keys, k=int(plan.get("size_divisible", 1)),
                               allow_missing_keys=True))
        t.append(EnsureTyped(keys="label", dtype=torch.int64, allow_missing_keys=True))
    else:
        size = int(plan.get("image_size") or plan["patch_size"][0])
        t.append(Resized(keys="image", spatial_size=[size] * dims, mode="area"))
        t.append(EnsureTyped(keys="class", dtype=torch.int64, track_meta=False,
                             allow_missing_keys=True))
    return Compose(t)


def is_ultrasound(plan: Mapping[str, Any]) -> bool:
    """Whether the plan's modality is ultrasound (``US``, as DICOM names it)."""
    return str(plan.get("modality") or "").upper() in ("US", "ULTRASOUND")


#: Locations sampled per kind (foreground, background) for the patch centres, as nnU-Net samples
#: 10,000 locations per class.
CLASS_LOCATIONS = 10_000


class RandClassLocationsd(Randomizable, MapTransform):
    """Sampled foreground and background locations of a label map, for ``RandCropByPosNegLabeld``.

    Left to itself, ``RandCropByPosNegLabeld`` lists every foreground and every background voxel
    (two int64 arrays over the whole volume: 8 bytes per voxel, 630 MB for a 512 x 512 x 300 CT)
    on every call. This draws ``4 x samples`` voxel locations uniformly and keeps up to
    ``samples`` of each kind; where fewer than ``samples // 10`` foreground locations turn up (a
    small structure), it draws again inside the foreground's bounding box. Each kind's locations
    are uniform over that kind's voxels, as the full lists give, so the patches follow the same
    distribution; ``RandCropByPosNegLabeld`` reads them through its ``fg_indices_key`` and
    ``bg_indices_key`` and removes them from the dict.

    Args:
        label_key: Key of the ``(1, *S)`` label map.
        fg_key: Key to write the flat foreground locations ``(N,)`` int64 to.
        bg_key: Key to write the flat background locations to.
        samples: Locations kept per kind.
    """

    def __init__(self, label_key: str = "label", fg_key: str = "fg_locations",
                 bg_key: str = "bg_locations", samples: int = CLASS_LOCATIONS) -> None:
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        MapTransform.__init__(self, [label_key])
        self.label_key, self.fg_key, self.bg_key, self.samples = label_key, fg_key, bg_key, samples

    def randomize(self, data: Any = None) -> None:
        """Draws happen in :meth:`__call__` (they depend on the label's size)."""

    def _draw_in_box(self, labels: np.ndarray) -> np.ndarray:
        """Flat foreground locations drawn inside the foreground's bounding box."""
        fg = labels > 0
        lo, hi = [], []
        for axis in range(labels.ndim):
            hits = np.flatnonzero(fg.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
            lo.append(int(hits[0]))
            hi.append(int(hits[-1]) + 1)
        del fg
        coords = [self.R.randint(a, b, size=4 * self.samples) for a, b in zip(lo, hi, strict=True)]
        draws = np.ravel_multi_index(coords, labels.shape)
        return draws[labels.reshape(-1)[draws] > 0]

    def __call__(self, data: Mapping[Any, Any]) -> dict:
        """Add the sampled locations of ``data[label_key]`` under ``fg_key`` and ``bg_key``."""
        d = dict(data)
        label = d[self.label_key]
        labels = (label.detach().cpu().numpy() if isinstance(label, torch.Tensor)
                  else np.asarray(label))[0]
        flat = labels.reshape(-1)
        draws = self.R.randint(0, flat.size, size=4 * self.samples)
        is_fg = flat[draws] > 0
        fg, bg = draws[is_fg][: self.samples], draws[~is_fg][: self.samples]
        if len(fg) < max(self.samples // 10, 1) and flat.any():
            fg = np.concatenate([fg, self._draw_in_box(labels)])[: self.samples]
        d[self.fg_key], d[self.bg_key] = fg.astype(np.int64), bg.astype(np.int64)
        return d


def _rotation_axes(patch: list[int]) -> tuple[int, int] | None:
    """A pair of spatial axes whose patch sizes are equal (90 degree turns keep the shape)."""
    for a, b in itertools.combinations(range(len(patch)), 2):
        if patch[a] == patch[b]:
            return a, b
    return None


def build_augment_transforms(plan: Mapping[str, Any], spatial: bool = True,
                             rotate_degrees: float = 0.0, scale: float = 0.0) -> Compose:
    """Random augmentation applied after :func:`build_preprocess_transforms` during training.

    Args:
        plan: from :func:`capsmed.data.fingerprint.make_plan`.
        spatial: add the spatial augmentation (flips, 90-degree turns, ultrasound's
            ``RandAffined``); False keeps only the patch crop (segmentation) and the intensity
            changes (``train.spatial_augment: false``).
        rotate_degrees: With ``spatial``, also rotate by up to this many degrees about each axis
            (``train.rotate_augment``; MONAI ``RandAffined``, probability 0.5; 0: none).
        scale: With ``spatial``, also scale each axis by a factor in ``[1 - scale, 1 + scale]``
            (``train.scale_augment``, in the same ``RandAffined``; 0: none).

    Returns:
        A ``Compose`` of MONAI randomizable transforms. Segmentation: input ``{"image": (C, *S),
        "label": (1, *S)}`` -> a list of ``samples_per_case`` dicts with ``(C, *patch_size)`` /
        ``(1, *patch_size)``. Classification: shapes unchanged.

    Raises:
        ValueError: the plan is incomplete or inconsistent.
    """
    _check_plan(plan)
    seg = plan["task"] == "segmentation"
    dims = int(plan["spatial_dims"])
    patch = [int(v) for v in plan["patch_size"]]
    keys = ["image", "label"] if seg else ["image"]
    t: list[Any] = []
    if seg:
        t.append(RandClassLocationsd(label_key="label"))
        t.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=1,
                                        neg=1, num_samples=int(plan.get("samples_per_case", 1)),
                                        allow_smaller=True, fg_indices_key="fg_locations",
                                        bg_indices_key="bg_locations"))
    if not spatial:
        if is_ultrasound(plan):
            t.append(RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)))
    elif is_ultrasound(plan):
        # Ultrasound has a fixed top-down geometry (transducer at the top of the image, acoustic
        # shadowing below lesions): no vertical flips or 90-degree turns; left-right flips, small
        # rotations, scalings and shifts, and contrast changes instead.
        for axis in range(1, dims):
            t.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis))
        t.append(RandAffined(keys=keys, prob=0.5, rotate_range=[0.17] * (1 if dims == 2 else 3),
                             scale_range=[0.1] * dims, translate_range=[0.05 * p for p in patch],
                             mode=["bilinear", "nearest"][: len(keys)], padding_mode="border"))
        t.append(RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)))
    else:
        for axis in range(dims):
            t.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis))
        axes = _rotation_axes(patch)
        if axes is not None:
            t.append(RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=axes))
    if spatial and (rotate_degrees or scale):
        t.append(RandAffined(keys=keys, prob=0.5,
                             rotate_range=[math.radians(float(rotate_degrees))]
                             * (1 if dims == 2 else 3),
                             scale_range=[float(scale)] * dims,
                             mode=["bilinear", "nearest"][: len(keys)], padding_mode="border"))
    t.append(RandScaleIntensityd(keys="image", factors=0.1, prob=0.5))
    t.append(RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5))
    return Compose(t)


def build_transforms(plan: Mapping[str, Any], train: bool, spatial: bool = True,
                     rotate_degrees: float = 0.0, scale: float = 0.0) -> Compose:
    """The full pipeline: preprocessing, then augmentation when ``train``.

    ``CacheDataset``/``PersistentDataset`` cache everything up to the first random transform,
    i.e. the whole deterministic part.

    Args:
        plan: from :func:`capsmed.data.fingerprint.make_plan`.
        train: add the random augmentation.
        spatial: with ``train``, its spatial part too (:func:`build_augment_transforms`).
        rotate_degrees: with ``train``, random rotations up to this many degrees.
        scale: with ``train``, random scalings by up to this share.

    Returns:
        A flat ``Compose`` (see :func:`build_preprocess_transforms` and
        :func:`build_augment_transforms` for shapes).
    """
    steps = list(build_preprocess_transforms(plan).transforms)
    if train:
        steps += list(build_augment_transforms(plan, spatial=spatial,
                                               rotate_degrees=rotate_degrees,
                                               scale=scale).transforms)
    return Compose(steps)
