"""Inference on one study: a capsule classifier runs once and returns its extra outputs."""

import numpy as np
import torch

from capsmed.models import get_model
from capsmed.train.inference import predict_classification_case


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
    from capsmed.train.inference import classification_tta_axes

    assert classification_tta_axes({"spatial_dims": 2, "modality": "US"}) == [1]
    assert classification_tta_axes({"spatial_dims": 2, "modality": "MRI"}) == [0, 1]
    assert classification_tta_axes({"spatial_dims": 3}) == [0, 1, 2]
    torch.manual_seed(0)
    model = get_model("seed_cnn", spatial_dims=2, in_channels=1, out_channels=2).eval()
    image = torch.rand(1, 28, 28)
    out = predict_classification_case(model, {"image": "unused"}, lambda d: {"image": image},
                                      torch.device("cpu"), tta_axes=[1])
    with torch.no_grad():
        plain = model.probabilities(model(image[None]))[0]
        flipped = model.probabilities(model(torch.flip(image[None], (3,))))[0]
    np.testing.assert_allclose(out["probs"], ((plain + flipped) / 2).numpy(), rtol=1e-6)
    assert not np.allclose(out["probs"], plain.numpy())


def test_keep_largest_components_per_label():
    from capsmed.train.inference import keep_largest_components

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
