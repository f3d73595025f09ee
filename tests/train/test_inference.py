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
