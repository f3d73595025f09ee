import pytest
import torch

from capsmed.losses import build_loss
from capsmed.models import get_model
from capsmed.models.segcaps import select_class_capsules

SMALL_CAPSNET = {"conv_channels": 16, "primary_capsules": 4, "decoder_hidden": (32, 64)}


def _finite_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads)


def _check_classifier(model, x, classes):
    lengths = model(x)
    assert lengths.shape == (x.shape[0], classes)
    assert ((lengths >= 0) & (lengths < 1)).all()
    torch.testing.assert_close(model.probabilities(lengths).sum(1), torch.ones(x.shape[0]))
    target = torch.arange(x.shape[0]) % classes
    out = model.forward_train(x, target)
    assert {"scores", "lengths", "poses", "reconstruction"} <= out.keys()
    assert out["reconstruction"].shape == x.shape
    extra = model.extra_outputs(x)
    assert extra.keys() == {"lengths", "reconstruction"}
    assert extra["reconstruction"].shape == x.shape
    return out


# ---------------------------------------------------------------- classifiers
@pytest.mark.parametrize("name", ["capsnet", "efficient_capsnet"])
@pytest.mark.parametrize("image_size", [28, 20])
def test_capsule_classifiers_2d(name, image_size):
    model = get_model(name, 2, 1, 10, image_size=image_size)
    x = torch.rand(2, 1, image_size, image_size)
    out = _check_classifier(model, x, 10)
    assert out["poses"].shape == (2, 10, 16)
    assert model.fixed_size and model.input_size() == (image_size, image_size)


@pytest.mark.parametrize("name", ["capsnet", "efficient_capsnet"])
def test_capsule_classifiers_3d(name):
    model = get_model(name, 3, 2, 3, image_size=20, decoder_hidden=(32, 64))
    _check_classifier(model, torch.rand(2, 2, 20, 20, 20), 3)


@pytest.mark.parametrize("name", ["capsnet", "efficient_capsnet"])
def test_capsule_classifiers_3d_defaults_at_28(name):
    model = get_model(name, 3, 1, 2, decoder_hidden=(16, 16))
    if name == "capsnet":
        assert model.conv.out_channels == 32 and model.num_primary == 8 * 6**3
    x = torch.rand(1, 1, 28, 28, 28)
    assert model(x).shape == (1, 2)
    assert model.forward_train(x)["reconstruction"].shape == x.shape


def test_capsnet_paper_parameter_count():
    model = get_model("capsnet", 2, 1, 10)
    conv = 81 * 256 + 256
    primary = 256 * 256 * 81 + 256
    digits = 1152 * 10 * 16 * 8
    decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
    assert model.num_parameters() == conv + primary + digits + decoder == 8_215_568


def test_efficient_capsnet_has_161k_parameters_on_mnist():
    model = get_model("efficient_capsnet", 2, 1, 10)
    # convs + batch norm 140,528; depthwise primary caps 10,496; attention capsules W 20,480 + B 160
    assert model.backbone_parameters() == 161_824
    assert model.grid_size == 9


def test_classifier_input_and_argument_errors():
    model = get_model("capsnet", 2, 1, 3, **SMALL_CAPSNET)
    with pytest.raises(ValueError, match=r"inputs of size \(28, 28\)"):
        model(torch.rand(1, 1, 20, 20))
    with pytest.raises(ValueError, match="class indices"):
        model.forward_train(torch.rand(2, 1, 28, 28), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.forward_train(torch.rand(1, 1, 28, 28), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"image_size must be >= 2 \* kernel_size - 1 = 17"):
        get_model("capsnet", 2, 1, 3, image_size=16)
    with pytest.raises(ValueError, match="primary_capsules \\* primary_dim"):
        get_model("efficient_capsnet", 2, 1, 3, primary_capsules=8)
    with pytest.raises(ValueError, match="image_size must be >= 11"):
        get_model("efficient_capsnet", 2, 1, 3, image_size=10)


def test_decoder_is_fed_the_true_or_the_longest_capsule():
    torch.manual_seed(0)
    model = get_model("capsnet", 2, 1, 3, image_size=20, **SMALL_CAPSNET).eval()
    x = torch.rand(2, 1, 20, 20)
    with torch.no_grad():
        lengths = model(x)
        longest = model.forward_train(x)["reconstruction"]
        as_target = model.forward_train(x, lengths.argmax(1))["reconstruction"]
        other = model.forward_train(x, (lengths.argmax(1) + 1) % 3)["reconstruction"]
        one_hot = torch.nn.functional.one_hot(lengths.argmax(1), 3)
        from_one_hot = model.forward_train(x, one_hot)["reconstruction"]
    torch.testing.assert_close(longest, as_target)
    torch.testing.assert_close(longest, from_one_hot)
    assert not torch.equal(longest, other)
    # the decoder sees only the selected capsule
    poses = torch.randn(2, 3, 16)
    masked = poses.clone()
    masked[:, 1:] = 0
    index = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(model.decoder(poses, index), model.decoder(masked, index))


# ---------------------------------------------------------------- segmenters
@pytest.mark.parametrize("name", ["segcaps", "ucaps"])
@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (24, 40)), (3, (16, 48, 32))])
def test_capsule_segmenters_shapes(name, spatial_dims, size):
    torch.manual_seed(0)
    model = get_model(name, spatial_dims, 2, 3)
    assert model.size_divisible == 8
    x = torch.rand(1, 2, *size)
    scores = model(x)
    assert scores.shape == (1, 3, *size)
    if model.output_kind == "lengths":
        assert ((scores >= 0) & (scores < 1)).all()
    torch.testing.assert_close(model.probabilities(scores).sum(1), torch.ones(1, *size))
    target = torch.randint(0, 3, (1, 1, *size))
    out = model.forward_train(x, target)
    assert out["scores"].shape == (1, 3, *size)
    assert out["reconstruction"].shape == x.shape
    if name == "ucaps":
        assert out["coarse_lengths"].shape == (1, 3, *(s // 8 for s in size))
    else:
        assert out["poses"].shape[:3] == (1, 3, model.seg.out_dim)
    assert model.extra_outputs(x)["reconstruction"].shape == x.shape
    loss = build_loss(model)(out, target, x)
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(model)


@pytest.mark.parametrize("name", ["segcaps", "ucaps", "unet"])
def test_segmenters_reject_sizes_not_divisible(name):
    model = get_model(name, 3, 1, 2)
    with pytest.raises(ValueError, match=f"divisible by {model.size_divisible}") as info:
        model(torch.rand(1, 1, 16, 33, 32))
    assert "(16, 33, 32)" in str(info.value)


def test_segcaps_targets_with_and_without_channel_axis():
    torch.manual_seed(0)
    model = get_model("segcaps", 2, 1, 3, width=4).eval()
    x = torch.rand(1, 1, 16, 16)
    label = torch.randint(0, 3, (1, 16, 16))
    with torch.no_grad():
        a = model.forward_train(x, label)["reconstruction"]
        b = model.forward_train(x, label[:, None].float())["reconstruction"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="label values"):
        model.forward_train(x, torch.full((1, 1, 16, 16), 3))
    with pytest.raises(ValueError, match="label map"):
        model.forward_train(x, torch.zeros(1, 3, 16, 16))


def test_segcaps_paper_layout_in_2d():
    model = get_model("segcaps", 2, 1, 2)
    assert model.seg.out_dim == 16 and model.enc3_2.out_dim == 64
    assert model.up1.conv.kernel_size == (4, 4) and model.enc2_1.conv.kernel_size == (5, 5)
    # the paper reports 1.4M parameters for the binary network
    assert 1.3e6 < model.num_parameters() < 1.5e6


def test_select_class_capsules():
    poses = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(1, 3, 2, 2, 2)[:, :, :, 0]
    # poses (1, 3, 2, 2): class k, dim d, voxel v
    index = torch.tensor([[2, 0]])
    picked = select_class_capsules(poses, index)
    torch.testing.assert_close(picked, torch.tensor([[[poses[0, 2, 0, 0], 0.0],
                                                      [poses[0, 2, 1, 0], 0.0]]]))
    picked_all = select_class_capsules(poses, index, foreground_only=False)
    torch.testing.assert_close(picked_all[0, :, 1], poses[0, 0, :, 1])


# ---------------------------------------------------------------- training
TRAIN_CASES = {
    "capsnet": (2, {"image_size": 20, **SMALL_CAPSNET}),
    "efficient_capsnet": (2, {"image_size": 20, "decoder_hidden": (32, 64)}),
    "segcaps": (2, {"width": 8}),
    "ucaps": (2, {}),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_a_few_adam_steps_lower_the_loss(name):
    torch.manual_seed(0)
    spatial_dims, config = TRAIN_CASES[name]
    model = get_model(name, spatial_dims, 1, 2, **config)
    if model.task == "classification":
        x = torch.rand(4, 1, 20, 20)
        target = torch.tensor([0, 1, 0, 1])
        x[target == 1, :, 5:15, 5:15] += 1.0
    else:
        x = torch.rand(2, 1, 16, 16) * 0.2
        target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
        target[0, 0, 4:10, 4:12] = 1
        target[1, 0, 8:14, 2:9] = 1
        x = x + target
    loss_fn = build_loss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(model.forward_train(x, target), target, x)
        loss.backward()
        assert _finite_grads(model)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(("name", "spatial_dims", "size"),
                         [("capsnet", 2, 20), ("efficient_capsnet", 2, 20), ("segcaps", 2, 16),
                          ("ucaps", 3, 8)])
def test_monai_meta_tensors_train(name, spatial_dims, size):
    from monai.data import MetaTensor

    config = {**SMALL_CAPSNET} if name == "capsnet" else {}
    if name == "efficient_capsnet":
        config = {"decoder_hidden": (8,)}
    if name == "segcaps":
        config = {"width": 4}
    if "capsnet" in name:
        config["image_size"] = size
    model = get_model(name, spatial_dims, 1, 2, **config)
    x = MetaTensor(torch.rand(2, 1, *(size,) * spatial_dims))
    if model.task == "classification":
        target = MetaTensor(torch.tensor([[0], [1]]))
    else:
        target = MetaTensor(torch.randint(0, 2, (2, 1, *(size,) * spatial_dims)).float())
    loss = build_loss(model)(model.forward_train(x, target), target, x)
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(model)
