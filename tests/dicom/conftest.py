"""Fixtures for the DICOM tests: a tiny trained segmenter and DICOM MR series to predict."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.dicom.dicom_helpers import (
    blob_volume,
    oblique_mr_affine,
    train_tiny_classifier,
    train_tiny_segmenter,
    write_mr_series,
)
from tests.require import real_data


@pytest.fixture(scope="session")
def seg_checkpoint(tmp_path_factory) -> Path:
    """``best.pt`` of a tiny 3D UNet that finds two box-shaped structures."""
    return train_tiny_segmenter(tmp_path_factory.mktemp("dicom_model"))


@pytest.fixture(scope="session")
def cls_checkpoint(tmp_path_factory) -> Path:
    """``best.pt`` of a tiny 3D CNN classifier with two classes."""
    return train_tiny_classifier(tmp_path_factory.mktemp("dicom_classifier"))


@pytest.fixture
def oblique_series(tmp_path) -> Path:
    """Box structures in an oblique, anisotropic MR series (pydicom's oblique MR geometry)."""
    shape = (24, 26, 20)
    image, _ = blob_volume(shape, seed=7)
    data = (image - image.min()) / (image.max() - image.min()) * 1000
    return write_mr_series(data, oblique_mr_affine(shape), tmp_path / "oblique", seed="oblique")


@pytest.fixture
def hippocampus_series(shared_data, tmp_path) -> Path:
    """The first MSD hippocampus case of ../shared/data as a DICOM MR series."""
    path = real_data(shared_data / "msd_hippocampus_subset" / "imagesTr" / "hippocampus_001.nii.gz")
    img = nib.load(str(path))
    return write_mr_series(np.asarray(img.dataobj, dtype=np.float32), img.affine,
                           tmp_path / "hippocampus_001", seed="hippocampus_001")
