"""DICOMweb client setup: credentials from the environment or netrc, never from the URL or a log."""

from __future__ import annotations

import socket

import pytest

from capsmed.dicom.web import DicomWeb
from capsmed.errors import CapsmedError
from tests.pipeline_helpers import run_cli


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch):
    for key in ("CAPSMED_DICOMWEB_TOKEN", "CAPSMED_DICOMWEB_USER", "CAPSMED_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(key, raising=False)


def test_token_from_environment_is_a_bearer_header(monkeypatch):
    monkeypatch.setenv("CAPSMED_DICOMWEB_TOKEN", "tok-123")
    server = DicomWeb("http://pacs.invalid/dicom-web")
    assert server.client._session.headers["Authorization"] == "Bearer tok-123"
    assert server.client._session.auth is None


def test_user_and_password_from_environment_are_basic_auth(monkeypatch):
    monkeypatch.setenv("CAPSMED_DICOMWEB_USER", "alice")
    monkeypatch.setenv("CAPSMED_DICOMWEB_PASSWORD", "s3cret")
    server = DicomWeb("http://pacs.invalid/dicom-web")
    assert server.client._session.auth == ("alice", "s3cret")


def test_netrc_entry_is_used_when_the_environment_has_none(monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.invalid login bob password fromnetrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server = DicomWeb("http://pacs.invalid/dicom-web")
    session = server.client._session
    assert session.auth is None and "Authorization" not in session.headers
    prepared = session.prepare_request(__import__("requests").Request(
        "GET", "http://pacs.invalid/dicom-web/studies"))
    assert prepared.headers["Authorization"].startswith("Basic ")


def test_credentials_in_the_url_are_refused_without_echoing_them():
    with pytest.raises(CapsmedError) as info:
        DicomWeb("http://alice:s3cret@pacs.invalid/dicom-web")
    assert "s3cret" not in str(info.value) and "environment" in str(info.value)


def test_unreachable_server_is_one_line_naming_the_study_and_no_password_in_the_log(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CAPSMED_DICOMWEB_USER", "alice")
    monkeypatch.setenv("CAPSMED_DICOMWEB_PASSWORD", "s3cret")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "predict.log"
    status = run_cli("-vv", "--log", log, "predict", "--model", tmp_path / "best.pt", "--dicomweb",
                     f"http://127.0.0.1:{port}/dicom-web", "--study", "1.2.3.4", "--out",
                     tmp_path / "o")
    assert status == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "capsmed: error" in x]
    assert len(lines) == 1 and "study 1.2.3.4" in lines[0] and "cannot connect" in lines[0]
    assert "s3cret" not in err and "s3cret" not in log.read_text()


def test_study_options_need_a_server(tmp_path, capsys):
    assert run_cli("predict", "--model", tmp_path / "best.pt", "--study", "1.2.3") == 2
    assert "need --dicomweb URL" in capsys.readouterr().err


def test_pacs_tests_skip_with_the_install_command_or_fail_when_ci_requires_them(monkeypatch):
    from tests.dicom import dicom_helpers

    monkeypatch.setattr(dicom_helpers, "which", lambda name: None)
    monkeypatch.delenv("CAPSMED_REQUIRE_PACS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"\.ci/pacs/install\.sh"):
        dicom_helpers.pacs_tools()
    monkeypatch.setenv("CAPSMED_REQUIRE_PACS", "1")
    with pytest.raises(pytest.fail.Exception, match="CAPSMED_REQUIRE_PACS=1 but needs Orthanc"):
        dicom_helpers.pacs_tools()
