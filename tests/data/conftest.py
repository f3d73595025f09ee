"""Fixtures for capsmed.data tests (builders live in data_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import make_dicom_dir, make_msd

from tests.require import real_data


@pytest.fixture
def msd_factory(tmp_path: Path) -> Callable[..., Path]:
    return lambda n=3, **kw: make_msd(tmp_path / "msd", n=n, **kw)


@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    return make_dicom_dir(tmp_path / "dicom")


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    return real_data(shared_data / "msd_hippocampus_subset" / "dataset.json").parent


@pytest.fixture(scope="session")
def breastmnist(shared_data: Path) -> Path:
    return real_data(shared_data / "medmnist" / "breastmnist.npz")


@pytest.fixture(scope="session")
def adrenalmnist(shared_data: Path) -> Path:
    return real_data(shared_data / "medmnist" / "adrenalmnist3d.npz")
