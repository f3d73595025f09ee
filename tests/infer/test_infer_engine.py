"""Inference on one study: a capsule classifier runs once; TTA segmentation gives its uncertainty."""

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from capsmed.infer.engine import (
    POSE_STEPS,
    evidence_kind,
    predict_classification_case,
    predict_segmentation_case,
    segment,
)
from capsmed.models import get_model


def test_capsule_classifier_runs_once_per_study():
    torch.manual_seed(0)
    model = get_model("capsnet", spatial_dims=2, in_channels=1, out_channels=3).eval()
    calls = []
    original = model._class_capsules

    def counted(x):
        calls.append("capsules")
        return original(x)

    model._class_capsules = counted
    image = torch.rand(1, 28, 28)
    out = predict_classification_case(model, {"image": "unused"}, lambda d: {"image": image},
                                      torch.device("cpu"))
    assert calls.count("capsules") == 1
    with torch.no_grad():
        x = image[None]
        expected = model.probabilities(model(x))[0].numpy()
        extra = model.extra_outputs(x)
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["lengths"], extra["lengths"][0].numpy(), rtol=1e-6, atol=1e-7)
    assert out["reconstruction"].shape == (1, 28, 28)
    np.testing.assert_allclose(out["reconstruction"], extra["reconstruction"][0].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_cnn_classifier_has_no_capsule_outputs():
    model = get_model("seed_cnn", spatial_dims=2, in_channels=1, out_channels=2).eval()
    image = torch.rand(1, 28, 28)
    out = predict_classification_case(model, {"image": "unused"}, lambda d: {"image": image},
                                      torch.device("cpu"))
    assert out["lengths"] is None and out["reconstruction"] is None
    assert abs(float(out["probs"].sum()) - 1) < 1e-6


def test_classification_tta_averages_the_flips():
    from capsmed.infer.engine import classification_tta_axes

    assert classification_tta_axes({"spatial_dims": 2, "modality": "US"}) == [1]
    assert classification_tta_axes({"spatial_dims": 2, "modality": "MRI"}) == [0, 1]
    assert classification_tta_axes({"spatial_dims": 3}) == [0, 1, 2]
    torch.manual_seed(0)
    model = get_model("seed_cnn", spatial_dims=2, in_channels=1, out_channels=2).eval()
    image = torch.rand(1, 28, 28)
    out = predict_classification_case(model, {"image": "unused"}, lambda d: {"image": image},
                                      torch.device("cpu"), flips=[(), (1,)])
    with torch.no_grad():
        plain = model.probabilities(model(image[None]))[0]
        flipped = model.probabilities(model(torch.flip(image[None], (3,))))[0]
    np.testing.assert_allclose(out["probs"], ((plain + flipped) / 2).numpy(), rtol=1e-6)
    assert not np.allclose(out["probs"], plain.numpy())


def test_keep_largest_components_per_label():
    from capsmed.infer.engine import keep_largest_components

    pred = np.zeros((12, 12, 12), np.uint8)
    pred[1:4, 1:4, 1:4] = 1  # 27 voxels: kept
    pred[8:10, 8:10, 8:10] = 1  # 8 voxels, apart: removed
    pred[1:3, 8:11, 1:2] = 2  # label 2 is cleaned on its own: its largest part stays
    pred[10, 1, 10] = 2
    out = keep_largest_components(pred, 3)
    assert out.dtype == np.uint8 and out.shape == pred.shape
    assert (out == 1).sum() == 27 and (out[8:10, 8:10, 8:10] == 0).all()
    assert (out == 2).sum() == 6 and out[10, 1, 10] == 0
    np.testing.assert_array_equal(keep_largest_components(out, 3), out)


def test_segmentation_tta_gives_entropy_of_the_mean_and_per_pass_volumes(tmp_path):
    torch.manual_seed(0)
    model = get_model("unet", spatial_dims=3, in_channels=1, out_channels=3).eval()
    image = torch.rand(1, 1, 32, 32, 32)  # one window: the passes equal direct calls
    res = segment(model, image, [32, 32, 32], flips=[(), (0,), (1,), (2,)])
    assert len(res["passes"]) == 4 and len(res["seconds"]) == 4
    torch.testing.assert_close(res["probs"], torch.stack(res["passes"]).mean(0))
    with torch.no_grad():
        direct = model.probabilities(model(image.flip(3))).flip(3)
    torch.testing.assert_close(res["passes"][2], direct, rtol=1e-4, atol=1e-5)
    plain = segment(model, image, [32, 32, 32])
    assert plain["passes"] == [] and len(plain["seconds"]) == 1

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((33, 36, 34)).astype(np.float32),
                             np.eye(4)), tmp_path / "img.nii.gz")
    pre = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image")])
    icfg = {"overlap": 0.25, "sw_batch_size": 2, "tta": True}
    out = predict_segmentation_case(model, {"image": str(tmp_path / "img.nii.gz")},
                                    {"patch_size": [32, 32, 32]}, pre, torch.device("cpu"), icfg)
    assert out["uncertainty"].shape == out["pred"].shape == (33, 36, 34)
    assert 0.0 <= out["uncertainty"].min() and out["uncertainty"].max() <= 1.0
    assert out["pass_counts"].shape == (4, 3) and len(out["pass_seconds"]) == 4
    assert (out["pass_counts"].sum(1) == 33 * 36 * 34).all()
    without = predict_segmentation_case(model, {"image": str(tmp_path / "img.nii.gz")},
                                        {"patch_size": [32, 32, 32]}, pre, torch.device("cpu"),
                                        {**icfg, "tta": False})
    assert without["uncertainty"] is None and without["pass_counts"].shape == (1, 3)


def test_capsule_evidence_keeps_its_own_resolution():
    torch.manual_seed(0)
    model = get_model("ucaps", spatial_dims=3, in_channels=1, out_channels=3).eval()
    assert evidence_kind(model) == "capsule lengths"
    assert evidence_kind(get_model("unet", spatial_dims=3, in_channels=1,
                                   out_channels=3)) == "softmax"
    image = torch.rand(1, 1, 32, 32, 32)
    res = segment(model, image, [32, 32, 32], flips=[(), (0,), (1,), (2,)], evidence=True)
    with torch.no_grad():
        coarse = model.forward_train(image)["coarse_lengths"]
    assert coarse.shape[2:] == (4, 4, 4)
    expected = torch.nn.functional.interpolate(coarse, size=(32, 32, 32), mode="nearest")
    torch.testing.assert_close(res["evidence"], expected, rtol=1e-4, atol=1e-5)
    assert segment(model, image, [32, 32, 32])["evidence"] is None


def test_pose_perturbation_moves_one_dimension_of_the_winning_capsule():
    torch.manual_seed(0)
    model = get_model("capsnet", spatial_dims=2, in_channels=1, out_channels=3,
                      conv_channels=16, primary_capsules=4).eval()
    image = torch.rand(1, 28, 28)
    out = predict_classification_case(model, {"image": "unused"}, lambda d: {"image": image},
                                      torch.device("cpu"))
    panel, steps = out["perturbation"], out["perturbation_steps"]
    assert steps == POSE_STEPS and len(steps) == 11 and steps[0] == -0.25 and steps[5] == 0.0
    assert panel.shape == (16, 11, 1, 28, 28)
    np.testing.assert_allclose(panel[:, 5], np.broadcast_to(out["reconstruction"], (16, 1, 28, 28)),
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        poses = model.forward_train(image[None])["poses"]
        winner = int(poses.norm(dim=-1).argmax())
        moved = poses.clone()
        moved[0, winner, 7] += 0.25
        expected = model.decoder(moved, torch.tensor([winner]))[0].numpy()
    np.testing.assert_allclose(panel[7, 10], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(panel[7, 10], panel[7, 0])
    assert predict_classification_case(
        get_model("seed_cnn", spatial_dims=2, in_channels=1, out_channels=2).eval(),
        {"image": "unused"}, lambda d: {"image": image}, torch.device("cpu"))["perturbation"] is None


def test_volume_spread_uses_the_reported_post_processing(tmp_path, monkeypatch):
    """Each TTA pass's volume is counted after the largest-component clean-up, as the prediction."""
    import capsmed.infer.engine as engine

    torch.manual_seed(0)
    model = get_model("unet", spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8],
                      strides=[2], num_res_units=0).eval()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 18, 16)).astype(np.float32),
                             np.eye(4)), tmp_path / "img.nii.gz")
    pre = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image")])
    cleaned = []
    real = engine.keep_largest_components

    def spy(pred, n):
        out = real(pred, n)
        cleaned.append(np.bincount(out.ravel(), minlength=n)[:n])
        return out

    monkeypatch.setattr(engine, "keep_largest_components", spy)
    for lc in (False, True):
        cleaned.clear()
        icfg = {"overlap": 0.25, "sw_batch_size": 2, "tta": True, "largest_component": lc}
        out = engine.predict_segmentation_case(model, {"image": str(tmp_path / "img.nii.gz")},
                                               {"patch_size": [16, 16, 16]}, pre,
                                               torch.device("cpu"), icfg)
        # the mean's map, then each of the 4 passes: every counted map was cleaned when asked
        assert len(cleaned) == (5 if lc else 0)
        if lc:
            np.testing.assert_array_equal(out["pass_counts"], np.stack(cleaned[1:]))
