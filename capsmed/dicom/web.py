"""DICOMweb source and sink: fetch a study's image series (QIDO-RS + WADO-RS), store objects (STOW-RS).

Credentials never come from the config, the command line or the URL, and are never logged. In order:

- ``CAPSMED_DICOMWEB_TOKEN``: sent as ``Authorization: Bearer <token>``;
- ``CAPSMED_DICOMWEB_USER`` and ``CAPSMED_DICOMWEB_PASSWORD``: HTTP basic authentication;
- otherwise a netrc file (``$NETRC``, else ``~/.netrc``) entry for the server's host, which
  ``requests`` reads by itself; no entry means no authentication.

Every failure is one :class:`~capsmed.errors.CapsmedError` line naming the server and the UID.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capsmed.errors import CapsmedError
from capsmed.paths import safe_name

logger = logging.getLogger(__name__)

#: Modalities of series that hold no images a model can read.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC",
                                  "REG", "FID", "AU", "ECG", "PLAN", "OT_SR"})
MODALITY, SERIES_UID, STUDY_UID = "00080060", "0020000E", "0020000D"


def _value(item: dict, tag: str) -> str:
    """First value of a tag in a DICOM JSON object ('' when absent)."""
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _http_problem(exc: Exception) -> str:
    """One line describing a requests exception (status and reason; never headers or bodies)."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect to the server"
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class DicomWeb:
    """A DICOMweb server: the few operations ``capsmed predict --dicomweb`` needs.

    Args:
        url: Base URL of the DICOMweb service (e.g. ``http://pacs:8042/dicom-web``), without
            credentials.
        timeout: Seconds to wait for each HTTP answer.

    Raises:
        CapsmedError: The URL is not http(s) or carries credentials.
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CapsmedError(f"{url}: not an http(s) DICOMweb URL")
        if parts.username or parts.password:
            raise CapsmedError("the DICOMweb URL carries credentials; put them in the environment "
                               "(CAPSMED_DICOMWEB_USER/CAPSMED_DICOMWEB_PASSWORD or "
                               "CAPSMED_DICOMWEB_TOKEN) or a netrc file instead")
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        session = requests.Session()
        token = os.environ.get("CAPSMED_DICOMWEB_TOKEN")
        user, password = (os.environ.get("CAPSMED_DICOMWEB_USER"),
                          os.environ.get("CAPSMED_DICOMWEB_PASSWORD"))
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        elif user and password is not None:
            session.auth = (user, password)
        # else: requests applies a netrc entry for the host ($NETRC or ~/.netrc) on its own.
        self.client = DICOMwebClient(url=self.url, session=session, timeout=timeout)
        # three tries, 1 s and 2 s apart, for a server that hiccups (the default waits 30 s)
        self.client.set_http_retry_params(retry=True, max_attempts=3,
                                          wait_exponential_multiplier=500)

    def image_series(self, study: str, series: str | None = None) -> list[str]:
        """The image series of a study (or the one asked for), checked against the server.

        Args:
            study: StudyInstanceUID.
            series: SeriesInstanceUID, or None for every image series of the study.

        Returns:
            SeriesInstanceUIDs.

        Raises:
            CapsmedError: The server fails, the study or series is not there, or the series (or
                every series of the study) holds no images.
        """
        try:
            found = self.client.search_for_series(study_instance_uid=study)
        except Exception as exc:  # noqa: BLE001 - requests and dicomweb-client raise many types
            raise CapsmedError(f"{self.url}: study {study}: {_http_problem(exc)}") from None
        if not found:
            raise CapsmedError(f"{self.url}: study {study} not found")
        modality = {_value(item, SERIES_UID): _value(item, MODALITY).upper() for item in found}
        if series is not None:
            if series not in modality:
                raise CapsmedError(f"{self.url}: series {series} not found in study {study}")
            if modality[series] in NON_IMAGE_MODALITIES:
                raise CapsmedError(f"{self.url}: series {series} is a {modality[series]} series, "
                                   "not an image series")
            return [series]
        images = sorted(uid for uid, mod in modality.items() if mod not in NON_IMAGE_MODALITIES)
        if not images:
            raise CapsmedError(f"{self.url}: study {study} has no image series (only "
                               f"{', '.join(sorted(set(modality.values())))})")
        return images

    def fetch_series(self, study: str, series: str, cache: Path) -> Path:
        """Retrieve one series into ``cache/<study>/<series>/`` (one file per instance).

        Args:
            study: StudyInstanceUID.
            series: SeriesInstanceUID.
            cache: Local cache folder.

        Returns:
            The series folder, ready for :func:`capsmed.dicom.series.load_series`.

        Raises:
            CapsmedError: The server fails or returns no instances.
        """
        try:
            datasets = self.client.retrieve_series(study, series)
        except Exception as exc:  # noqa: BLE001
            raise CapsmedError(f"{self.url}: series {series}: {_http_problem(exc)}") from None
        if not datasets:
            raise CapsmedError(f"{self.url}: series {series} has no instances")
        folder = Path(cache) / safe_name(study) / safe_name(series)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.dcm"):
            old.unlink()
        for ds in datasets:
            ds.save_as(folder / f"{safe_name(str(ds.SOPInstanceUID))}.dcm",
                       enforce_file_format=True)
        logger.info("%s: retrieved series %s (%d instances) to %s", self.url, series,
                    len(datasets), folder)
        return folder

    def fetch_study(self, study: str, series: str | None, cache: Path) -> list[Path]:
        """Retrieve a study's image series (or the one asked for) into the cache.

        Args:
            study: StudyInstanceUID.
            series: SeriesInstanceUID or None.
            cache: Local cache folder.

        Returns:
            One folder per series.
        """
        return [self.fetch_series(study, uid, cache) for uid in self.image_series(study, series)]

    def store(self, datasets: Sequence[Any]) -> str:
        """STOW-RS the datasets; returns the server URL they went to.

        Raises:
            CapsmedError: The server refuses them (naming their SOP Instance UIDs).
        """
        uids = ", ".join(str(ds.SOPInstanceUID) for ds in datasets)
        try:
            self.client.store_instances(datasets)
        except Exception as exc:  # noqa: BLE001
            raise CapsmedError(f"{self.url}: storing {uids} failed: {_http_problem(exc)}") from None
        return self.url


#: What a dataset source CSV of DICOMweb studies may hold.
SOURCE_COLUMNS = ("case_id", "study_uid", "series_uid", "label", "class", "patient_id")
CACHE_MARKER = "retrieved.json"


def cache_dicomweb_dataset(csv_path: Path, url: str, cache: Path) -> Path:
    """Retrieve the series a CSV lists from a DICOMweb server, once, and write a local manifest.

    The CSV has ``case_id``, ``study_uid``, optional ``series_uid`` (default: the study's only image
    series), ``class`` and/or ``label`` (a NIfTI mask, relative to the CSV) and optional
    ``patient_id``. Each series goes to ``cache/<study>/<series>/`` with a ``retrieved.json`` marker;
    a series whose marker is there is not retrieved again. The manifest ``cache/manifest.csv``
    names the local series folders, so the dataset then reads as a ``dicom`` source.

    Args:
        csv_path: The CSV of studies.
        url: The DICOMweb server.
        cache: The dataset's cache folder (e.g. ``results/{ds}/data/dicomweb``).

    Returns:
        Path of the local manifest.

    Raises:
        CapsmedError: The CSV is unreadable or lacks columns; a study or series is missing, is not
            an image series, or the server fails (one line naming the UID).
    """
    csv_path = Path(csv_path).resolve()
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CapsmedError(f"{csv_path}: cannot be read ({exc})") from None
    if not rows or not {"case_id", "study_uid"} <= set(rows[0]):
        raise CapsmedError(f"{csv_path}: needs a header with case_id and study_uid (and class "
                           "and/or label, optional series_uid, patient_id) and one row per case")
    extra = sorted(set(rows[0]) - set(SOURCE_COLUMNS))
    if extra:
        raise CapsmedError(f"{csv_path}: unknown column(s) {', '.join(extra)}; allowed: "
                           f"{', '.join(SOURCE_COLUMNS)}")
    server = DicomWeb(url)
    out_rows = []
    for row in rows:
        study = (row.get("study_uid") or "").strip()
        series = (row.get("series_uid") or "").strip() or None
        cached = _cached_series(Path(cache), study, series)
        if cached is None:
            uids = server.image_series(study, series)
            if len(uids) != 1:
                raise CapsmedError(f"{server.url}: study {study} has {len(uids)} image series; "
                                   "name one in the series_uid column")
            cached = server.fetch_series(study, uids[0], Path(cache))
            (cached / CACHE_MARKER).write_text(json.dumps(
                {"url": server.url, "study_uid": study, "series_uid": uids[0],
                 "instances": len(list(cached.glob("*.dcm")))}) + "\n")
        else:
            logger.info("%s: series of study %s already cached in %s", row["case_id"], study,
                        cached)
        local: dict[str, str] = {"case_id": row["case_id"], "image": str(cached)}
        if row.get("label"):
            local["label"] = str((csv_path.parent / row["label"]).resolve())
        for key in ("class", "patient_id"):
            if row.get(key) not in (None, ""):
                local[key] = row[key]
        out_rows.append(local)
    fields = [k for k in ("case_id", "image", "label", "class", "patient_id")
              if any(k in r for r in out_rows)]
    manifest = Path(cache) / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    return manifest


def _cached_series(cache: Path, study: str, series: str | None) -> Path | None:
    """The cached folder of a study's series when a complete retrieval is recorded there."""
    folder = cache / safe_name(study)
    if not folder.is_dir():
        return None
    for marker in sorted(folder.glob(f"*/{CACHE_MARKER}")):
        try:
            doc: Mapping[str, Any] = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if series in (None, doc.get("series_uid")) and \
                len(list(marker.parent.glob("*.dcm"))) == doc.get("instances"):
            return marker.parent
    return None
