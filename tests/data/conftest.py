"""Fixtures for capsmed.data tests (builders live in data_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import make_dicom_dir, make_msd


@pytest.fixture
def msd_factory(tmp_path: Path) -> Callable[..., Path]:
    return lambda n=3, **kw: make_msd(tmp_path / "msd", n=n, **kw)


@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    return make_dicom_dir(tmp_path / "dicom")


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    path = shared_data / "msd_hippocampus_subset"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def breastmnist(shared_data: Path) -> Path:
    path = shared_data / "medmnist" / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def adrenalmnist(shared_data: Path) -> Path:
    path = shared_data / "medmnist" / "adrenalmnist3d.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path
