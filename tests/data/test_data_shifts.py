"""Tests of capsmed.data.shifts: identity at severity 0, monotone severities, labels that follow
spatial shifts, determinism, shapes, the default lists, settings and one test per message."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from capsmed.data.shifts import (
    KINDS,
    SHIFTS,
    apply_shift,
    default_shifts,
    is_binary_intensity,
    shift_kind,
    shift_settings,
    validate_shift_config,
)
from capsmed.errors import CapsmedError


def _grey(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth positive image with an off-centre bright box labelled 1 (and a dim one, 2)."""
    rng = np.random.default_rng(7)
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)  # tissue-like, smooth
    image = 150 + 40 * sum(grids) + 100 * texture / np.abs(texture).max()
    label = np.zeros(shape, np.int64)
    box = tuple(slice(s // 5, s // 5 + max(3, s // 3)) for s in shape)
    image[box] += 500
    label[box] = 1
    dim = tuple(slice(s - 2 - max(2, s // 5), s - 2) for s in shape)
    image[dim] += 150
    label[dim] = 2
    return image[None].astype(np.float32), label


def _mask(shape: tuple[int, ...]) -> np.ndarray:
    """A two-valued (0 / 255) off-centre ellipsoid, as AdrenalMNIST3D's shape masks."""
    grids = np.meshgrid(*[np.arange(s) - 0.4 * s for s in shape], indexing="ij")
    inside = sum((g / (0.3 * s)) ** 2 for g, s in zip(grids, shape, strict=True)) <= 1
    return (inside * 255.0)[None].astype(np.float32)


SHAPES = {3: (17, 20, 15), 2: (27, 31)}


def _cases() -> list[tuple[str, str, int]]:
    """Every (shift, kind, dims) the registry allows, one representative kind per family."""
    out = []
    for name, shift in SHIFTS.items():
        for kind in shift.applies_to:
            for dims in shift.dims:
                if kind in ("us", "image2d", "ct") and dims == 3 and "mr" in shift.applies_to:
                    continue  # the same code path as mr in 3D
                out.append((name, kind, dims))
    return out


CASES = _cases()


def _inputs(kind: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = _grey(SHAPES[dims])
    if kind == "mask":
        image = _mask(SHAPES[dims])
        label = (image[0] > 0).astype(np.int64)
    elif kind == "ct":
        image = image * 2 - 1000  # HU: air around -1000
    return image, label


@pytest.mark.parametrize(("name", "kind", "dims"), CASES)
def test_severity_zero_is_the_identity(name, kind, dims):
    image, label = _inputs(kind, dims)
    out, out_label = apply_shift(name, 0, image, label, seed_key="case_1", kind=kind)
    assert out is image and out_label is label


@pytest.mark.parametrize(("name", "kind", "dims"), CASES)
def test_severities_are_monotone_and_shapes_kept(name, kind, dims):
    image, label = _inputs(kind, dims)
    distances = []
    for severity in range(1, 6):
        out, out_label = apply_shift(name, severity, image, label, seed_key="case_1", kind=kind)
        assert out.shape == image.shape and out.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == label.dtype
        assert set(np.unique(out_label)) <= set(np.unique(label))
        if not SHIFTS[name].spatial:
            assert out_label is label
        if kind == "mask":
            assert set(np.unique(out)) <= {0.0, 255.0}
        distances.append(float(np.abs(out.astype(np.float64) - image).mean()))
    assert distances[0] > 0
    if name == "pixelate":  # block grids align differently per size: monotone on average only
        assert distances[-1] > distances[0]
    else:
        assert np.all(np.diff(distances) > 0), distances


def test_us_shifts_are_monotone_on_breastmnist(shared_data):
    path = shared_data / "medmnist" / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    images = np.load(path)["test_images"][:20].astype(np.float32)
    for name in default_shifts({"spatial_dims": 2, "modality": "US"}):
        distances = np.mean([[np.abs(apply_shift(name, s, x[None], None, seed_key=str(i),
                                                 kind="us")[0] - x).mean()
                              for s in range(1, 6)] for i, x in enumerate(images)], axis=0)
        assert np.all(np.diff(distances) > 0), (name, distances)


@pytest.mark.parametrize(("name", "kind", "dims"), CASES)
def test_deterministic_per_case_and_different_between_cases(name, kind, dims):
    image, label = _inputs(kind, dims)
    a = apply_shift(name, 3, image, label, seed_key="case_1", kind=kind)
    b = apply_shift(name, 3, image, label, seed_key="case_1", kind=kind)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    if name in ("hu_offset", "hu_scale", "gamma", "scaling", "brightness_up", "brightness_down",
                "contrast_up", "contrast_down", "pixelate", "jpeg_compression", "blur"):
        return  # deterministic, or only a sign drawn per case: two keys may agree
    others = [apply_shift(name, 3, image, label, seed_key=f"case_{k}", kind=kind)[0]
              for k in range(2, 5)]
    assert any(not np.array_equal(a[0], o) for o in others)


@pytest.mark.parametrize("name", ["rotation", "scaling"])
@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_shifts_move_labels_with_the_image(name, dims):
    image, label = _grey(SHAPES[dims])
    for severity in (1, 3, 5):
        out, out_label = apply_shift(name, severity, image, label, seed_key="c", kind="mr")
        bright = np.argwhere(out[0] > 450)  # the labelled box is the only region this bright
        box = np.argwhere(out_label == 1)
        assert abs(len(bright) - len(box)) <= 0.25 * len(box)
        np.testing.assert_allclose(bright.mean(0), box.mean(0), atol=0.75)
        moved = np.abs(box.mean(0) - np.argwhere(label == 1).mean(0)).max()
        assert moved > 0.5 or severity < 5


def test_rotation_turns_by_the_table_angle():
    # A 2D line through the centre, rotated: the principal axis of its pixels turns by the angle.
    image = np.zeros((1, 61, 61), np.float32)
    image[0, 30, 5:56] = 1000
    for severity, degrees in zip(range(1, 6), SHIFTS["rotation"].table["*"], strict=True):
        out, _ = apply_shift("rotation", severity, image, None, seed_key="k", kind="mr")
        pts = np.argwhere(out[0] > 500).astype(float)
        pts -= pts.mean(0)
        _, vecs = np.linalg.eigh(pts.T @ pts)
        angle = np.degrees(np.arccos(abs(vecs[1, -1])))
        assert angle == pytest.approx(degrees, abs=1.0)


def test_noise_std_follows_the_table():
    image = np.full((1, 40, 40, 40), 1000.0, np.float32)
    image[0, :20] = 0
    out, _ = apply_shift("noise", 4, image, None, seed_key="k", kind="ct")
    assert float((out - image).std()) == pytest.approx(SHIFTS["noise"].table["ct"][3], rel=0.02)


def test_anisotropy_uses_physical_spacing_free_grid_and_keeps_odd_shapes():
    image, label = _grey((9, 13, 11))
    out, out_label = apply_shift("rotation", 5, image, label, seed_key="k", spacing=(1, 1, 3))
    assert out.shape == image.shape and out_label.shape == label.shape
    # out of field: the image's minimum, label background
    assert float(out.min()) >= float(image.min()) - 1e-3


def test_default_shifts_per_kind():
    mr = {"spatial_dims": 3, "modality": "MRI", "intensity": {}}
    assert default_shifts(mr) == ["rotation", "scaling", "anisotropy", "bias_field", "noise",
                                  "gamma", "motion", "ghosting", "spike", "blur"]
    ct = {"spatial_dims": 3, "modality": "CT"}
    assert default_shifts(ct) == ["noise", "blur", "anisotropy", "hu_offset", "hu_scale",
                                  "rotation", "scaling"]
    us = {"spatial_dims": 2, "modality": "US"}
    assert default_shifts(us) == ["speckle_noise", "motion_blur", "pixelate", "jpeg_compression",
                                  "brightness_up", "brightness_down", "contrast_down",
                                  "rotation", "scaling"]
    mask = {"spatial_dims": 3, "modality": "other",
            "intensity": {"mean": 25.5, "std": 76.5, "min": 0.0, "max": 255.0}}
    assert shift_kind(mask) == "mask"
    assert default_shifts(mask) == ["rotation", "scaling", "anisotropy", "boundary_noise"]
    assert shift_kind({"spatial_dims": 2, "modality": "other"}) == "image2d"
    assert "motion" not in default_shifts({"spatial_dims": 2, "modality": "MRI"})
    for plan in (mr, ct, us, mask):
        for name in default_shifts(plan):
            assert shift_kind(plan) in SHIFTS[name].applies_to
    assert set(KINDS) == {k for s in SHIFTS.values() for k in s.applies_to}


def test_binary_intensity_is_the_bhatia_davis_equality():
    values = np.r_[np.zeros(90), np.full(10, 255.0)]
    stats = {"mean": values.mean(), "std": values.std(), "min": 0.0, "max": 255.0}
    assert is_binary_intensity(stats)
    values = np.r_[np.zeros(90), np.full(5, 100.0), np.full(5, 255.0)]
    assert not is_binary_intensity({"mean": values.mean(), "std": values.std(), "min": 0.0,
                                    "max": 255.0})


def test_adrenalmnist3d_plan_is_a_mask(shared_data):
    path = shared_data / "medmnist" / "adrenalmnist3d.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    images = np.load(path)["test_images"][:20].astype(np.float64)
    stats = {"mean": images.mean(), "std": images.std(), "min": images.min(),
             "max": images.max()}
    assert shift_kind({"spatial_dims": 3, "modality": "other", "intensity": stats}) == "mask"


def test_unknown_shift_name():
    image, label = _grey(SHAPES[2])
    with pytest.raises(CapsmedError, match=r"^unknown shift 'twist'; known: anisotropy, "):
        apply_shift("twist", 1, image, label, seed_key="k")


@pytest.mark.parametrize("severity", [6, -1, 2.5, True, "3"])
def test_bad_severity(severity):
    image, label = _grey(SHAPES[2])
    with pytest.raises(CapsmedError, match=r"^shift severity must be an integer from 0 \(none\) "
                                           r"to 5, got "):
        apply_shift("rotation", severity, image, label, seed_key="k")


def test_shift_for_another_kind():
    image, label = _grey(SHAPES[3])
    with pytest.raises(CapsmedError, match=r"^shift 'hu_offset' applies to ct images, not mr$"):
        apply_shift("hu_offset", 1, image, label, seed_key="k", kind="mr")


def test_shift_for_other_dims():
    image, label = _grey(SHAPES[2])
    with pytest.raises(CapsmedError, match=r"^shift 'motion' applies to 3D images, not 2D$"):
        apply_shift("motion", 1, image, label, seed_key="k", kind="mr")


def test_unknown_kind():
    image, label = _grey(SHAPES[2])
    with pytest.raises(ValueError, match="kind must be one of mr, ct, us, image2d, mask"):
        apply_shift("rotation", 1, image, label, seed_key="k", kind="pet")


def test_label_shape_must_match():
    image, label = _grey(SHAPES[2])
    with pytest.raises(ValueError, match="label shape"):
        apply_shift("rotation", 1, image, label[:-1], seed_key="k")


def test_image_must_have_a_channel_axis():
    with pytest.raises(ValueError, match=r"image must be \(C, \*S\)"):
        apply_shift("rotation", 1, np.zeros((5, 5)), None, seed_key="k")


def test_spacing_must_fit():
    image, _ = _grey(SHAPES[2])
    with pytest.raises(ValueError, match="spacing must be 2 positive values"):
        apply_shift("rotation", 1, image, None, seed_key="k", spacing=(1, 0))


# ---------------------------------------------------------------------------------------------
# settings

PLAN_MR = {"spatial_dims": 3, "modality": "MRI", "intensity": {}}


def test_settings_defaults_come_from_the_schema():
    from capsmed.config import validate_config

    cfg = validate_config({"datasets": {"d": {"source": "synthetic", "task": "segmentation"}}})
    assert cfg["shift"] == {"enabled": True, "severities": [1, 2, 3, 4, 5], "shifts": None,
                            "tta": False, "reference": None}
    settings = shift_settings(cfg, "d", PLAN_MR)
    assert settings == {"enabled": True, "shifts": default_shifts(PLAN_MR),
                        "severities": [1, 2, 3, 4, 5], "tta": False, "reference": None}
    assert shift_settings({}, "d", PLAN_MR) == settings


def test_dataset_block_overrides_the_global_one():
    from capsmed.config import dataset_hash, validate_config

    ds = {"source": "synthetic", "task": "segmentation"}
    base = validate_config({"datasets": {"d": ds}})
    cfg = validate_config({"shift": {"severities": [5, 1, 1], "tta": True},
                           "datasets": {"d": {**ds, "shift": {"shifts": ["rotation", "noise"]}},
                                        "e": {**ds, "shift": {"enabled": False}}}})
    assert shift_settings(cfg, "d", PLAN_MR) == {"enabled": True, "shifts": ["rotation", "noise"],
                                                 "severities": [1, 5], "tta": True,
                                                 "reference": None}
    assert shift_settings(cfg, "e", PLAN_MR)["enabled"] is False
    assert shift_settings(cfg, "e", PLAN_MR)["shifts"] == []
    # the shifted stages do not touch a dataset's files
    assert dataset_hash(cfg, "d") == dataset_hash(base, "d")


def test_settings_unknown_name_names_the_dataset():
    cfg = {"datasets": {"hippo": {"shift": {"shifts": ["rotation", "twirl"]}}}}
    with pytest.raises(CapsmedError, match=r"^datasets\.hippo\.shift\.shifts: unknown shift "
                                           r"'twirl'; known: "):
        shift_settings(cfg, "hippo", PLAN_MR)


def test_settings_unsuitable_name_names_the_dataset():
    cfg = {"datasets": {"hippo": {"shift": {"shifts": ["pixelate"]}}}}
    with pytest.raises(CapsmedError, match=r"^datasets\.hippo\.shift\.shifts: shift 'pixelate' "
                                           r"applies to us, image2d images, not mr$"):
        shift_settings(cfg, "hippo", PLAN_MR)


def test_settings_bad_severity_names_the_dataset():
    cfg = {"shift": {"severities": [1, 9]}}
    with pytest.raises(CapsmedError, match=r"^datasets\.hippo\.shift\.severities: shift severity "
                                           r"must be an integer"):
        shift_settings(cfg, "hippo", PLAN_MR)


def test_settings_severity_zero_is_always_run():
    cfg = {"shift": {"severities": [0, 1]}}
    with pytest.raises(CapsmedError, match=r"severity 0 is the clean reference, always run"):
        shift_settings(cfg, "hippo", PLAN_MR)


def test_schema_rejects_severity_out_of_range():
    from capsmed.config import validate_config

    with pytest.raises(CapsmedError, match=r"shift\.severities\.0: 6 is greater than the maximum"):
        validate_config({"shift": {"severities": [6]},
                         "datasets": {"d": {"source": "synthetic", "task": "segmentation"}}})


def test_validate_shift_config_lists_unknown_names():
    cfg = {"shift": {"shifts": ["rotation", "spin"]},
           "datasets": {"d": {"shift": {"shifts": ["warp"]}}, "e": {}}}
    problems = validate_shift_config(cfg, "c.yaml")
    assert len(problems) == 2
    assert problems[0].startswith("c.yaml: shift.shifts: unknown shift 'spin'; known: ")
    assert problems[1].startswith("c.yaml: datasets.d.shift.shifts: unknown shift 'warp'")
    assert validate_shift_config({"datasets": {"d": {}}}) == []
