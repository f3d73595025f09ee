"""TID 1500 measurement report (Comprehensive 3D SR) of one study's prediction (highdicom).

Segmentation: one volumetric measurement group per foreground label, each referencing its segment in
the SEG and holding the structure's volume in mL (the same numbers the study report shows).
Classification: one measurement group with the predicted class (a coded finding) and its probability,
referencing the source slices. Both name the algorithm (model, checkpoint hash, capsmed version).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from capsmed.dicom.seg import (
    MANUFACTURER,
    SR_SERIES_OFFSET,
    Algorithm,
    fix_dates,
    label_code,
    segment_concepts,
)
from capsmed.dicom.series import SourceSeries

logger = logging.getLogger(__name__)


def _codes():
    """Concept names used in the report."""
    from pydicom.sr.coding import Code

    return {
        "volume": Code("118565006", "SCT", "Volume"),
        "ml": Code("mL", "UCUM", "milliliter"),
        "one": Code("1", "UCUM", "no units"),
        "probability": Code("PROB", "99CAPSMED", "Probability of predicted class"),
        "finding": Code("CLASS", "99CAPSMED", "Predicted class"),
        "procedure": Code("363679005", "SCT", "Imaging"),
    }


def _context(algorithm: Algorithm, series: SourceSeries):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm.uid("sr-device", series), name=MANUFACTURER,
        manufacturer_name=MANUFACTURER, model_name=algorithm.model[:64])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _algorithm_id(algorithm: Algorithm):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(
        name=algorithm.model[:64], version=algorithm.version[:64],
        parameters=[f"checkpoint_sha256={algorithm.checkpoint_sha256}"])


def build_segmentation_sr(seg, series: SourceSeries, volumes_ml: Mapping[str, float],
                          labels: Mapping[int, str], algorithm: Algorithm,
                          codes: Mapping[int, Mapping[str, Mapping[str, str]]] | None = None):
    """The measurement report of a segmentation: per structure its volume, referencing the SEG.

    Args:
        seg: The ``highdicom.seg.Segmentation`` from :func:`capsmed.dicom.seg.build_seg`.
        series: Its source series.
        volumes_ml: Segment name -> predicted volume in mL, for every segment of the SEG (a label
            value without a name is ``label k``).
        labels: Label index -> name.
        algorithm: The model that made it.
        codes: Label index -> ``{category, type, modifier?}`` (the finding type is its type).

    Returns:
        ``highdicom.sr.Comprehensive3DSR``.

    Raises:
        ValueError: A segment has no volume entry.
    """
    import highdicom as hd

    c = _codes()
    names = {int(k): str(v) for k, v in labels.items()}
    coded = {int(k): v for k, v in (codes or {}).items()}
    groups = []
    for desc in seg.SegmentSequence:
        k = int(desc.SegmentNumber)
        name = names.get(k, f"label {k}")
        if name not in volumes_ml:
            raise ValueError(f"segment {k} ({name!r}) has no volume: volumes_ml needs an entry "
                             "for every segment of the SEG")
        tracking = hd.sr.TrackingIdentifier(uid=algorithm.uid(f"sr-track-{k}", series),
                                            identifier=name[:64])
        volume = hd.sr.Measurement(name=c["volume"], value=float(volumes_ml[name]), unit=c["ml"],
                                   algorithm_id=_algorithm_id(algorithm))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, k),
            finding_type=segment_concepts(k, name, coded.get(k))[1],
            algorithm_id=_algorithm_id(algorithm),
            measurements=[volume]))
    report = hd.sr.MeasurementReport(observation_context=_context(algorithm, series),
                                     procedure_reported=c["procedure"], imaging_measurements=groups)
    return _document(report, [seg, *series.datasets], series, algorithm)


def build_classification_sr(series: SourceSeries, probabilities: Sequence[float],
                            classes: Mapping[int, str], algorithm: Algorithm):
    """The measurement report of a classification: predicted class and its probability.

    Args:
        series: The source series.
        probabilities: One probability per class, in class order.
        classes: Class index -> name.
        algorithm: The model that made it.

    Returns:
        ``highdicom.sr.Comprehensive3DSR``.
    """
    import highdicom as hd

    c = _codes()
    probs = [float(p) for p in probabilities]
    k = max(range(len(probs)), key=probs.__getitem__)
    name = {int(i): str(v) for i, v in classes.items()}.get(k, f"class {k}")
    sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
               for ds in series.datasets]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=algorithm.uid("sr-track-class", series),
                                                     identifier="classification"),
        algorithm_id=_algorithm_id(algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=c["finding"],
                                                             value=label_code(k, name))],
        measurements=[hd.sr.Measurement(name=c["probability"], value=probs[k], unit=c["one"],
                                        algorithm_id=_algorithm_id(algorithm))],
        source_images=sources)
    report = hd.sr.MeasurementReport(observation_context=_context(algorithm, series),
                                     procedure_reported=c["procedure"], imaging_measurements=[group])
    return _document(report, list(series.datasets), series, algorithm)


def _document(report, evidence: list, series: SourceSeries, algorithm: Algorithm):
    import highdicom as hd

    src = series.datasets[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0],
        series_instance_uid=algorithm.uid("sr-series", series),
        series_number=int(src.get("SeriesNumber") or 0) + SR_SERIES_OFFSET,
        sop_instance_uid=algorithm.uid("sr", series), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    fix_dates(sr, series, algorithm)
    return sr
