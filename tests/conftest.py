"""Shared fixtures: real data from ../shared/data when present, tiny temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.require import real_data

# pytester: tests/test_require.py runs small pytest sessions to check the skip-or-fail rule.
pytest_plugins = ["pytester"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ``../shared/data``.

    Skips the test when it is absent, or fails it under ``CAPSMED_REQUIRE_DATA=1`` (CI).
    """
    return real_data(SHARED_DATA)
