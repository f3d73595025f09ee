"""DICOMweb for ``capsmed predict --dicomweb``: retrieve a study, store the SEG and SR back.

The retrieving side (credentials, retries, QIDO-RS / WADO-RS, series choice, the dataset cache)
lives in :mod:`capsmed.data.dicomweb`; its names are re-exported here. STOW-RS is sent by this module
itself, on the same retrying session (connection errors and HTTP 408/429/503/504 are retried,
bounded), so that its answer is read in full: a store the server accepts only in part (HTTP 202,
or any answer with a FailedSOPSequence) is an error naming every failed instance and its reason.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

# the retrieving side's names, re-exported for the callers of capsmed.dicom.web
from capsmed.data.dicomweb import CACHE_MARKER as CACHE_MARKER
from capsmed.data.dicomweb import NON_IMAGE_MODALITIES as NON_IMAGE_MODALITIES
from capsmed.data.dicomweb import SOURCE_COLUMNS as SOURCE_COLUMNS
from capsmed.data.dicomweb import DicomWebSource, http_problem
from capsmed.data.dicomweb import cache_dicomweb_dataset as cache_dicomweb_dataset
from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

#: Failure Reason (0008,1197) values of DICOM PS3.18 / PS3.4 and what they mean.
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0112: "no such object instance",
    0x0122: "SOP class not supported", 0x0124: "not authorized", 0xA700: "out of resources",
    0xA900: "data set does not match SOP class", 0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported", 0xC123: "instance already stored",
}


def failed_instances(answer: Any) -> list[str]:
    """``UID (reason)`` for every item of a STOW-RS answer's FailedSOPSequence.

    Args:
        answer: The answer as a pydicom ``Dataset`` (from ``application/dicom+json``).

    Returns:
        One entry per failed instance, in the server's order.
    """
    out = []
    for item in answer.get("FailedSOPSequence", []) or []:
        code = item.get("FailureReason")
        reason = FAILURE_REASONS.get(int(code), f"failure reason {int(code):#06x}") \
            if code is not None else "no reason given"
        out.append(f"{item.get('ReferencedSOPInstanceUID', '?')} ({reason})")
    return out


def _multipart(datasets: Sequence[Any]) -> tuple[bytes, str]:
    """The ``multipart/related; type="application/dicom"`` body of the datasets, and its type."""
    from capsmed.dicom.outputs import dataset_bytes

    boundary = uuid.uuid4().hex
    parts = []
    for ds in datasets:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                     + dataset_bytes(ds) + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


class DicomWeb(DicomWebSource):
    """A DICOMweb server to read a study from and store the derived objects to (STOW-RS).

    Args:
        url: Base URL of the DICOMweb service (e.g. ``http://pacs:8042/dicom-web``), without
            credentials.
        timeout: Seconds to wait for each HTTP answer.

    Raises:
        CapsmedError: The URL is not http(s) or carries credentials.
    """

    def store(self, datasets: Sequence[Any], study: str | None = None) -> str:
        """STOW-RS the datasets; returns the server URL they went to.

        Args:
            datasets: The objects to store.
            study: StudyInstanceUID to store them under (``/studies/{study}``); by default the
                study of the first dataset.

        Returns:
            The server's base URL.

        Raises:
            CapsmedError: The server refuses them (naming their SOP Instance UIDs), or accepts
                only some: every failed instance is named, with its reason.
        """
        from pydicom import Dataset

        if not datasets:
            return self.url
        study = study or str(datasets[0].StudyInstanceUID)
        uids = ", ".join(str(ds.SOPInstanceUID) for ds in datasets)
        body, content_type = _multipart(datasets)
        target = f"{self.url}/studies/{study}"
        try:
            response = self.session.post(target, data=body, timeout=self.timeout, headers={
                "Content-Type": content_type, "Accept": "application/dicom+json"})
        except Exception as exc:  # noqa: BLE001 - requests raises many types
            raise CapsmedError(f"{self.url}: storing {uids} failed: {http_problem(exc)}") from None
        answer = Dataset()
        if response.content.strip():
            try:
                answer = Dataset.from_json(response.content)
            except Exception:  # noqa: BLE001 - a non-JSON answer: nothing to read failures from
                answer = Dataset()
        failed = failed_instances(answer)
        if failed:  # 202 (some stored), 409 (none): the server names each failure
            raise CapsmedError(f"{self.url}: storing to study {study} failed for "
                               f"{len(failed)} of {len(datasets)} instance(s) (HTTP "
                               f"{response.status_code}): {'; '.join(failed)}")
        try:
            response.raise_for_status()
        except Exception as exc:  # noqa: BLE001
            raise CapsmedError(f"{self.url}: storing {uids} failed: {http_problem(exc)}") from None
        if response.status_code == 202:
            raise CapsmedError(f"{self.url}: storing to study {study} failed in part (HTTP 202) "
                               f"for {uids}; the server names no failed instance")
        logger.info("%s: stored %s", self.url, uids)
        return self.url
