"""DICOMweb retrieval: find a study's image series (QIDO-RS) and fetch them (WADO-RS) into a cache.

The input side of DICOMweb, used by the ``dicomweb`` dataset source (:func:`cache_dicomweb_dataset`)
and by ``capsmed predict --dicomweb`` (through :class:`capsmed.dicom.web.DicomWeb`, which adds
STOW-RS). Torch-free.

Credentials never come from the config, the command line or the URL, and are never logged. In order:

- ``CAPSMED_DICOMWEB_TOKEN``: sent as ``Authorization: Bearer <token>``;
- ``CAPSMED_DICOMWEB_USER`` and ``CAPSMED_DICOMWEB_PASSWORD``: HTTP basic authentication;
- otherwise a netrc file (``$NETRC``, else ``~/.netrc``) entry for the server's host, which
  ``requests`` reads by itself; no entry means no authentication.

Every request is retried, a bounded number of times with short back-off, when the connection
fails or drops, or the server answers 408, 429, 503 or 504 (:func:`retrying_session`). Every failure
is one :class:`~capsmed.errors.CapsmedError` line naming the server and the UID.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capsmed.data.dicomio import series_skip_reason
from capsmed.errors import CapsmedError
from capsmed.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from capsmed.paths import safe_name

logger = logging.getLogger(__name__)

#: HTTP answers that are retried (request timeout, too many requests, unavailable, gateway timeout).
RETRY_STATUSES = (408, 429, 503, 504)
#: Tries after the first one, for connection errors and for :data:`RETRY_STATUSES` each.
RETRIES = 3
#: Back-off factor in seconds (waits 0, 2x, 4x this between tries; Retry-After is not honoured, so
#: the wait stays bounded).
BACKOFF_S = 0.25

#: Modalities of series that hold no images a model can read.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC",
                                  "REG", "FID", "AU", "ECG", "PLAN", "OT_SR"})
MODALITY, SERIES_UID, STUDY_UID = "00080060", "0020000E", "0020000D"
SERIES_DESCRIPTION = "0008103E"


def _value(item: dict, tag: str) -> str:
    """First value of a tag in a DICOM JSON object ('' when absent)."""
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def http_problem(exc: Exception) -> str:
    """One line describing a requests exception (status and reason; never headers or bodies)."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect to the server"
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"




def retrying_session():
    """A ``requests`` session that retries connection errors and 408/429/503/504, bounded.

    Every method is retried, POST included: a STOW-RS of the same instances stores the same SOP
    Instance UIDs again, which a server accepts or reports per instance.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=2 * RETRIES, connect=RETRIES, read=RETRIES, status=RETRIES, other=0,
                  status_forcelist=RETRY_STATUSES, allowed_methods=None, backoff_factor=BACKOFF_S,
                  respect_retry_after_header=False, raise_on_status=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session

class DicomWebSource:
    """A DICOMweb server to read from: find a study's image series and retrieve them.

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
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        session = retrying_session()
        token = os.environ.get("CAPSMED_DICOMWEB_TOKEN")
        user, password = (os.environ.get("CAPSMED_DICOMWEB_USER"),
                          os.environ.get("CAPSMED_DICOMWEB_PASSWORD"))
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        elif user and password is not None:
            session.auth = (user, password)
        # else: requests applies a netrc entry for the host ($NETRC or ~/.netrc) on its own.
        self.session = session
        self.timeout = timeout
        self.client = DICOMwebClient(url=self.url, session=session, timeout=timeout)
        # the session retries (connection errors too); the client's own retry would multiply it
        self.client.set_http_retry_params(retry=False)

    def image_series(self, study: str, series: str | None = None) -> list[str]:
        """The image series of a study (or the one asked for), checked against the server.

        Without ``series``, every image series a model can read: localisers / scouts, secondary
        captures and derived series are skipped (:func:`capsmed.data.dicomio.series_skip_reason`,
        from the series' metadata), one log line each.

        Args:
            study: StudyInstanceUID.
            series: SeriesInstanceUID, or None for every image series of the study.

        Returns:
            SeriesInstanceUIDs.

        Raises:
            CapsmedError: The server fails, the study or series is not there, or the series (or
                every series of the study) holds no images a model can read.
        """
        try:
            found = self.client.search_for_series(study_instance_uid=study)
        except Exception as exc:  # noqa: BLE001 - requests and dicomweb-client raise many types
            raise CapsmedError(f"{self.url}: study {study}: {http_problem(exc)}") from None
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
        described = {_value(item, SERIES_UID): _value(item, SERIES_DESCRIPTION) for item in found}
        chosen, skipped = [], []
        for uid in images:
            reason = series_skip_reason(self.series_headers(study, uid))
            if reason is None:
                chosen.append(uid)
                continue
            label = f"{uid} ({described[uid]})" if described.get(uid) else uid
            logger.info("%s: study %s: skipping series %s: %s", self.url, study, label, reason)
            skipped.append(f"{uid}: {reason}")
        if not chosen:
            raise CapsmedError(f"{self.url}: study {study} has no series a model can read "
                               f"({'; '.join(skipped)})")
        return chosen

    def series_headers(self, study: str, series: str) -> list[Any]:
        """The instance headers of a series (WADO-RS metadata: no pixel data is transferred).

        Raises:
            CapsmedError: The server fails.
        """
        from pydicom import Dataset

        try:
            items = self.client.retrieve_series_metadata(study, series)
        except Exception as exc:  # noqa: BLE001 - requests and dicomweb-client raise many types
            raise CapsmedError(f"{self.url}: series {series}: {http_problem(exc)}") from None
        out = []
        for item in items:
            # bulk data (pixels) is referenced by URI in metadata; headers are all that is needed
            item = {k: v for k, v in item.items() if "BulkDataURI" not in v}
            out.append(Dataset.from_json(item))
        return out

    def fetch_series(self, study: str, series: str, cache: Path) -> Path:
        """Retrieve one series into ``cache/<study>/<series>/`` (one file per instance).

        Args:
            study: StudyInstanceUID.
            series: SeriesInstanceUID.
            cache: Local cache folder.

        Returns:
            The series folder, ready for :func:`capsmed.dicom.series.load_series` (each instance
            written atomically).

        Raises:
            CapsmedError: The server fails or returns no instances.
        """
        folder = Path(cache) / safe_name(study) / safe_name(series)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.dcm"):
            old.unlink()
        count = 0
        try:
            for ds in self.client.iter_series(study, series):  # one instance in memory at a time
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                atomic_write_bytes(folder / f"{safe_name(str(ds.SOPInstanceUID))}.dcm",
                                   buf.getvalue())
                count += 1
        except Exception as exc:  # noqa: BLE001
            raise CapsmedError(f"{self.url}: series {series}: {http_problem(exc)}") from None
        if not count:
            raise CapsmedError(f"{self.url}: series {series} has no instances")
        logger.info("%s: retrieved series %s (%d instances) to %s", self.url, series, count,
                    folder)
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

#: What a dataset source CSV of DICOMweb studies may hold.
SOURCE_COLUMNS = ("case_id", "study_uid", "series_uid", "label", "class", "patient_id")
CACHE_MARKER = "retrieved.json"


def cache_dicomweb_dataset(csv_path: Path, url: str, cache: Path) -> Path:
    """Retrieve the series a CSV lists from a DICOMweb server, once, and write a local manifest.

    The CSV has ``case_id``, ``study_uid``, optional ``series_uid`` (default: the study's only image
    series), ``class`` and/or ``label`` (a NIfTI mask, relative to the CSV) and optional
    ``patient_id``. Each series goes to ``cache/<study>/<series>/`` with a ``retrieved.json`` marker
    (written atomically, after the last instance);
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
    server = DicomWebSource(url)
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
            atomic_write_json(cached / CACHE_MARKER,
                              {"url": server.url, "study_uid": study, "series_uid": uids[0],
                               "instances": len(list(cached.glob("*.dcm")))})
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
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(out_rows)
    atomic_write_text(manifest, buf.getvalue())
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
