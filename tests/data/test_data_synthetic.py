"""Synthetic demo generators: determinism, label classes, class-dependent content."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from capsmed.data.synthetic import class_sequence, classification_case, segmentation_case


@pytest.mark.parametrize("size", [(32, 40), (24, 28, 20)])
def test_segmentation_case_shapes_classes_determinism(size):
    img, lab = segmentation_case(size, num_classes=4, seed=3, index=0)
    assert img.shape == lab.shape == size
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    img2, lab2 = segmentation_case(size, num_classes=4, seed=3, index=0)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
    img3, _ = segmentation_case(size, num_classes=4, seed=3, index=1)
    assert not np.array_equal(img, img3)


def test_segmentation_dataset_has_several_foreground_classes():
    labels = set()
    for i in range(6):
        _, lab = segmentation_case((40, 40, 40), num_classes=3, seed=0, index=i)
        labels |= set(np.unique(lab).tolist())
    assert labels == {0, 1, 2}


def test_classification_classes_differ_by_content_not_mean_intensity():
    n, k = 60, 2
    classes = class_sequence(n, k, seed=0)
    assert classes.count(0) == classes.count(1) == n // 2
    means, blobs = [], []
    for i, c in enumerate(classes):
        img = classification_case((28, 28), c, k, seed=0, index=i, noise=0.1)
        means.append(img.mean())
        lo = np.percentile(img, 1)
        hi = img.max()
        mask = img > lo + 0.45 * (hi - lo)
        blobs.append(ndimage.label(mask)[1])
    means, blobs, y = np.array(means), np.array(blobs), np.array(classes)
    # mean intensity alone: the classes overlap heavily (best threshold is far from perfect)
    best = max(np.mean((means > t) == y) for t in means)
    best = max(best, max(np.mean((means <= t) == y) for t in means))
    assert best < 0.85
    # the content differs: the many-small-objects class has more connected blobs on average
    assert blobs[y == 1].mean() > 1.5 * blobs[y == 0].mean()


def test_classification_case_3d_and_determinism():
    a = classification_case((20, 20, 20), 1, 3, seed=1, index=2)
    b = classification_case((20, 20, 20), 1, 3, seed=1, index=2)
    assert a.shape == (20, 20, 20) and np.array_equal(a, b)


def test_generators_reject_bad_arguments():
    with pytest.raises(ValueError, match="size must be"):
        segmentation_case((7, 8), 3, 0, 0)
    with pytest.raises(ValueError, match="num_classes must be"):
        segmentation_case((20, 20), 1, 0, 0)
    with pytest.raises(ValueError, match="cls must be in"):
        classification_case((20, 20), 2, 2, 0, 0)
