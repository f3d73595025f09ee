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


def test_http_202_with_failed_sop_sequence_names_the_failed_instances(tmp_path):
    """A server that accepts one instance of two (HTTP 202, PS3.18 10.5.3): one line naming it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pydicom

    from tests.dicom.dicom_helpers import blob_volume, oblique_mr_affine, write_mr_series

    image, _ = blob_volume((8, 8, 2), seed=1)
    folder = write_mr_series(image * 100 + 100, oblique_mr_affine((8, 8, 2)), tmp_path / "s",
                             seed="202")
    good, bad = (pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm")))
    answer = {"00081198": {"vr": "SQ", "Value": [{
        "00081150": {"vr": "UI", "Value": [str(bad.SOPClassUID)]},
        "00081155": {"vr": "UI", "Value": [str(bad.SOPInstanceUID)]},
        "00081197": {"vr": "US", "Value": [0xA900]}}]}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(answer).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(CapsmedError) as info:
            DicomWeb(f"http://127.0.0.1:{server.server_address[1]}/dicom-web").store([good, bad])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert str(info.value).endswith(
        f"failed for 1 of 2 instance(s) (HTTP 202): {bad.SOPInstanceUID} (data set does not "
        "match SOP class)")
