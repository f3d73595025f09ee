"""Back to the PACS: a series goes in from a real Orthanc, a SEG and an SR come back into it.

Each test module run starts its own Orthanc (Debian 12: orthanc 1.10 + orthanc-dicomweb 1.7) on free
ports with a throw-away storage folder, and stops it by pid. Without the packages the tests skip with
the install command; with CAPSMED_REQUIRE_PACS=1 (CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests

from tests.dicom.dicom_helpers import check_dicom_outputs, pacs_tools, running_orthanc
from tests.pipeline_helpers import run_cli

pytestmark = pytest.mark.pacs

@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """``(dicomweb_url, rest_url)`` of a fresh Orthanc without authentication."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as rest:
        assert requests.get(f"{rest}/plugins/dicom-web", timeout=10).ok
        yield f"{rest}/dicom-web", rest


def upload(rest: str, folder: Path) -> str:
    """POST every file of a series folder to Orthanc; returns the StudyInstanceUID."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for f in files:
        requests.post(f"{rest}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
    return str(pydicom.dcmread(files[0]).StudyInstanceUID)


def instance_count(rest: str) -> int:
    return int(requests.get(f"{rest}/statistics", timeout=10).json()["CountInstances"])


def dciodvfy_errors(path: Path) -> list[str]:
    _, binary = pacs_tools()
    res = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("which", ["hippocampus_series", "oblique_series"])
def test_series_in_from_orthanc_seg_and_sr_back_into_it(orthanc, seg_checkpoint, which, request,
                                                        tmp_path):
    url, rest = orthanc
    series = request.getfixturevalue(which)
    study = upload(rest, series)
    series_uid = str(pydicom.dcmread(next(series.glob("*.dcm"))).SeriesInstanceUID)
    out = tmp_path / "pred"
    assert run_cli("-q", "predict", "--model", seg_checkpoint, "--dicomweb", url, "--study", study,
                   "--series", series_uid, "--store", "--out", out) == 0
    record = check_dicom_outputs(out, series_uid, series)
    assert url in (out / f"{series_uid}.html").read_text()  # the report says where they went
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url)
    for obj in record["objects"]:
        assert obj["stored_to"] == [url]
        back = client.retrieve_instance(study, obj["series_instance_uid"], obj["sop_instance_uid"])
        local = pydicom.dcmread(out / obj["file"])
        assert back.SOPInstanceUID == local.SOPInstanceUID
        if obj["kind"] == "SEG":  # the SEG read back from Orthanc still matches, voxel for voxel
            path = tmp_path / "from_orthanc_seg.dcm"
            back.save_as(path, enforce_file_format=True)
            shutil.copy(path, out / obj["file"])
            check_dicom_outputs(out, series_uid, series)
            assert hd.seg.segread(path).SOPInstanceUID == obj["sop_instance_uid"]
        assert dciodvfy_errors(out / obj["file"]) == []


def test_bad_requests_are_one_line_and_leave_the_server_unchanged(orthanc, seg_checkpoint,
                                                                  tmp_path, capsys):
    from tests.data.data_helpers import pydicom_series
    from tests.dicom.dicom_helpers import blob_volume, oblique_mr_affine, write_mr_series

    url, rest = orthanc
    # a series of mixed orientations (pydicom's radial MR series) and one with a missing slice
    radial = tmp_path / "radial"
    radial.mkdir()
    for f in pydicom_series()["studyC"]:
        shutil.copy(f, radial / Path(f).name)
    image, _ = blob_volume((20, 22, 16), seed=3)
    gap = write_mr_series(image * 500 + 500, oblique_mr_affine((20, 22, 16)), tmp_path / "gap",
                          seed="gap")
    sorted(gap.glob("*.dcm"))[5].unlink()
    cases = [(upload(rest, radial), str(pydicom.dcmread(next(radial.iterdir())).SeriesInstanceUID),
              "slices have different orientations"),
             (upload(rest, gap), str(pydicom.dcmread(next(gap.glob("*.dcm"))).SeriesInstanceUID),
              "slice(s) missing")]
    study = cases[1][0]
    cases += [("1.2.3.4.5.6.7", None, "study 1.2.3.4.5.6.7 not found"),
              (study, "1.2.3.999", "series 1.2.3.999 not found")]
    # a non-DICOM upload is refused by the server itself and changes nothing
    before = instance_count(rest)
    assert requests.post(f"{rest}/instances", data=b"not a DICOM file", timeout=10).status_code \
        >= 400
    assert instance_count(rest) == before
    for study_uid, series_uid, message in cases:
        args = ["predict", "--model", seg_checkpoint, "--dicomweb", url, "--study", study_uid,
                "--store", "--out", tmp_path / "o"]
        if series_uid:
            args += ["--series", series_uid]
        assert run_cli(*args) == 2, message
        err = [x for x in capsys.readouterr().err.splitlines() if "capsmed: error" in x]
        assert len(err) == 1 and message in err[0], err
        assert (series_uid or study_uid) in err[0]
        assert instance_count(rest) == before
    # an object without pixels in a non-image series (an SR): named as such
    sr = pydicom.dcmread(next(gap.glob("*.dcm")))
    del sr.PixelData
    sr.Modality = "SR"
    sr.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["sr series"])
    sr.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["sr instance"])
    requests.post(f"{rest}/instances", data=_bytes(sr), timeout=10).raise_for_status()
    before = instance_count(rest)
    assert run_cli("predict", "--model", seg_checkpoint, "--dicomweb", url, "--study", study,
                   "--series", sr.SeriesInstanceUID, "--store", "--out", tmp_path / "o") == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "capsmed: error" in x]
    assert len(err) == 1 and f"series {sr.SeriesInstanceUID} is a SR series" in err[0]
    assert instance_count(rest) == before


def _bytes(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicomweb_dataset_source_is_cached_once_then_read_as_dicom(orthanc, tmp_path):
    from capsmed.config import validate_config
    from capsmed.data.sources import prepare_dataset
    from capsmed.errors import CapsmedError
    from tests.dicom.dicom_helpers import blob_volume, oblique_mr_affine, write_mr_series

    url, rest = orthanc
    rows = ["case_id,study_uid,series_uid,class"]
    for k in range(3):
        image, _ = blob_volume((16, 18, 10), seed=k)
        folder = write_mr_series(image * 400 + 400, oblique_mr_affine((16, 18, 10)),
                                 tmp_path / "src" / f"s{k}", seed=f"source{k}", patient_id=f"Q{k}")
        study = upload(rest, folder)
        series = str(pydicom.dcmread(next(folder.glob("*.dcm"))).SeriesInstanceUID)
        rows.append(f"c{k},{study},{series if k else ''},{k % 2}")  # c0: the study's only series
    listing = tmp_path / "studies.csv"
    listing.write_text("\n".join(rows) + "\n")
    cfg = validate_config({"datasets": {"pacs": {
        "source": "dicomweb", "dicomweb_url": url, "path": str(listing),
        "task": "classification", "spatial_dims": 3}}})
    out = tmp_path / "results/pacs/data"
    doc = prepare_dataset(cfg["datasets"]["pacs"], out, 0)
    assert [c["case_id"] for c in doc["cases"]] == ["c0", "c1", "c2"]
    assert [c["class"] for c in doc["cases"]] == [0, 1, 0]
    assert [c["patient_id"] for c in doc["cases"]] == ["Q0", "Q1", "Q2"]
    for c in doc["cases"]:
        assert Path(c["image"]).is_relative_to(out / "dicomweb")
        assert len(list(Path(c["image"]).glob("*.dcm"))) == 10
    stamps = {p: p.stat().st_mtime_ns for p in (out / "dicomweb").rglob("*.dcm")}
    # cached: the second run reads nothing from the server (a dead URL would fail otherwise)
    dead = dict(cfg["datasets"]["pacs"], dicomweb_url="http://127.0.0.1:9/dicom-web")
    assert prepare_dataset(dead, out, 0)["cases"] == doc["cases"]
    assert {p: p.stat().st_mtime_ns for p in (out / "dicomweb").rglob("*.dcm")} == stamps
    # a study that is not on the server: one line naming it
    listing.write_text(rows[0] + "\nc9,1.2.3.9,,0\n")
    with pytest.raises(CapsmedError, match=r"study 1\.2\.3\.9 not found"):
        prepare_dataset(cfg["datasets"]["pacs"], tmp_path / "other", 0)


def test_credentials_from_netrc_or_environment_against_an_orthanc_that_needs_them(
        tmp_path, seg_checkpoint, oblique_series, monkeypatch, capsys):
    for key in ("CAPSMED_DICOMWEB_TOKEN", "CAPSMED_DICOMWEB_USER", "CAPSMED_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with running_orthanc(tmp_path / "orthanc", AuthenticationEnabled=True,
                         RegisteredUsers={"alice": "s3cret-pw"}) as rest:
        url = f"{rest}/dicom-web"
        files = sorted(oblique_series.glob("*.dcm"))
        for f in files:
            requests.post(f"{rest}/instances", data=f.read_bytes(), auth=("alice", "s3cret-pw"),
                          timeout=30).raise_for_status()
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        log = tmp_path / "predict.log"
        args = ["--log", log, "predict", "--model", seg_checkpoint, "--dicomweb", url,
                "--study", study, "--out", tmp_path / "out"]
        # no credentials: one line with the HTTP status, naming the study
        assert run_cli(*args) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "capsmed: error" in x]
        assert len(err) == 1 and f"study {study}: HTTP 401" in err[0]
        # a netrc entry for the host
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login alice password s3cret-pw\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        assert run_cli(*args) == 0
        # the environment
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        monkeypatch.setenv("CAPSMED_DICOMWEB_USER", "alice")
        monkeypatch.setenv("CAPSMED_DICOMWEB_PASSWORD", "s3cret-pw")
        assert run_cli("-vv", *args, "--store") == 0
        assert "s3cret-pw" not in capsys.readouterr().err
        assert "s3cret-pw" not in log.read_text()
        stats = requests.get(f"{rest}/statistics", auth=("alice", "s3cret-pw"), timeout=10).json()
        assert stats["CountInstances"] == len(files) + 2  # the SEG and the SR


def _small_series(tmp_path, name: str):
    from tests.dicom.dicom_helpers import blob_volume, oblique_mr_affine, write_mr_series

    image, _ = blob_volume((16, 18, 8), seed=11)
    return write_mr_series(image * 400 + 400, oblique_mr_affine((16, 18, 8)), tmp_path / name,
                           seed=name, patient_id=f"P-{name}")


def test_a_store_orthanc_refuses_in_part_names_the_failed_instance(orthanc, tmp_path):
    from capsmed.dicom.web import DicomWeb
    from capsmed.errors import CapsmedError

    url, rest = orthanc
    files = sorted(_small_series(tmp_path, "partial").glob("*.dcm"))
    good, bad = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    bad.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["another study"])
    before = instance_count(rest)
    with pytest.raises(CapsmedError) as info:
        DicomWeb(url).store([good, bad], study=str(good.StudyInstanceUID))
    message = str(info.value)
    assert f"storing to study {good.StudyInstanceUID} failed for 1 of 2 instance(s)" in message
    assert str(bad.SOPInstanceUID) in message and str(good.SOPInstanceUID) not in message
    assert "\n" not in message
    assert instance_count(rest) == before + 1  # Orthanc kept the instance that matched


@contextlib.contextmanager
def flaky_proxy(target: str, failures: list[str]):
    """An HTTP proxy on 127.0.0.1 in front of ``target`` that fails the first requests.

    Args:
        target: The server's base URL (``http://127.0.0.1:port``).
        failures: What the first requests get, in order: ``"drop"`` (the connection is closed
            without an answer) or an HTTP status (``"503"``); later requests are forwarded.

    Yields:
        ``(proxy base URL, list of the request lines it received)``.
    """
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    plan, seen = list(failures), []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.append(f"{self.command} {self.path}")
            action = plan.pop(0) if plan else None
            if action == "drop":
                self.close_connection = True
                return
            if action is not None:
                self.send_response(int(action))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "connection")}
            answer = requests.request(self.command, target + self.path, data=body,
                                      headers=headers, timeout=30)
            self.send_response(answer.status_code)
            for key in ("Content-Type",):
                if key in answer.headers:
                    self.send_header(key, answer.headers[key])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_store_is_retried_after_a_dropped_connection_and_a_503(orthanc, tmp_path):
    from capsmed.dicom.web import DicomWeb

    url, rest = orthanc
    files = sorted(_small_series(tmp_path, "retried").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files[:2]]
    before = instance_count(rest)
    with flaky_proxy(rest, ["drop", "503"]) as (proxy, seen):
        assert DicomWeb(f"{proxy}/dicom-web").store(datasets) == f"{proxy}/dicom-web"
    study = datasets[0].StudyInstanceUID
    assert seen == [f"POST /dicom-web/studies/{study}"] * 3
    assert instance_count(rest) == before + 2


def test_a_study_with_a_scout_predicts_its_image_series(orthanc, seg_checkpoint, oblique_series,
                                                        tmp_path):
    from tests.dicom.dicom_helpers import write_scout

    url, rest = orthanc
    scout = write_scout(oblique_series, tmp_path / "scout")
    study = upload(rest, oblique_series)
    assert upload(rest, scout) == study
    image_uid = str(pydicom.dcmread(next(oblique_series.glob("*.dcm"))).SeriesInstanceUID)
    scout_uid = str(pydicom.dcmread(next(scout.glob("*.dcm"))).SeriesInstanceUID)
    out, log = tmp_path / "pred", tmp_path / "predict.log"
    assert run_cli("--log", log, "predict", "--model", seg_checkpoint, "--dicomweb", url,
                   "--study", study, "--out", out) == 0
    assert (out / f"{image_uid}_dicom.json").is_file()
    assert not list(out.glob(f"{scout_uid}*"))
    text = log.read_text()
    assert f"skipping series {scout_uid} (scout): a localizer (ImageType LOCALIZER)" in text
