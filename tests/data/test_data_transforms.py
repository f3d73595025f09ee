"""MONAI transform pipelines: shapes, dtypes, normalisation, augmentation seeding, invertibility."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import write_nifti
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate
from monai.transforms import Invertd, LoadImage

from capsmed.data.fingerprint import compute_fingerprint, make_plan
from capsmed.data.sources import prepare_dataset
from capsmed.data.transforms import (
    _rotation_axes,
    build_augment_transforms,
    build_preprocess_transforms,
    build_transforms,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*NvImgCodec.*:UserWarning")


def _seg_plan(**kw):
    plan = {"task": "segmentation", "spatial_dims": 3, "spacing": None,
            "patch_size": [16, 16, 16], "normalization": "zscore", "crop_foreground": True,
            "size_divisible": 8, "samples_per_case": 2}
    plan.update(kw)
    return plan


def _invert_label_like(pre, data):
    """Run Invertd on a copy of the preprocessed label, as the lead does with predictions."""
    pred = MetaTensor(data["label"].float().clone(), meta=dict(data["image"].meta),
                      applied_operations=list(data["image"].applied_operations))
    out = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(
        {"image": data["image"], "pred": pred})
    return out["pred"]


def _oblique_case(tmp_path):
    """A case with an LPS-ish, anisotropic affine and a zero border (crop does something)."""
    rng = np.random.default_rng(0)
    shape = (21, 26, 13)
    img = np.zeros(shape, np.float32)
    img[3:18, 4:22, 2:11] = rng.normal(50, 5, (15, 18, 9))
    lab = np.zeros(shape, np.uint8)
    lab[6:12, 8:15, 4:8] = 1
    lab[12:15, 15:19, 5:9] = 2
    aff = np.array([[-0.8, 0, 0, 30.0], [0, -1.1, 0, 12.0], [0, 0, 2.5, -7.0], [0, 0, 0, 1]])
    return (write_nifti(tmp_path / "img.nii.gz", img, aff),
            write_nifti(tmp_path / "lab.nii.gz", lab, aff), lab)


@pytest.mark.parametrize("spacing", [None, [1.0, 1.0, 1.5]])
def test_geometry_round_trip_synthetic(tmp_path, spacing):
    img_path, lab_path, lab = _oblique_case(tmp_path)
    pre = build_preprocess_transforms(_seg_plan(spacing=spacing))
    data = pre({"image": str(img_path), "label": str(lab_path)})
    assert data["image"].shape[1:] == data["label"].shape[1:]
    assert all(s % 8 == 0 and s >= 16 for s in data["image"].shape[1:])
    assert data["label"].dtype == torch.int64 and data["image"].dtype == torch.float32
    inv = _invert_label_like(pre, data)
    orig = nib.load(str(lab_path))
    assert tuple(inv.shape) == (1, *orig.shape)
    np.testing.assert_allclose(inv.affine.numpy(), orig.affine, atol=1e-5)
    if spacing is None:  # no resampling: the round trip is exact
        assert np.array_equal(inv[0].numpy().astype(np.uint8), lab)
    else:
        assert np.mean(inv[0].numpy().astype(np.uint8) == lab) > 0.95


def test_geometry_round_trip_synthetic_source(tmp_path):
    doc = prepare_dataset({"source": "synthetic", "task": "segmentation", "max_cases": 2,
                           "synthetic": {"num_cases": 4, "size": [20, 28, 24]}}, tmp_path, 0)
    plan = make_plan(compute_fingerprint(doc), {}, 16, None)
    pre = build_preprocess_transforms(plan)
    case = doc["cases"][0]
    data = pre({"image": case["image"], "label": case["label"]})
    inv = _invert_label_like(pre, data)
    orig = nib.load(case["label"])
    assert tuple(inv.shape[1:]) == orig.shape
    np.testing.assert_allclose(inv.affine.numpy(), orig.affine)
    assert np.array_equal(inv[0].numpy(), np.asarray(orig.dataobj))


def test_geometry_round_trip_real_hippocampus(hippocampus, tmp_path):
    doc = prepare_dataset({"source": "msd", "path": str(hippocampus), "max_cases": 3}, tmp_path, 0)
    plan = make_plan(compute_fingerprint(doc), {}, 16, None)
    pre = build_preprocess_transforms(plan)
    case = doc["cases"][1]  # float32 image
    data = pre({"image": case["image"], "label": case["label"]})
    shape = list(data["image"].shape[1:])  # cropped, then padded to patch and size_divisible
    assert all(s % 16 == 0 and s >= p for s, p in zip(shape, plan["patch_size"], strict=True))
    inv = _invert_label_like(pre, data)
    orig = nib.load(case["label"])
    assert tuple(inv.shape[1:]) == orig.shape
    np.testing.assert_allclose(inv.affine.numpy(), orig.affine)
    assert np.array_equal(inv[0].numpy(), np.asarray(orig.dataobj))


def test_geometry_round_trip_dicom(dicom_dir):
    plan = {"task": "classification", "spatial_dims": 3, "spacing": [1.0, 1.0, 2.0],
            "patch_size": [16, 16, 16], "image_size": 16, "normalization": "ct",
            "ct_window": [-1000, 1000]}
    series = dicom_dir / "studyC"  # oblique MR
    pre = build_preprocess_transforms(plan)
    data = pre({"image": str(series), "class": 1})
    assert tuple(data["image"].shape) == (1, 16, 16, 16)
    inv = Invertd(keys="image", transform=pre, orig_keys="image")(data)["image"]
    orig = LoadImage(image_only=True)(str(series))
    assert tuple(inv.shape[1:]) == tuple(orig.shape)
    np.testing.assert_allclose(inv.affine.numpy(), orig.affine.numpy(), atol=1e-4)


def test_dicom_geometry_matches_the_dicom_tags(dicom_dir):
    import pydicom

    series = dicom_dir / "studyB"
    slices = sorted((pydicom.dcmread(f) for f in series.iterdir()),
                    key=lambda d: int(d.InstanceNumber))
    img = LoadImage(image_only=True)(str(series))
    assert tuple(img.shape) == (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    aff = img.affine.numpy()
    ipp = np.array([float(v) for v in slices[0].ImagePositionPatient])
    np.testing.assert_allclose(aff[:3, 3], ipp * [-1, -1, 1], atol=1e-3)  # LPS -> RAS
    px = [float(v) for v in slices[0].PixelSpacing]
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :2], axis=0), px[::-1], atol=1e-4)


def test_classification_pipeline_and_collation(tmp_path):
    doc = prepare_dataset({"source": "synthetic", "task": "classification", "spatial_dims": 2,
                           "synthetic": {"num_cases": 4, "size": [28, 24], "num_classes": 2}},
                          tmp_path, 0)
    plan = make_plan(compute_fingerprint(doc), {}, 1, fixed_size=32)
    items = [{"image": c["image"], "class": c["class"], "case_id": c["case_id"]}
             for c in doc["cases"]]
    for train in (False, True):
        tf = build_transforms(plan, train=train)
        out = tf(items[0])
        assert tuple(out["image"].shape) == (1, 32, 32)
        assert out["class"].dtype == torch.int64 and out["class"].ndim == 0
        batch = next(iter(DataLoader(Dataset(items, tf), batch_size=4)))
        assert batch["class"].dtype == torch.int64 and tuple(batch["class"].shape) == (4,)
        assert batch["class"].tolist() == [c["class"] for c in doc["cases"]]
        assert tuple(batch["image"].shape) == (4, 1, 32, 32)
    out = build_preprocess_transforms(plan)(items[0])
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("norm", ["zscore", "ct", "percentile", "minmax"])
def test_normalisations(tmp_path, norm):
    img_path, lab_path, _ = _oblique_case(tmp_path)
    plan = _seg_plan(normalization=norm, ct_window=[0, 60], crop_foreground=True)
    out = build_preprocess_transforms(plan)({"image": str(img_path), "label": str(lab_path)})
    x = out["image"]
    if norm == "zscore":
        nz = x[x != 0]
        assert abs(float(nz.mean())) < 0.05 and abs(float(nz.std()) - 1) < 0.05
    else:
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 + 1e-6


def test_segmentation_augmentation_is_seedable(tmp_path):
    img_path, lab_path, _ = _oblique_case(tmp_path)
    plan = _seg_plan()
    item = {"image": str(img_path), "label": str(lab_path)}

    def run(seed):
        tf = build_transforms(plan, train=True)
        tf.set_random_state(seed)
        return tf(dict(item))

    a, b, c = run(1), run(1), run(2)
    assert isinstance(a, list) and len(a) == 2
    for patch in a:
        assert tuple(patch["image"].shape) == (1, 16, 16, 16)
        assert tuple(patch["label"].shape) == (1, 16, 16, 16)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    batch = list_data_collate([a, b])
    assert tuple(batch["image"].shape) == (4, 1, 16, 16, 16)


def test_augment_transforms_are_only_random_ones():
    from monai.transforms import Randomizable

    tf = build_augment_transforms(_seg_plan(patch_size=[40, 56, 40]))
    assert all(isinstance(t, Randomizable) for t in tf.transforms)
    assert _rotation_axes([40, 56, 40]) == (0, 2)
    assert _rotation_axes([16, 24, 32]) is None
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ["RandClassLocationsd", "RandCropByPosNegLabeld"]
    assert "RandRotate90d" in names


def test_bad_plans_raise():
    with pytest.raises(ValueError, match="plan lacks 'patch_size'"):
        build_preprocess_transforms({"task": "segmentation", "spatial_dims": 3,
                                     "normalization": "zscore"})
    with pytest.raises(ValueError, match="patch_size"):
        build_preprocess_transforms(_seg_plan(patch_size=[16, 16]))
    with pytest.raises(ValueError, match="normalization must be"):
        build_preprocess_transforms(_seg_plan(normalization="l2"))
    with pytest.raises(ValueError, match="task must be"):
        build_augment_transforms(_seg_plan(task="detection"))


def test_geometry_round_trip_2d_segmentation(tmp_path):
    from data_helpers import make_csv

    csv = make_csv(tmp_path / "ds", task="segmentation", n=2, dims=2)
    doc = prepare_dataset({"source": "csv", "path": str(csv), "spatial_dims": 2,
                           "task": "segmentation"}, tmp_path / "out", 0)
    plan = make_plan(compute_fingerprint(doc), {}, 8, None)
    assert len(plan["patch_size"]) == 2
    pre = build_preprocess_transforms(plan)
    case = doc["cases"][0]
    data = pre({"image": case["image"], "label": case["label"]})
    assert data["image"].ndim == 3 and all(s % 8 == 0 for s in data["image"].shape[1:])
    inv = _invert_label_like(pre, data)
    orig = nib.load(case["label"])
    assert tuple(inv.shape[1:]) == orig.shape
    assert np.array_equal(inv[0].numpy(), np.asarray(orig.dataobj))
    patches = build_transforms(plan, train=True)(dict(case))
    assert tuple(patches[0]["image"].shape[1:]) == tuple(plan["patch_size"])


def test_medmnist_pipeline(breastmnist, tmp_path):
    doc = prepare_dataset({"source": "medmnist", "path": str(breastmnist), "spatial_dims": 2,
                           "max_cases": 4}, tmp_path, 0)
    plan = make_plan(compute_fingerprint(doc), {}, 1, fixed_size=28)
    case = doc["cases"][0]
    out = build_transforms(plan, train=True)({"image": case["image"], "class": case["class"]})
    assert tuple(out["image"].shape) == (1, 28, 28) and out["class"].item() == case["class"]


def test_ultrasound_keeps_its_top_down_geometry():
    """US: no vertical flip, no 90-degree turns; small affine and contrast changes instead."""
    from capsmed.data.transforms import is_ultrasound

    plan = {"task": "classification", "spatial_dims": 2, "patch_size": [28, 28],
            "normalization": "minmax", "modality": "US"}
    assert is_ultrasound(plan) and not is_ultrasound({**plan, "modality": "MRI"})
    tf = build_augment_transforms(plan)
    names = [type(t).__name__ for t in tf.transforms]
    assert "RandRotate90d" not in names and {"RandAffined", "RandAdjustContrastd"} <= set(names)
    flips = [t.flipper.spatial_axis for t in tf.transforms if type(t).__name__ == "RandFlipd"]
    assert flips == [1]
    other = [type(t).__name__ for t in build_augment_transforms({**plan, "modality": "MRI"}).transforms]
    assert other.count("RandFlipd") == 2 and "RandRotate90d" in other
    # the top row (transducer side) stays on top: a bright top band is never moved to the bottom
    image = torch.zeros(1, 28, 28)
    image[:, :4] = 1.0
    tf.set_random_state(seed=0)
    for _ in range(20):
        out = tf({"image": image.clone()})["image"]
        assert out[:, :6].mean() > out[:, -6:].mean()


def test_the_reader_is_pinned_as_validate_reads(tmp_path, dicom_dir, monkeypatch):
    """NIfTI through NibabelReader, DICOM folders through PydicomReader (capsmed validate's
    readers), named by the transforms; a reader that would win LoadImage's own choice (ITKReader
    once ITK is installed) is never asked."""
    from monai.data import ImageReader, NibabelReader, PydicomReader
    from monai.transforms.io import array as io_array

    from capsmed.data.transforms import LoadPinnedImaged, PinnedImageReader

    class ClaimsEverything(ImageReader):  # stands for ITKReader with ITK installed
        def verify_suffix(self, filename):
            return True

        def read(self, data, **kwargs):
            raise AssertionError("the pinned reader was bypassed")

        def get_data(self, img):
            raise AssertionError("the pinned reader was bypassed")

    monkeypatch.setitem(io_array.SUPPORTED_READERS, "itkreader", ClaimsEverything)
    series = dicom_dir / "studyC"
    with pytest.raises(AssertionError, match="bypassed"):
        LoadImage(image_only=True)(str(series))  # left to choose, LoadImage takes it

    nifti, _, _ = _oblique_case(tmp_path)
    plan = {"task": "classification", "spatial_dims": 3, "spacing": None,
            "patch_size": [16, 16, 16], "image_size": 16, "normalization": "minmax"}
    load = build_preprocess_transforms(plan).transforms[0]
    assert isinstance(load, LoadPinnedImaged) and isinstance(load.pinned_reader, PinnedImageReader)
    assert type(load.pinned_reader.reader_for(str(nifti))) is NibabelReader
    assert type(load.pinned_reader.reader_for(str(series))) is PydicomReader
    for path, reader in ((series, PydicomReader()), (nifti, NibabelReader())):
        loaded = load({"image": str(path)})["image"]
        array, meta = reader.get_data(reader.read(str(path)))
        np.testing.assert_array_equal(loaded.numpy(), np.asarray(array, np.float32))
        np.testing.assert_allclose(loaded.affine.numpy(), np.asarray(meta["affine"]))


def test_the_pinned_reader_reads_nifti_files_and_dicom_folders_only(tmp_path, dicom_dir):
    from capsmed.data.transforms import PinnedImageReader

    reader = PinnedImageReader()
    png = tmp_path / "slice.png"
    png.write_bytes(b"")
    with pytest.raises(ValueError, match=r"slice.png: not a NIfTI file \(.nii/.nii.gz\) or a "
                                         r"DICOM series folder"):
        reader.reader_for(str(png))
    with pytest.raises(ValueError, match="cannot read DICOM series folders and files together"):
        reader.reader_for([str(dicom_dir / "studyC"), str(tmp_path / "a.nii.gz")])
    assert not reader.verify_suffix(str(png)) and reader.verify_suffix(str(dicom_dir / "studyC"))


def test_patch_centres_come_from_sampled_locations_not_every_voxel():
    from capsmed.data.transforms import RandClassLocationsd

    label = torch.zeros(1, 60, 50, 40, dtype=torch.int64)
    label[0, 10:13, 20:22, 5:7] = 2  # 12 voxels of 120,000: found inside its bounding box
    label[0, 30:60] = 1  # half the volume: found by the uniform draws
    t = RandClassLocationsd(samples=500)
    t.set_random_state(0)
    d = t({"label": label})
    fg, bg = d["fg_locations"], d["bg_locations"]
    assert len(fg) == len(bg) == 500 and fg.dtype == bg.dtype == np.int64
    flat = label.numpy().reshape(-1)
    assert (flat[fg] > 0).all() and (flat[bg] == 0).all()
    small = label.clone()
    small[0, 30:60] = 0
    d = t({"label": small})
    assert 0 < len(d["fg_locations"]) <= 500
    assert (small.numpy().reshape(-1)[d["fg_locations"]] == 2).all()
    assert len(np.unique(d["fg_locations"])) == 12  # every voxel of the small structure drawn
    with pytest.raises(ValueError, match="samples must be at least 1, got 0"):
        RandClassLocationsd(samples=0)


def test_spatial_augment_off_keeps_the_crop_and_drops_flips_and_turns():
    """train.spatial_augment: false: the patch crop and intensity changes stay, flips and turns go;
    a patch is then an unflipped, unturned block of the image (intensities scaled and shifted)."""
    plan = _seg_plan(patch_size=[8, 8, 8], samples_per_case=3)
    names = [type(t).__name__ for t in build_augment_transforms(plan, spatial=False).transforms]
    assert names == ["RandClassLocationsd", "RandCropByPosNegLabeld", "RandScaleIntensityd",
                     "RandShiftIntensityd"]
    us = {"task": "classification", "spatial_dims": 2, "patch_size": [28, 28],
          "normalization": "minmax", "modality": "US"}
    us_names = [type(t).__name__ for t in build_augment_transforms(us, spatial=False).transforms]
    assert "RandAffined" not in us_names and "RandFlipd" not in us_names
    axes = torch.meshgrid(*[torch.arange(20.0)] * 3, indexing="ij")
    image = (axes[0] + 10 * axes[1] + 100 * axes[2])[None]  # increasing along every axis
    label = torch.zeros(1, 20, 20, 20, dtype=torch.int64)
    label[:, 5:15, 5:15, 5:15] = 1
    for spatial, expect_all_increasing in ((False, True), (True, False)):
        tf = build_augment_transforms(plan, spatial=spatial)
        tf.set_random_state(seed=0)
        increasing = []
        for _ in range(10):
            patches = tf({"image": image.clone(), "label": label.clone()})
            assert len(patches) == 3
            for p in patches:
                assert tuple(p["image"].shape) == (1, 8, 8, 8)
                steps = [torch.diff(p["image"], dim=d) for d in (1, 2, 3)]
                increasing.append(all(bool((s > 0).all()) for s in steps))
        assert all(increasing) == expect_all_increasing
    full = build_transforms(_seg_plan(), train=True, spatial=False)
    assert "RandFlipd" not in [type(t).__name__ for t in full.transforms]


def test_rotation_and_scale_augmentation_rotate_patches_by_the_asked_range():
    """train.rotate_augment / scale_augment: one RandAffined with the asked ranges (radians)."""
    import math

    plan = _seg_plan(patch_size=[8, 8, 8])
    names = [type(t).__name__ for t in build_augment_transforms(plan).transforms]
    assert "RandAffined" not in names  # off by default for MR: flips and turns only
    tf = build_augment_transforms(plan, rotate_degrees=30, scale=0.2)
    (affine,) = [t for t in tf.transforms if type(t).__name__ == "RandAffined"]
    grid = affine.rand_affine.rand_affine_grid
    assert tuple(grid.rotate_range) == (math.radians(30),) * 3  # MONAI samples +-range
    assert tuple(grid.scale_range) == (0.2,) * 3
    assert "RandAffined" not in [type(t).__name__ for t in build_augment_transforms(
        plan, spatial=False, rotate_degrees=30, scale=0.2).transforms]
    full = build_transforms(plan, train=True, rotate_degrees=10)
    assert "RandAffined" in [type(t).__name__ for t in full.transforms]


def test_augmentation_keys_leave_existing_models_hashes_alone(tmp_path):
    from capsmed.config import model_config_hash
    from tests.pipeline_helpers import tiny_config

    base = tiny_config(tmp_path)
    off = tiny_config(tmp_path, train={"epochs": 3, "batch_size": 8, "rotate_augment": 0,
                                       "scale_augment": 0})
    on = tiny_config(tmp_path, train={"epochs": 3, "batch_size": 8, "rotate_augment": 15})
    assert model_config_hash(base, "ds", "seed_cnn") == model_config_hash(off, "ds", "seed_cnn")
    assert model_config_hash(base, "ds", "seed_cnn") != model_config_hash(on, "ds", "seed_cnn")
