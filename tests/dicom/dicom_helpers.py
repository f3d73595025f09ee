"""Test helpers: volumes written as DICOM MR series, a tiny trained segmenter, SEG read-back."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.pipeline_helpers import prepare_all, tiny_config, write_config
from tests.require import skip_or_fail

LPS = np.diag([-1.0, -1.0, 1.0])


def _ds(values) -> list[str]:
    """Decimal strings of at most 16 characters (the DS limit)."""
    return [f"{float(v):.9g}" for v in values]


def write_mr_series(data: np.ndarray, affine: np.ndarray, folder: Path, *, seed: str,
                    patient_id: str = "CAPSMED-TEST-1", patient_name: str = "Test^Hippocampus"
                    ) -> Path:
    """Write a 3D volume as a single-frame MR series whose geometry is ``affine`` (RAS).

    Slice ``z`` holds ``data[:, :, z]``; within a slice, column ``k`` runs along array axis 0 and row
    ``j`` along axis 1, so the series' voxel ``(k, j, z)`` sits where ``affine`` puts ``(k, j, z)``.

    Args:
        data: ``(X, Y, Z)`` intensities (stored as unsigned 16-bit).
        affine: 4x4 voxel-to-world matrix, RAS, axes orthogonal.
        folder: Output folder (one ``.dcm`` per slice, written in shuffled order).
        seed: Makes the UIDs (same seed, same UIDs).
        patient_id: PatientID.
        patient_name: PatientName.

    Returns:
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ np.asarray(affine, float)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    row_dir, col_dir = lps[:, 0] / spacing[0], lps[:, 1] / spacing[1]
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    frame_uid = generate_uid(entropy_srcs=[seed, "frame"])
    pixels = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    order = np.random.default_rng(0).permutation(data.shape[2])
    for z in order:
        sop = generate_uid(entropy_srcs=[seed, "slice", str(z)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = ("20240102", "101500",
                                                                    "20240102", "101600")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber = "MR", "capsmed tests", 3
        ds.InstanceNumber = int(z) + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTrainLength = "3D", 1
        ds.RepetitionTime, ds.EchoTime = 10.0, 4.0
        ds.ImagePositionPatient = _ds(lps @ [0.0, 0.0, float(z), 1.0])
        ds.ImageOrientationPatient = _ds([*row_dir, *col_dir])
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # between rows, between columns
        ds.SliceThickness = _ds([spacing[2]])[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels[:, :, z].T).tobytes()
        ds.save_as(folder / f"slice_{z:03d}.dcm", enforce_file_format=True)
    return folder


def oblique_mr_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """RAS affine with the orientation and spacing of pydicom's oblique MR test slice.

    ``dicomdirtests/98892003/MR700/4648``: an oblique sagittal slice, 0.39 mm pixels, 1.2 mm slices
    (strongly anisotropic). Its slices stack along its normal.
    """
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file("dicomdirtests/98892003/MR700/4648")
    if path is None:
        skip_or_fail("DATA", "pydicom's test files are not installed")
    ds = pydicom.dcmread(path)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * dc, col_dir * dr
    lps[:3, 2] = normal * float(ds.SliceThickness)
    lps[:3, 3] = np.asarray(ds.ImagePositionPatient, float)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    assert shape[0] > 0
    return ras


def blob_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two box-shaped structures (labels 1 and 2) and an image showing them (label + noise)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    c = np.array(shape) // 2
    label[c[0] - 4:c[0] + 3, c[1] - 5:c[1] + 2, c[2] - 3:c[2] + 4] = 1
    label[c[0] + 3:c[0] + 7, c[1] + 2:c[1] + 6, c[2] - 3:c[2] + 2] = 2
    image = label * 1.0 + rng.normal(0, 0.2, shape)
    return image, label


def train_tiny_segmenter(root: Path) -> Path:
    """Train a tiny 3D UNet on box-shaped structures; returns its ``best.pt``."""
    from capsmed.train.loop import train_model

    data = root / "data"
    data.mkdir(parents=True)
    rows = []
    for k, shape in enumerate([(23, 27, 19), (25, 21, 22), (24, 26, 20), (21, 25, 23),
                               (26, 22, 21), (22, 24, 25)]):
        image, label = blob_volume(shape, seed=k)
        aff = np.diag([1.1, 0.9, 1.7, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.float32), aff), data / f"img{k}.nii.gz")
        nib.save(nib.Nifti1Image(label, aff), data / f"lab{k}.nii.gz")
        rows.append({"case_id": f"c{k}", "image": f"img{k}.nii.gz", "label": f"lab{k}.nii.gz"})
    with open(data / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    cfg = tiny_config(root / "results", task="segmentation", source="csv",
                      path=str(data / "manifest.csv"),
                      labels={"0": "background", "1": "anterior", "2": "posterior"},
                      preprocess={"patch_size": [16, 16, 16], "cache": "none"},
                      train={"epochs": 4, "batch_size": 2, "samples_per_case": 2})
    prepare_all(write_config(cfg, root / "config.yaml"))
    train_model(cfg, "ds", "unet")
    return root / "results" / "ds" / "models" / "unet" / "best.pt"


def seg_labelmap_on_source(seg, source_uids: list[str]) -> np.ndarray:
    """A SEG read back as a label map on the source slices, ``(slices, rows, cols)``.

    Uses highdicom's own reader (frames looked up by the source SOP Instance UID each references).
    """
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids,
                                            combine_segments=True, skip_overlap_checks=True)
    return np.asarray(arr)


def seg_volume_on_nifti_grid(seg, nifti: Path) -> tuple[np.ndarray, np.ndarray]:
    """A SEG's label map brought onto a NIfTI's voxel grid, independently of capsmed.

    highdicom assembles the SEG's frames into a volume from the SEG's own plane positions and
    orientation (LPS); nibabel's orientation tools then permute and flip its axes to the NIfTI's.
    The two grids are the same only if the SEG lies exactly in the NIfTI's (the source's) geometry.

    Returns:
        ``(labels, affine)``: the SEG's labels on the NIfTI's axes and the matching RAS affine
        (compare it with the NIfTI's).
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    vol = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    arr = np.asarray(vol.array)
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine, float)
    target = nib.load(str(nifti))
    t = ornt_transform(io_orientation(aff), io_orientation(target.affine))
    out = apply_orientation(arr, t)
    return out, aff @ inv_ornt_aff(t, arr.shape)


def train_tiny_classifier(root: Path) -> Path:
    """Train a tiny 3D CNN classifier (two synthetic classes) for one epoch; returns ``best.pt``."""
    from capsmed.train.loop import train_model

    cfg = tiny_config(root / "results", task="classification", spatial_dims=3,
                      synthetic={"num_cases": 16, "size": [16, 16, 16], "num_classes": 2},
                      preprocess={"cache": "none", "image_size": 16},
                      train={"epochs": 1, "batch_size": 4})
    prepare_all(write_config(cfg, root / "config.yaml"))
    train_model(cfg, "ds", "seed_cnn")
    return root / "results" / "ds" / "models" / "seed_cnn" / "best.pt"


def referenced_uids(ds) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in a dataset."""
    found = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            found.add(str(elem.value))
    return found


def sr_volumes(path: Path) -> dict[str, float]:
    """Structure name -> volume in mL from a TID 1500 SR, read with highdicom."""
    sr = hd.sr.srread(path)
    out = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        (m,) = group.get_measurements(name=codes.SCT.Volume)
        assert m.unit.value == "mL"
        out[str(group.tracking_identifier)] = float(m.value)
    return out


def report_volumes(html: Path) -> dict[str, str]:
    """Structure name -> the volume text ('0.58 mL') the study report shows on its cards."""
    text = html.read_text()
    return dict(re.findall(r'<div class="k">([^<]+) volume</div><div class="v">([^<]+)</div>', text))


def check_dicom_outputs(out: Path, stem: str, series: Path) -> dict:
    """What every SEG/SR pair must satisfy; returns the record."""
    record = json.loads((out / f"{stem}_dicom.json").read_text())
    kinds = {o["kind"]: o for o in record["objects"]}
    assert set(kinds) == {"SEG", "SR"}
    seg = hd.seg.segread(out / kinds["SEG"]["file"])
    nifti = out / f"{stem}_seg.nii.gz"
    pred = np.asarray(nib.load(str(nifti)).dataobj)
    assert np.count_nonzero(pred) > 0, "the model found nothing: the test would check too little"
    # voxel for voxel, in the source geometry (highdicom assembles the SEG, nibabel reorients)
    labels, affine = seg_volume_on_nifti_grid(seg, nifti)
    np.testing.assert_allclose(affine, nib.load(str(nifti)).affine, atol=1e-3)
    np.testing.assert_array_equal(labels, pred)
    # every source slice is referenced, frame by frame, and the identity is the source's
    sources = [pydicom.dcmread(f) for f in sorted(series.glob("*.dcm"))]
    src_uids = [str(d.SOPInstanceUID) for d in sources]
    per_slice = seg.get_pixels_by_source_instance(source_sop_instance_uids=src_uids,
                                                  combine_segments=True, skip_overlap_checks=True)
    assert np.count_nonzero(per_slice) == np.count_nonzero(pred)
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert str(seg.get(key)) == str(sources[0].get(key)), key
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["anterior", "posterior"]
    assert [i.CodingSchemeDesignator for i in seg.CodingSchemeIdentificationSequence] == \
        ["99CAPSMED"]  # the private scheme of the label codes is declared
    assert str(seg.SOPInstanceUID) == kinds["SEG"]["sop_instance_uid"]
    # the SR: the report's volumes, the SEG referenced, the algorithm named
    sr_path = out / kinds["SR"]["file"]
    vols = sr_volumes(sr_path)
    shown = report_volumes(out / f"{stem}.html")
    assert set(vols) == set(shown) == {"anterior", "posterior"}
    spacing = np.sqrt((nib.load(str(nifti)).affine[:3, :3] ** 2).sum(0))
    for k, name in ((1, "anterior"), (2, "posterior")):
        assert vols[name] == pytest.approx(np.count_nonzero(pred == k) * np.prod(spacing) / 1000)
        assert shown[name] == f"{vols[name]:.2f} mL"
    sr = pydicom.dcmread(sr_path)
    assert str(seg.SOPInstanceUID) in referenced_uids(sr)
    assert str(sr.StudyInstanceUID) == str(sources[0].StudyInstanceUID)
    text = " ".join(str(e.value) for e in sr.iterall() if e.VR in ("UT", "LO", "SH", "LT"))
    assert "unet" in text and "checkpoint_sha256=" in text and "capsmed" in text
    return record


# ------------------------------------------------------------------ a throw-away Orthanc

INSTALL = ("sudo bash .ci/pacs/install.sh   (apt-get install orthanc orthanc-dicomweb dicom3tools "
           "dcmtk)")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def which(name: str) -> str | None:
    """A program on PATH or in the sbin folders (Debian installs Orthanc in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def pacs_tools() -> tuple[str, str]:
    """Paths of ``Orthanc`` and ``dciodvfy``; skips (or fails under CAPSMED_REQUIRE_PACS=1)."""
    orthanc, dciodvfy = which("Orthanc"), which("dciodvfy")
    missing = [n for n, p in (("Orthanc", orthanc), ("dciodvfy", dciodvfy),
                              (str(PLUGIN), PLUGIN.is_file() or None)) if not p]
    if missing:
        skip_or_fail("PACS", f"needs {', '.join(missing)}; install with: {INSTALL}")
    return orthanc, dciodvfy


def dcmtk_tool(name: str) -> str:
    """Path of a dcmtk program (``dcmcjpeg``...); skips (or fails under CAPSMED_REQUIRE_PACS=1)."""
    path = which(name)
    if path is None:
        msg = f"needs dcmtk's {name}; install with: {INSTALL}"
        if os.environ.get("CAPSMED_REQUIRE_PACS") == "1":
            pytest.fail(f"CAPSMED_REQUIRE_PACS=1 but {msg}")
        pytest.skip(msg)
    return path


def write_scout(source: Path, folder: Path, slices: int = 3) -> Path:
    """A localiser made from a real series: a few of its slices, turned to another orientation.

    The slices keep their pixels, patient and study; they get a new series, ImageType
    ``ORIGINAL\\PRIMARY\\LOCALIZER`` and orientations that turn by 90 degrees from one to the next
    (a tri-plane scout), so the series is a localiser by each of its signs.

    Args:
        source: Folder of a series written by :func:`write_mr_series`.
        folder: Output folder.
        slices: How many slices the scout has.

    Returns:
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.dcm"))[:slices]
    series_uid = generate_uid(entropy_srcs=[str(source), "scout"])
    orientations = ([1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 1, 0])
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(f), "scout"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesDescription = "scout"
        ds.ImageOrientationPatient = [str(v) for v in orientations[i % 3]]
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"scout_{i}.dcm", enforce_file_format=True)
    return folder


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_orthanc(root: Path, **settings):
    """Start Orthanc on free ports with storage under ``root``; yield its REST URL; stop it by pid.

    Args:
        root: Throw-away folder for the config, the storage and the log.
        settings: Extra Orthanc settings (e.g. authentication).
    """
    binary, _ = pacs_tools()
    root.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    config = {"Name": "capsmed-test", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": http, "DicomPort": dicom,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
              **settings}
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, cwd=root)
    rest = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{rest}/system", timeout=2).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield rest
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
