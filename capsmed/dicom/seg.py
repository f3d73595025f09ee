"""DICOM Segmentation of a predicted label map, in the source series' geometry (highdicom).

One segment per foreground label, with its name and a coded segmented property; every frame
references the source slice it lies on. The segmentation type is BINARY, which every viewer and
dicom3tools' ``dciodvfy`` know (the newer Label Map Segmentation SOP class is not yet widely read).
Patient and study identity come from the source slices (highdicom copies them); UIDs and dates are
derived from the inputs, so a rerun writes the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from capsmed.dicom.series import SourceSeries, derived_uid, frames_from_prediction

logger = logging.getLogger(__name__)

MANUFACTURER = "capsmed"
#: Private coding scheme for label and class names that have no standard code.
PRIVATE_SCHEME = "99CAPSMED"
#: Series numbers of the derived series (the source's number plus these offsets).
SEG_SERIES_OFFSET = 1000
SR_SERIES_OFFSET = 2000


@dataclass
class Algorithm:
    """What made the prediction: named in the SEG and the SR.

    Attributes:
        model: Model name (e.g. ``ucaps``).
        checkpoint_sha256: SHA-256 of the checkpoint file.
        capsmed_version: capsmed's version.
        options: Inference options that change the output (e.g. ``tta=0``), part of every UID.
    """

    model: str
    checkpoint_sha256: str
    capsmed_version: str
    options: str = ""

    @property
    def version(self) -> str:
        """Version string: capsmed version and the checkpoint's short hash."""
        return f"capsmed {self.capsmed_version} checkpoint {self.checkpoint_sha256[:16]}"

    def uid(self, role: str, series: SourceSeries) -> str:
        """Deterministic UID of one derived object or series of ``series``."""
        return derived_uid(role, *series.sop_instance_uids, self.checkpoint_sha256,
                           self.capsmed_version, self.options)


def label_code(index: int, name: str):
    """Coded concept of a label or class name in the private scheme (value = its index).

    Args:
        index: Label or class index.
        name: Its name.

    Returns:
        A ``pydicom.sr.coding.Code``.
    """
    from pydicom.sr.coding import Code

    return Code(f"L{index}", PRIVATE_SCHEME, name[:64] or f"label {index}")


def declare_private_scheme(ds) -> None:
    """Name the private coding scheme in the Coding Scheme Identification Sequence (SOP Common).

    Args:
        ds: A dataset that uses codes of :data:`PRIVATE_SCHEME` (changed in place).
    """
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "capsmed label and class names"
    item.CodingSchemeResponsibleOrganization = "capsmed"
    items = [i for i in ds.get("CodingSchemeIdentificationSequence", [])
             if i.get("CodingSchemeDesignator") != PRIVATE_SCHEME]
    ds.CodingSchemeIdentificationSequence = [*items, item]


def fix_dates(ds, series: SourceSeries, algorithm: Algorithm) -> None:
    """Pin what highdicom takes from the clock or a random source, for byte-identical reruns.

    Content, series and contribution dates/times become the source series' own (its SeriesDate /
    SeriesTime, else the study's); a Dimension Organization UID becomes a derived one.

    Args:
        ds: The derived dataset (changed in place).
        series: Its source series.
        algorithm: The model that made it (part of the derived UID).
    """
    src = series.datasets[0]
    date = str(src.get("SeriesDate") or src.get("StudyDate") or "")
    time = str(src.get("SeriesTime") or src.get("StudyTime") or "")
    for key, value in (("ContentDate", date), ("ContentTime", time), ("SeriesDate", date),
                       ("SeriesTime", time), ("InstanceCreationDate", date),
                       ("InstanceCreationTime", time)):
        if key in ds or key in ("ContentDate", "ContentTime"):
            setattr(ds, key, value)
    declare_private_scheme(ds)
    uid = algorithm.uid(f"dimension-organization-{ds.SOPClassUID}", series)
    for elem in ds.iterall():
        if elem.keyword == "ContributionDateTime":
            elem.value = date + time
        elif elem.keyword == "DimensionOrganizationUID":
            elem.value = uid


def build_seg(pred: np.ndarray, affine: np.ndarray, series: SourceSeries,
              labels: Mapping[int, str], algorithm: Algorithm):
    """The DICOM SEG of a label map that lies in the source series' geometry.

    Args:
        pred: ``(X, Y, Z)`` integer label map as ``capsmed predict`` wrote it (0 = background).
        affine: Its 4x4 RAS voxel-to-world matrix.
        series: The checked source series.
        labels: Label index -> name, background (0) included or not.
        algorithm: The model that made it.

    Returns:
        ``highdicom.seg.Segmentation`` (BINARY, one segment per foreground label, every source slice
        one frame per segment).

    Raises:
        CapsmedError: The prediction does not lie on the source slices.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = frames_from_prediction(pred, affine, series).astype(np.uint8)
    fg = sorted(int(k) for k in labels if int(k) > 0)
    top = max(fg + [int(frames.max())])
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm.model, family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version, source=MANUFACTURER,
        parameters={"checkpoint_sha256": algorithm.checkpoint_sha256})
    names = {int(k): str(v) for k, v in labels.items()}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=names.get(k, f"label {k}")[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=label_code(k, names.get(k, f"label {k}")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_id=names.get(k, f"label {k}")[:64],
            tracking_uid=algorithm.uid(f"seg-track-{k}", series))
        for k in range(1, top + 1)]
    src = series.datasets[0]
    seg = hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=algorithm.uid("seg-series", series),
        series_number=int(src.get("SeriesNumber") or 0) + SEG_SERIES_OFFSET,
        sop_instance_uid=algorithm.uid("seg", series), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.model[:64],
        software_versions=algorithm.version[:64], device_serial_number="0",
        content_label="CAPSMED", content_description=f"{algorithm.model} segmentation"[:64],
        omit_empty_frames=False)
    fix_dates(seg, series, algorithm)
    return seg
