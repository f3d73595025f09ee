"""DICOM in and out: source series checks, DICOM SEG and SR writers, and a DICOMweb client.

Nothing here imports torch: these modules turn what ``capsmed predict`` wrote (a label map in the
source's geometry, class probabilities) into DICOM objects with highdicom, and move series and
objects to and from a DICOMweb server with dicomweb-client.

- :mod:`capsmed.dicom.series`: read and check one source series; map a prediction onto its slices;
  deterministic UIDs.
- :mod:`capsmed.dicom.seg`: the DICOM Segmentation.
- :mod:`capsmed.dicom.sr`: the TID 1500 measurement report (Comprehensive 3D SR).
- :mod:`capsmed.dicom.outputs`: both for one study, and the ``dicom.json`` record of what was
  written and where it went.
- :mod:`capsmed.dicom.web`: DICOMweb store (STOW-RS), over the retrieving client of
  :mod:`capsmed.data.dicomweb` (QIDO-RS / WADO-RS, series choice, the dataset cache).

File finding, headers and the series geometry rules come from :mod:`capsmed.data.dicomio`, label
names and codes from :mod:`capsmed.data.labels`; nothing here imports ``capsmed.report``.
"""
