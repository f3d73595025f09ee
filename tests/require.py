"""One rule for tests that need something outside the repository: skip, or fail where CI requires it.

A test that needs the SLURM test cluster, headless Chromium, Orthanc and dciodvfy, or real data
(``../shared/data``, pydicom's test files) skips with the command or folder that would provide it.
``.ci/run`` sets ``CAPSMED_REQUIRE_SLURM``, ``CAPSMED_REQUIRE_BROWSER``, ``CAPSMED_REQUIRE_PACS`` and
``CAPSMED_REQUIRE_DATA`` to ``1``: there each of those skips is a failure instead, so CI never passes
by leaving out what it exists to test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

#: What a test may need from outside the repository; ``CAPSMED_REQUIRE_<NAME>=1`` requires it.
REQUIREMENTS = ("SLURM", "BROWSER", "PACS", "DATA")


def required(requirement: str) -> bool:
    """Whether ``CAPSMED_REQUIRE_<requirement>`` is ``1`` in the environment.

    Raises:
        ValueError: if ``requirement`` is not one of :data:`REQUIREMENTS`.
    """
    if requirement not in REQUIREMENTS:
        raise ValueError(f"requirement must be one of {', '.join(REQUIREMENTS)}, got {requirement!r}")
    return os.environ.get(f"CAPSMED_REQUIRE_{requirement}") == "1"


def skip_or_fail(requirement: str, reason: str) -> NoReturn:
    """Skip the current test because ``reason``; fail it instead when the requirement is required.

    Args:
        requirement: One of :data:`REQUIREMENTS`.
        reason: What is missing and how to get it, e.g. the install command.

    Raises:
        pytest.fail.Exception: ``"CAPSMED_REQUIRE_<requirement>=1 but <reason>"`` when required.
        pytest.skip.Exception: ``reason`` otherwise.
    """
    if required(requirement):
        pytest.fail(f"CAPSMED_REQUIRE_{requirement}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def real_data(path: Path) -> Path:
    """``path`` when it exists; otherwise skip, or fail under ``CAPSMED_REQUIRE_DATA=1``."""
    if not path.exists():
        skip_or_fail("DATA", f"{path} is absent (real data: only the project's CI and dev "
                             "machines have ../shared/data)")
    return path
