"""Matrix-capsule models with EM routing: emcapsnet (classifier) and emcapsunet (segmenter)."""

import pytest
import torch

from capsmed.errors import CapsmedError
from capsmed.losses import SegmentationLoss, SpreadClassificationLoss, build_loss
from capsmed.models import get_model

TINY_NET = {"conv_channels": 4, "primary_capsules": 2, "capsules": (3, 2)}
TINY_UNET = {"encoder_channels": (4, 4), "primary_capsules": 2, "capsules": 2,
             "decoder_channels": (4, 4, 4)}


def _finite_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (17, 20)), (3, (13, 15, 14))])
def test_emcapsnet_forward_backward(spatial_dims, size):
    torch.manual_seed(0)
    model = get_model("emcapsnet", spatial_dims, 2, 3, **TINY_NET)
    x = torch.rand(2, 2, *size)
    acts = model(x)
    assert acts.shape == (2, 3) and ((acts >= 0) & (acts <= 1)).all()
    torch.testing.assert_close(model.probabilities(acts).sum(1), torch.ones(2))
    out = model.forward_train(x, torch.tensor([0, 2]))
    assert out["poses"].shape == (2, 3, 16)
    loss_fn = build_loss(model)
    assert isinstance(loss_fn, SpreadClassificationLoss)
    loss_fn(out, torch.tensor([0, 2]), x).backward()
    assert _finite_grads(model)
    assert model.extra_outputs(x)["lengths"].shape == (2, 3)


def test_emcapsnet_zero_input_is_finite():
    model = get_model("emcapsnet", 2, 1, 2, **TINY_NET)
    x = torch.zeros(2, 1, 16, 16)
    out = model.forward_train(x)
    assert torch.isfinite(out["scores"]).all()
    build_loss(model)(out, torch.tensor([0, 1]), x).backward()
    assert _finite_grads(model)


def test_emcapsnet_default_parameter_count():
    # the paper's small network (A=64, B=8, C=D=16) for 10 classes, one channel:
    conv = 25 * 64 + 64 + 2 * 64  # 5x5 convolution and batch norm
    primary = 64 * 8 * 17 + 8 * 17  # 1x1: 16 pose entries and one logit per type
    caps1 = 9 * 8 * 16 * 16 + 2 * 16  # one 4x4 W per window offset, input and output type; betas
    caps2 = 9 * 16 * 16 * 16 + 2 * 16
    classes = 16 * 10 * 16 + 2 * 10
    assert get_model("emcapsnet", 2, 1, 10).num_parameters() == conv + primary + caps1 + caps2 + classes


def test_emcapsnet_input_checks():
    model = get_model("emcapsnet", 2, 1, 2, **TINY_NET)
    with pytest.raises(CapsmedError, match="needs every spatial size >= 13"):
        model(torch.rand(1, 1, 12, 20))
    with pytest.raises(ValueError, match="capsules must list 2 widths"):
        get_model("emcapsnet", 2, 1, 2, capsules=(4,))
    with pytest.raises(ValueError, match="primary_capsules must be >= 1"):
        get_model("emcapsnet", 2, 1, 2, primary_capsules=0)


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (16, 24)), (3, (16, 8, 16))])
def test_emcapsunet_forward_backward(spatial_dims, size):
    torch.manual_seed(0)
    model = get_model("emcapsunet", spatial_dims, 1, 3, **TINY_UNET)
    x = torch.rand(2, 1, *size)
    logits = model(x)
    assert logits.shape == (2, 3, *size)
    out = model.forward_train(x)
    coarse = tuple(s // 8 for s in size)
    assert out["coarse_lengths"].shape == (2, 3, *coarse)
    loss_fn = build_loss(model)
    assert isinstance(loss_fn, SegmentationLoss) and loss_fn.coarse_margin is not None
    label = torch.randint(0, 3, (2, 1, *size))
    loss_fn(out, label, x).backward()
    assert _finite_grads(model)
    assert set(loss_fn.last_terms) == {"dice_ce", "margin"}
    assert model.extra_outputs(x)["coarse_lengths"].shape == (2, 3, *coarse)


def test_emcapsunet_checks():
    model = get_model("emcapsunet", 2, 1, 2, **TINY_UNET)
    with pytest.raises(CapsmedError, match="divisible by 8"):
        model(torch.rand(1, 1, 12, 16))
    with pytest.raises(ValueError, match="encoder_channels must list 2 widths"):
        get_model("emcapsunet", 2, 1, 2, encoder_channels=(4,))
    with pytest.raises(ValueError, match="widths and capsule counts must be >= 1"):
        get_model("emcapsunet", 2, 1, 2, capsules=0)
