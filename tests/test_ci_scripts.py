"""CI scripts: every requirement required, and one ``apt-get update`` per run (``.ci/apt.sh``)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.require import REQUIREMENTS

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALLERS = (".ci/slurm/install.sh", ".ci/install_browser.sh", ".ci/pacs/install.sh")


def _updates(tmp_path: Path, stamp: Path | None, calls: int) -> list[str]:
    """Call ``ci_apt_update`` ``calls`` times, each in its own bash as each installer does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "apt.log"
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$*" >>"{log}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CAPSMED_APT_STAMP"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if stamp is not None:
        env["CAPSMED_APT_STAMP"] = str(stamp)
    for _ in range(calls):
        subprocess.run(["bash", "-euo", "pipefail", "-c",
                        f'source "{REPO_ROOT / ".ci" / "apt.sh"}"; ci_apt_update'],
                       env=env, check=True, capture_output=True, timeout=30)
    return log.read_text().splitlines() if log.exists() else []


def test_apt_lists_are_updated_once_per_ci_run(tmp_path):
    stamp = tmp_path / "run" / "apt-lists-updated"
    stamp.parent.mkdir()
    assert _updates(tmp_path, stamp, 3) == ["update -qq"]
    assert stamp.is_file()


def test_standalone_installers_update_the_lists_themselves(tmp_path):
    assert _updates(tmp_path, None, 2) == ["update -qq", "update -qq"]


@pytest.mark.parametrize("installer", INSTALLERS)
def test_every_installer_updates_through_the_shared_step(installer):
    text = (REPO_ROOT / installer).read_text()
    assert re.search(r'^source "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/(\.\./)?apt\.sh"$', text,
                     re.MULTILINE), installer
    assert re.search(r"^ci_apt_update( \$SUDO)?$", text, re.MULTILINE), installer
    assert not re.search(r"apt-get\s+update", text), installer


def test_ci_run_requires_every_service_and_the_data_as_root_or_not():
    text = (REPO_ROOT / ".ci" / "run").read_text()
    exports = re.search(r"^export (CAPSMED_REQUIRE_\w+=1(?: CAPSMED_REQUIRE_\w+=1)*)$", text,
                        re.MULTILINE)
    assert exports, "no top-level export of CAPSMED_REQUIRE_*"
    # every requirement the tests know (tests/require.py), so CI skips none of them
    assert sorted(exports.group(1).split()) == sorted(f"CAPSMED_REQUIRE_{n}=1" for n in REQUIREMENTS)
    assert text.index(exports.group(0)) < text.index('if [ "$(id -u)"')  # not under a root branch
