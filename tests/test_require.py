"""The skip-or-fail rule: what a test needs from outside the repository, CI requires."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.require import REQUIREMENTS, real_data, required, skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_requirements(monkeypatch):
    for name in REQUIREMENTS:
        monkeypatch.delenv(f"CAPSMED_REQUIRE_{name}", raising=False)
    return monkeypatch


@pytest.mark.parametrize("requirement", REQUIREMENTS)
def test_skips_unless_required_then_fails_naming_the_variable(no_requirements, requirement):
    with pytest.raises(pytest.skip.Exception, match="^Orthanc is missing$"):
        skip_or_fail(requirement, "Orthanc is missing")
    no_requirements.setenv(f"CAPSMED_REQUIRE_{requirement}", "0")
    assert not required(requirement)
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail(requirement, "Orthanc is missing")
    no_requirements.setenv(f"CAPSMED_REQUIRE_{requirement}", "1")
    assert required(requirement)
    with pytest.raises(pytest.fail.Exception,
                       match=f"^CAPSMED_REQUIRE_{requirement}=1 but Orthanc is missing$"):
        skip_or_fail(requirement, "Orthanc is missing")


def test_requirement_is_one_of_the_four(no_requirements):
    with pytest.raises(ValueError, match="requirement must be one of SLURM, BROWSER, PACS, DATA, "
                                         "got 'GPU'"):
        skip_or_fail("GPU", "no GPU")


def test_real_data_is_returned_when_present_and_skipped_or_failed_when_absent(no_requirements,
                                                                               tmp_path):
    assert real_data(tmp_path) == tmp_path
    absent = tmp_path / "medmnist" / "breastmnist.npz"
    with pytest.raises(pytest.skip.Exception, match="breastmnist.npz is absent"):
        real_data(absent)
    no_requirements.setenv("CAPSMED_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception,
                       match="^CAPSMED_REQUIRE_DATA=1 but .*breastmnist.npz is absent"):
        real_data(absent)


def test_shared_data_fixture_skips_locally_and_fails_in_ci(no_requirements, pytester):
    """The real ``shared_data`` fixture in a pytest session of its own, ``../shared/data`` absent."""
    pytester.makeconftest(textwrap.dedent("""
        from pathlib import Path

        import tests.conftest as shared
        from tests.conftest import shared_data  # noqa: F401 - the fixture under test

        shared.SHARED_DATA = Path(__file__).parent / "absent" / "data"
    """))
    pytester.makepyfile(test_reads="def test_reads(shared_data):\n    assert shared_data\n")
    no_requirements.setenv("PYTHONPATH", str(REPO_ROOT))

    local = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    local.assert_outcomes(skipped=1)
    local.stdout.fnmatch_lines(["*absent/data is absent*"])

    no_requirements.setenv("CAPSMED_REQUIRE_DATA", "1")
    ci = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    ci.assert_outcomes(errors=1)
    ci.stdout.fnmatch_lines(["*CAPSMED_REQUIRE_DATA=1 but *absent/data is absent*"])
    assert ci.ret != 0
