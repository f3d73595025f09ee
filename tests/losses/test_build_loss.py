import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from capsmed.losses import (
    CapsuleClassificationLoss,
    CapsuleSegmentationLoss,
    ClassificationLoss,
    SegmentationLoss,
    build_loss,
)
from capsmed.models import get_model, list_models

# Small configurations so that every model runs in well under a second.
TINY = {
    "capsnet": {"image_size": 20, "conv_channels": 16, "primary_capsules": 4,
                "decoder_hidden": (32, 64)},
    "efficient_capsnet": {"image_size": 20, "decoder_hidden": (32, 64)},
    "seed_cnn": {"image_size": 20, "channels": 8},
    "densenet": {"init_features": 8, "growth_rate": 4, "block_config": (2, 2)},
    "unet": {"channels": (4, 8, 16), "strides": (2, 2)},
    "segcaps": {"width": 4},
    "rescapsnet": {"image_size": 20, "channels": (4, 8), "primary_capsules": 2},
    "densecapsnet": {"image_size": 20, "init_features": 4, "growth_rate": 4, "block_config": (2,),
                     "primary_capsules": 2},
    "capsunet": {"encoder_channels": (4, 8), "primary_capsules": 2, "primary_dim": 4, "capsules": 2,
                 "capsule_dim": 4, "class_dim": 4, "decoder_channels": (4, 4, 4)},
    "emcapsnet": {"conv_channels": 4, "primary_capsules": 2, "capsules": (2, 2)},
    "emcapsunet": {"encoder_channels": (4, 4), "primary_capsules": 2, "capsules": 2,
                   "decoder_channels": (4, 4, 4)},
    "ucaps": {"stem_channels": (4,), "primary_capsules": 2, "encoder_capsules": (2, 2, 2, 2, 2),
              "encoder_dims": (4, 4, 4, 4, 4, 4), "decoder_channels": (8, 8, 8, 8, 8),
              "reconstruction_hidden": (8,)},
}


def _batch(model, spatial_dims, batch=2, seg_size=16):
    torch.manual_seed(0)
    if model.task == "classification":
        size = model.image_size or 20
        x = torch.rand(batch, model.in_channels, *(size,) * spatial_dims)
        target = torch.arange(batch) % model.out_channels
    else:
        x = torch.rand(batch, model.in_channels, *(seg_size,) * spatial_dims)
        target = torch.randint(0, model.out_channels, (batch, 1, *(seg_size,) * spatial_dims))
    return x, target


@pytest.mark.parametrize("name", sorted(TINY))
def test_build_loss_for_every_model(name):
    assert set(TINY) == set(list_models())
    model = get_model(name, 2, 1, 3, **TINY[name])
    loss_fn = build_loss(model)
    x, target = _batch(model, 2)
    outputs = model.forward_train(x, target)
    loss = loss_fn(outputs, target, x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert loss_fn.last_terms
    total = sum(v for v in loss_fn.last_terms.values())
    torch.testing.assert_close(total, loss.detach())


@pytest.mark.parametrize("name", ["capsnet", "segcaps", "ucaps", "unet"])
def test_build_loss_in_3d(name):
    config = dict(TINY[name])
    if name == "capsnet":
        config["image_size"] = 17
    model = get_model(name, 3, 1, 2, **config)
    x, target = _batch(model, 3, seg_size=8)
    loss = build_loss(model)(model.forward_train(x, target), target, x)
    assert torch.isfinite(loss)


def test_loss_kinds_and_terms():
    kinds = {
        "seed_cnn": (ClassificationLoss, {"ce"}),
        "densenet": (ClassificationLoss, {"ce"}),
        "capsnet": (CapsuleClassificationLoss, {"margin", "reconstruction"}),
        "efficient_capsnet": (CapsuleClassificationLoss, {"margin", "reconstruction"}),
        "unet": (SegmentationLoss, {"dice_ce"}),
        "ucaps": (SegmentationLoss, {"dice_ce", "margin", "reconstruction"}),
        "segcaps": (CapsuleSegmentationLoss, {"dice", "margin", "reconstruction"}),
        "rescapsnet": (CapsuleClassificationLoss, {"margin"}),
        "densecapsnet": (CapsuleClassificationLoss, {"margin"}),
        "capsunet": (SegmentationLoss, {"dice_ce", "margin"}),
    }
    for name, (cls, terms) in kinds.items():
        model = get_model(name, 2, 1, 3, **TINY[name])
        loss_fn = build_loss(model)
        assert isinstance(loss_fn, cls), name
        x, target = _batch(model, 2)
        with torch.no_grad():
            loss_fn(model.forward_train(x, target), target, x)
        assert set(loss_fn.last_terms) == terms, name


def test_classification_logits_is_cross_entropy():
    model = get_model("seed_cnn", 2, 1, 3, **TINY["seed_cnn"])
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, 1, 1])
    loss = build_loss(model, ce_weight=2.0)({"scores": logits}, target, None)
    torch.testing.assert_close(loss, 2.0 * F.cross_entropy(logits, target))
    loss = build_loss(model)({"scores": logits}, target[:, None].float(), None)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_segmentation_logits_is_monai_dice_ce():
    model = get_model("unet", 2, 1, 3, **TINY["unet"])
    logits = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    loss = build_loss(model, dice_weight=0.5, ce_weight=2.0)({"scores": logits}, label, None)
    expected = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=2.0)(
        logits, label)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(build_loss(model)({"scores": logits}, label[:, 0], None),
                               DiceCELoss(to_onehot_y=True, softmax=True)(logits, label))


def test_capsule_classification_weights_by_hand():
    model = get_model("capsnet", 2, 1, 2, **TINY["capsnet"])
    lengths = torch.tensor([[0.95, 0.3]])
    image = torch.zeros(1, 1, 20, 20)
    recon = torch.full((1, 1, 20, 20), 0.5)
    outputs = {"scores": lengths, "reconstruction": recon}
    loss_fn = build_loss(model, margin_weight=2.0, reconstruction_weight=0.01)
    # margin: 0.5 * (0.3 - 0.1)^2 = 0.02 (x2); reconstruction: 0.01 * 400 * 0.25 = 1.0
    torch.testing.assert_close(loss_fn(outputs, torch.tensor([0]), image), torch.tensor(1.04))
    no_recon = build_loss(model, reconstruction_weight=0)
    torch.testing.assert_close(no_recon(outputs, torch.tensor([0]), image), torch.tensor(0.02))
    assert set(no_recon.last_terms) == {"margin"}


def test_capsnet_reconstruction_weight_defaults():
    model = get_model("capsnet", 2, 1, 10, conv_channels=8, primary_capsules=2)
    assert build_loss(model).reconstruction.weight == pytest.approx(0.0005)
    model3d = get_model("capsnet", 3, 1, 2, image_size=28, conv_channels=4, primary_capsules=2,
                        decoder_hidden=(8,))
    # rescaled so that the term keeps the paper's share: 0.0005 * 784 / 28^3
    assert build_loss(model3d).reconstruction.weight == pytest.approx(0.0005 / 28)
    assert build_loss(model3d, reconstruction_weight=0.1).reconstruction.weight == 0.1


def test_margin_settings_reach_the_margin_loss():
    model = get_model("segcaps", 2, 1, 2, **TINY["segcaps"])
    loss_fn = build_loss(model, margin_m_plus=0.8, margin_m_minus=0.2, margin_lambda=0.25)
    assert (loss_fn.margin.m_plus, loss_fn.margin.m_minus, loss_fn.margin.lambda_) == (
        0.8, 0.2, 0.25)


def test_capsule_segmentation_by_hand():
    model = get_model("segcaps", 2, 1, 2, **TINY["segcaps"])
    lengths = torch.tensor([[[[0.95, 0.05]], [[0.05, 0.95]]]])  # (1, 2, 1, 2), perfect
    label = torch.tensor([[[[0, 1]]]])
    loss_fn = build_loss(model, reconstruction_weight=0)
    loss = loss_fn({"scores": lengths}, label, None)
    # margin 0; soft Dice per class: 1 - 2*0.95 / (0.95 + 0.05 + 1) = 0.05
    torch.testing.assert_close(loss, torch.tensor(0.05), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"dice": 1.0}, "unknown loss weight"),
        ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
        ({"reconstruction_weight": "big"}, "reconstruction_weight must be a number"),
        ({"margin_weight": math.inf}, "margin_weight must be finite"),
        ({"margin_m_plus": 1.2}, "margin_m_plus must lie"),
        ({"margin_m_minus": 0.95}, "margin_m_minus must lie"),
        ({"margin_lambda": -0.5}, "margin_lambda must be >= 0"),
        ({"dice_weight": 0, "ce_weight": 0}, "must not both be 0"),
    ],
)
def test_build_loss_errors(weights, message):
    model = get_model("unet", 2, 1, 2, **TINY["unet"])
    with pytest.raises(ValueError, match=message):
        build_loss(model, **weights)


def test_build_loss_rejects_non_models_and_accepts_none():
    with pytest.raises(ValueError, match="task"):
        build_loss(torch.nn.Linear(2, 2))
    model = get_model("seed_cnn", 2, 1, 2, **TINY["seed_cnn"])
    assert isinstance(build_loss(model, ce_weight=None, margin_weight=0.3), ClassificationLoss)


def test_missing_outputs_are_named():
    model = get_model("segcaps", 2, 1, 2, **TINY["segcaps"])
    with pytest.raises(ValueError, match="'reconstruction'"):
        build_loss(model)({"scores": torch.rand(1, 2, 8, 8)}, torch.zeros(1, 1, 8, 8),
                          torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="label map"):
        build_loss(model)({"scores": torch.rand(1, 2, 8, 8)}, torch.zeros(1, 2, 8, 8),
                          torch.zeros(1, 1, 8, 8))


def test_class_weights_weigh_the_margin_loss_like_cross_entropy():
    """Weighted margin loss = sum_i w[y_i] L_i / sum_i w[y_i]; weighted CE is PyTorch's own."""
    from capsmed.losses import MarginLoss

    model = get_model("rescapsnet", 2, 1, 3, **TINY["rescapsnet"])
    lengths = torch.tensor([[0.95, 0.2, 0.05], [0.3, 0.6, 0.1], [0.5, 0.5, 0.5]])
    target = torch.tensor([0, 1, 2])
    weights = torch.tensor([0.5, 1.0, 3.0])
    per_item = MarginLoss(reduction="none")(lengths, target)
    expected = (weights[target] * per_item).sum() / weights[target].sum()
    loss = build_loss(model, class_weights=weights)({"scores": lengths}, target, None)
    torch.testing.assert_close(loss, expected)
    # equal weights give the plain mean
    plain = build_loss(model, class_weights=torch.ones(3))({"scores": lengths}, target, None)
    torch.testing.assert_close(plain, per_item.mean())
    cnn = get_model("seed_cnn", 2, 1, 3, **TINY["seed_cnn"])
    logits = torch.randn(3, 3)
    ce = build_loss(cnn, class_weights=weights)({"scores": logits}, target, None)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target, weight=weights))
