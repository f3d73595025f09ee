"""DICOM Segmentation of a predicted label map, in the source series' geometry (highdicom).

One segment per foreground label, with its name and a coded segmented property (the config's SNOMED
CT category, type and laterality modifier where it gives them, else the private scheme
:data:`PRIVATE_SCHEME`, which dciodvfy notes as an unrecognised coding scheme); every frame
references the source slice it lies on. The segmentation type is BINARY, which every viewer and
dicom3tools' ``dciodvfy`` know (the newer Label Map Segmentation SOP class is not yet widely read).
Patient and study identity come from the source slices (highdicom copies them); UIDs and dates are
derived from the inputs, so a rerun writes the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
        options: Inference options that change the output, as canonical JSON
            (:func:`capsmed.dicom.outputs.canonical_options`), part of every UID.
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


def _code(entry: Mapping[str, str]):
    from pydicom.sr.coding import Code

    return Code(str(entry["value"]), str(entry.get("scheme") or "SCT"), str(entry["meaning"])[:64])


def segment_concepts(index: int, name: str,
                     codes: Mapping[str, Mapping[str, str]] | None = None) -> tuple[Any, Any, Any]:
    """Category, type and modifier codes of one segment.

    Args:
        index: Label value.
        name: Label name.
        codes: ``{category, type, modifier?}``, each ``{value, meaning, scheme?}`` (scheme
            default ``SCT``), as :func:`capsmed.data.labels.label_codes` gives them; None for the
            private scheme.

    Returns:
        ``(category, type, modifier or None)`` as ``pydicom.sr.coding.Code``. Without codes the
        category is SNOMED CT "Anatomical Structure" and the type :func:`label_code` (private
        scheme :data:`PRIVATE_SCHEME`).
    """
    from pydicom.sr.codedict import codes as dcm_codes

    if not codes or "type" not in codes:
        return dcm_codes.SCT.AnatomicalStructure, label_code(index, name), None
    category = _code(codes["category"]) if codes.get("category") else \
        dcm_codes.SCT.AnatomicalStructure
    modifier = _code(codes["modifier"]) if codes.get("modifier") else None
    return category, _code(codes["type"]), modifier


def declare_private_scheme(ds) -> None:
    """Name the private coding scheme in the Coding Scheme Identification Sequence (SOP Common).

    Only where the dataset uses a code of the scheme.

    Args:
        ds: A dataset that uses codes of :data:`PRIVATE_SCHEME` (changed in place).
    """
    from pydicom.dataset import Dataset

    used = any(elem.keyword == "CodingSchemeDesignator" and elem.value == PRIVATE_SCHEME
               for elem in ds.iterall())
    if not used:  # every concept is coded in a standard scheme: nothing to declare
        return
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
              labels: Mapping[int, str], algorithm: Algorithm,
              codes: Mapping[int, Mapping[str, Mapping[str, str]]] | None = None):
    """The DICOM SEG of a label map that lies in the source series' geometry.

    Args:
        pred: ``(X, Y, Z)`` integer label map as ``capsmed predict`` wrote it (0 = background).
        affine: Its 4x4 RAS voxel-to-world matrix.
        series: The checked source series.
        labels: Label index -> name, background (0) included or not.
        algorithm: The model that made it.
        codes: Label index -> ``{category, type, modifier?}`` codes
            (:func:`capsmed.data.labels.label_codes`); labels without them use the private scheme.

    Returns:
        ``highdicom.seg.Segmentation`` (BINARY, one segment per foreground label, every source slice
        one frame per segment).

    Raises:
        CapsmedError: The prediction does not lie on the source slices.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    frames = frames_from_prediction(pred, affine, series).astype(np.uint8)
    fg = sorted(int(k) for k in labels if int(k) > 0)
    top = max(fg + [int(frames.max())])
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm.model, family=dcm_codes.cid7162.ArtificialIntelligence,
        version=algorithm.version, source=MANUFACTURER,
        parameters={"checkpoint_sha256": algorithm.checkpoint_sha256})
    names = {int(k): str(v) for k, v in labels.items()}
    coded = {int(k): v for k, v in (codes or {}).items()}
    descriptions = []
    for k in range(1, top + 1):
        name = names.get(k, f"label {k}")
        category, kind, modifier = segment_concepts(k, name, coded.get(k))
        desc = hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_id=name[:64],
            tracking_uid=algorithm.uid(f"seg-track-{k}", series))
        if modifier is not None:  # e.g. laterality, inside the property type's item
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
                [hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)]
        descriptions.append(desc)
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
