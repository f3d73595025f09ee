"""Deterministic demo data from MONAI's ``create_test_image_2d`` / ``create_test_image_3d``.

Segmentation: noisy images of random balls whose label map holds ``num_classes - 1`` foreground
classes (plus background 0). Classification: class ``k`` is drawn with a different *number and size*
of balls (class 0: a few large ones, the last class: many small ones) with roughly the same covered
volume, then each image gets a random gain and offset, so the mean intensity alone does not tell the
classes apart while the texture (object count and size) does.

Every array depends only on the seed and the case index, so the same config always writes the same
files, byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _radii(size: Sequence[int]) -> tuple[int, int]:
    """(rad_min, rad_max) that MONAI's generators accept for an image of ``size``."""
    smallest = min(size)
    rad_max = max(3, smallest // 5)
    rad_min = max(2, smallest // 12)
    rad_max = min(rad_max, (smallest - 1) // 2)
    if rad_max <= rad_min:
        rad_min = max(1, rad_max - 1)
    return rad_min, rad_max


def _generate(size: Sequence[int], num_objs: int, rad_min: int, rad_max: int, noise: float,
              num_seg_classes: int, rs: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    from monai.data import create_test_image_2d, create_test_image_3d

    if len(size) == 2:
        return create_test_image_2d(size[0], size[1], num_objs=num_objs, rad_max=rad_max,
                                    rad_min=rad_min, noise_max=noise,
                                    num_seg_classes=num_seg_classes, random_state=rs)
    return create_test_image_3d(size[0], size[1], size[2], num_objs=num_objs, rad_max=rad_max,
                                rad_min=rad_min, noise_max=noise, num_seg_classes=num_seg_classes,
                                random_state=rs)


def segmentation_case(size: Sequence[int], num_classes: int, seed: int, index: int,
                      noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic segmentation case.

    Args:
        size: spatial size, 2 or 3 integers (each >= 8).
        num_classes: label classes including background (>= 2).
        seed: dataset seed.
        index: case index (each case has its own random stream).
        noise: maximum uniform noise added before rescaling to [0, 1].

    Returns:
        ``image`` float32 of shape ``size`` in [0, 1] and ``label`` uint8 of shape ``size`` with
        values in ``0 .. num_classes - 1``.

    Raises:
        ValueError: ``size`` or ``num_classes`` out of range.
    """
    if len(size) not in (2, 3) or min(size) < 8:
        raise ValueError(f"size must be 2 or 3 integers >= 8, got {list(size)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    rs = np.random.RandomState(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0])
    rad_min, rad_max = _radii(size)
    num_objs = 4 + 2 * (num_classes - 1)
    image, label = _generate(size, num_objs, rad_min, rad_max, noise, num_classes - 1, rs)
    return image.astype(np.float32), label.astype(np.uint8)


def classification_case(size: Sequence[int], cls: int, num_classes: int, seed: int, index: int,
                        noise: float = 0.1) -> np.ndarray:
    """One synthetic classification image of class ``cls``.

    Class ``k`` has ``n_k`` balls of radius about ``r_k`` with ``r_k`` shrinking geometrically from
    ``min(size) / 5`` (class 0) to ``min(size) / 12`` (last class) and ``n_k * r_k ** d`` roughly
    constant; a random gain in [0.6, 1.4] and offset in [-0.1, 0.1] hide the small remaining
    difference in mean intensity.

    Args:
        size: spatial size, 2 or 3 integers (each >= 8).
        cls: the class, ``0 <= cls < num_classes``.
        num_classes: number of classes (>= 2).
        seed: dataset seed.
        index: case index.
        noise: maximum uniform noise added before rescaling.

    Returns:
        float32 image of shape ``size``.

    Raises:
        ValueError: arguments out of range.
    """
    if len(size) not in (2, 3) or min(size) < 8:
        raise ValueError(f"size must be 2 or 3 integers >= 8, got {list(size)}")
    if not 0 <= cls < num_classes:
        raise ValueError(f"cls must be in [0, {num_classes}), got {cls}")
    rs = np.random.RandomState(np.random.SeedSequence([seed, index, 2]).generate_state(1)[0])
    d = len(size)
    smallest = min(size)
    r_big = max(3.0, smallest / 5)
    r_small = max(2.0, smallest / 12)
    frac = cls / (num_classes - 1)
    r = r_big * (r_small / r_big) ** frac
    n = int(round(min(40, 2 * (r_big / r) ** d)))
    rad_min = max(1, int(round(r * 0.8)))
    rad_max = min(max(rad_min + 1, int(round(r * 1.2)) + 1), (smallest - 1) // 2)
    image, _ = _generate(size, n, rad_min, rad_max, noise, 1, rs)
    gain = rs.uniform(0.6, 1.4)
    offset = rs.uniform(-0.1, 0.1)
    return (image * gain + offset).astype(np.float32)


def class_sequence(num_cases: int, num_classes: int, seed: int) -> list[int]:
    """Balanced, shuffled class of each synthetic case (deterministic by ``seed``)."""
    classes = np.arange(num_cases) % num_classes
    np.random.RandomState(seed).shuffle(classes)
    return [int(c) for c in classes]


def write_synthetic_dataset(task: str, size: Sequence[int], num_cases: int, num_classes: int,
                            seed: int, noise: float, out_dir: Path) -> list[dict]:
    """Write the synthetic cases as NIfTI under ``out_dir/images`` (and ``out_dir/labels``).

    Existing files are overwritten with identical bytes (NIfTI/gzip output is deterministic), so
    callers may skip this when nothing changed.

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        size: spatial size (2 or 3 integers).
        num_cases: number of cases.
        num_classes: labels incl. background (segmentation) or classes (classification).
        seed: generator seed.
        noise: noise amplitude.
        out_dir: the dataset folder (``results/{ds}/data``).

    Returns:
        The case dicts (``case_id`` ``case_000``..., absolute paths, ``patient_id`` = ``case_id``).
    """
    from capsmed.data._io import save_nifti

    cases = []
    classes = class_sequence(num_cases, num_classes, seed) if task == "classification" else None
    for i in range(num_cases):
        cid = f"case_{i:03d}"
        img_path = out_dir / "images" / f"{cid}.nii.gz"
        case: dict = {"case_id": cid, "image": str(img_path.resolve())}
        if task == "segmentation":
            image, label = segmentation_case(size, num_classes, seed, i, noise)
            lab_path = out_dir / "labels" / f"{cid}.nii.gz"
            save_nifti(image, img_path)
            save_nifti(label, lab_path)
            case["label"] = str(lab_path.resolve())
        else:
            assert classes is not None
            image = classification_case(size, classes[i], num_classes, seed, i, noise)
            save_nifti(image, img_path)
            case["class"] = classes[i]
        case["patient_id"] = cid
        cases.append(case)
    logger.info("wrote %d synthetic %s cases under %s", num_cases, task, out_dir)
    return cases
