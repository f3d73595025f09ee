"""CapsUNet and ResCapsNet: shapes at odd sizes, budgets against the baselines, ablations, errors."""

import pytest
import torch

from capsmed.layers import GridCapsule
from capsmed.losses import build_loss
from capsmed.models import get_model
from capsmed.train.loop import estimate_flops

UNET_HIPPOCAMPUS = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}
DENSENET_ADRENAL = {"init_features": 16, "growth_rate": 8, "block_config": (4, 8, 6)}


def _finite_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- CapsUNet
@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (24, 40)), (3, (16, 40, 24))])
def test_capsunet_shapes_and_loss(spatial_dims, size):
    torch.manual_seed(0)
    model = get_model("capsunet", spatial_dims, 2, 3)
    assert model.size_divisible == 8 and model.output_kind == "logits"
    x = torch.rand(2, 2, *size)
    scores = model(x)
    assert scores.shape == (2, 3, *size)
    target = torch.randint(0, 3, (2, 1, *size))
    out = model.forward_train(x, target)
    coarse = tuple(s // 8 for s in size)
    assert out.keys() == {"scores", "coarse_lengths"}
    assert out["coarse_lengths"].shape == (2, 3, *coarse)
    assert ((out["coarse_lengths"] >= 0) & (out["coarse_lengths"] < 1)).all()
    assert model.extra_outputs(x)["coarse_lengths"].shape == (2, 3, *coarse)
    loss_fn = build_loss(model)
    loss = loss_fn(out, target, x)
    assert set(loss_fn.last_terms) == {"dice_ce", "margin"}  # the class capsules are supervised
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(model)


def test_capsunet_rejects_sizes_not_divisible_by_8():
    model = get_model("capsunet", 3, 1, 2)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 1, 16, 20, 16))


def test_capsunet_budget_against_the_unet():
    """At a 32^3 patch: at most 1M parameters and at most the UNet's forward FLOPs."""
    caps = get_model("capsunet", 3, 1, 3)
    unet = get_model("unet", 3, 1, 3, **UNET_HIPPOCAMPUS)
    assert caps.num_parameters() <= 1_000_000
    assert caps.num_parameters() < unet.num_parameters() / 5
    assert estimate_flops(caps, 1, [32, 32, 32]) <= estimate_flops(unet, 1, [32, 32, 32])


def test_capsunet_ablations_cost_the_same():
    base = get_model("capsunet", 3, 1, 3)
    one = get_model("capsunet", 3, 1, 3, routing_iterations=1)
    conv = get_model("capsunet", 3, 1, 3, capsule_block="conv")
    assert one.num_parameters() == base.num_parameters()
    # the convolution stand-in has the vote weights exactly; its norm and PReLU add a few
    extra = conv.num_parameters() - base.num_parameters()
    assert 0 <= extra < 0.001 * base.num_parameters()
    flops = [estimate_flops(m, 1, [32, 32, 32]) for m in (base, conv)]
    assert abs(flops[1] - flops[0]) < 0.01 * flops[0]
    vote_weights = [m.conv.weight.numel() for m in base.capsules]
    conv_weights = [m.conv.weight.numel() for m in conv.capsules]
    assert conv_weights == vote_weights
    # the CNN ablation has no capsules: Dice-CE alone
    x = torch.rand(1, 1, 16, 16, 16)
    assert conv.forward_train(x).keys() == {"scores"} and conv.extra_outputs(x) == {}
    loss_fn = build_loss(conv)
    loss_fn(conv.forward_train(x), torch.zeros(1, 1, 16, 16, 16, dtype=torch.long), x)
    assert set(loss_fn.last_terms) == {"dice_ce"}


def test_capsunet_couplings_sum_to_one_over_outputs():
    torch.manual_seed(0)
    model = get_model("capsunet", 2, 1, 3).eval()
    feats, couplings = model.encode(torch.rand(1, 1, 32, 24), return_coupling=True)
    assert [tuple(c.shape) for c in couplings] == [(1, 8, 8, 4, 3), (1, 8, 3, 4, 3)]
    for c in couplings:
        torch.testing.assert_close(c.sum(2), torch.ones_like(c.sum(2)))
    _, none = get_model("capsunet", 2, 1, 3, routing_iterations=1).encode(
        torch.rand(1, 1, 32, 24), return_coupling=True)
    torch.testing.assert_close(none[0], torch.full_like(none[0], 1 / 8))
    conv = get_model("capsunet", 2, 1, 3, capsule_block="conv")
    with pytest.raises(ValueError, match="no couplings"):
        conv.encode(torch.rand(1, 1, 16, 16), return_coupling=True)


def test_capsunet_vote_weights_are_he_normal():
    torch.manual_seed(0)
    model = get_model("capsunet", 3, 1, 3)
    layer = model.capsules[1]  # 8 x 16D -> 3 x 16D, 3^3 kernels: fan-in 16 * 27
    std = float(layer.conv.weight.detach().std())
    assert abs(std - (2.0 / (16 * 27)) ** 0.5) < 0.05 * std


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"encoder_channels": (16,)}, "encoder_channels must list 2"),
     ({"decoder_channels": (8, 8)}, "decoder_channels must list 3"),
     ({"capsules": 0}, "must be >= 1"),
     ({"capsule_block": "mlp"}, "capsule_block must be one of capsule, conv"),
     ({"agreement": "euclid"}, "agreement")],
)
def test_capsunet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_model("capsunet", 3, 1, 3, **kwargs)


def test_capsunet_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = get_model("capsunet", 2, 1, 2)
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[0, 0, 4:10, 4:12] = 1
    target[1, 0, 8:14, 2:9] = 1
    x = torch.rand(2, 1, 16, 16) * 0.2 + target
    loss_fn = build_loss(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model.forward_train(x, target), target, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- ResCapsNet
@pytest.mark.parametrize(("spatial_dims", "size", "grid"), [(2, 28, 7), (2, 21, 6), (3, 28, 4),
                                                            (3, 15, 2)])
def test_rescapsnet_shapes(spatial_dims, size, grid):
    torch.manual_seed(0)
    model = get_model("rescapsnet", spatial_dims, 1, 3, image_size=size)
    assert model.grid_size == grid and model.num_primary == 16 * grid**spatial_dims
    x = torch.rand(2, 1, *[size] * spatial_dims)
    lengths = model(x)
    assert lengths.shape == (2, 3) and ((lengths >= 0) & (lengths < 1)).all()
    out = model.forward_train(x, torch.tensor([0, 2]))
    assert out.keys() == {"scores", "lengths", "poses"}  # no decoder by default
    assert model.extra_outputs(x).keys() == {"lengths"}
    loss_fn = build_loss(model)
    loss = loss_fn(out, torch.tensor([0, 2]), x)
    assert set(loss_fn.last_terms) == {"margin"}
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(model)
    couplings = model.couplings(x)
    assert couplings.shape == (2, model.num_primary, 3)
    torch.testing.assert_close(couplings.sum(-1), torch.ones(2, model.num_primary))


def test_rescapsnet_with_decoder_reconstructs():
    model = get_model("rescapsnet", 2, 1, 2, decoder_hidden=(16, 32))
    x = torch.rand(2, 1, 28, 28)
    out = model.forward_train(x, torch.tensor([0, 1]))
    assert out["reconstruction"].shape == x.shape
    loss_fn = build_loss(model)
    loss_fn(out, torch.tensor([0, 1]), x)
    assert set(loss_fn.last_terms) == {"margin", "reconstruction"}


def test_rescapsnet_budgets():
    """2D: about 0.5M parameters and 60 MFLOPs; 3D: under 1M and within 2x the DenseNet's FLOPs."""
    two = get_model("rescapsnet", 2, 1, 2)
    assert 0.4e6 < two.num_parameters() < 0.7e6
    assert 40e6 < estimate_flops(two, 1, [28, 28]) < 80e6
    three = get_model("rescapsnet", 3, 1, 2)
    dense = get_model("densenet", 3, 1, 2, **DENSENET_ADRENAL)
    assert three.num_parameters() < 1_000_000
    assert estimate_flops(three, 1, [28] * 3) <= 2 * estimate_flops(dense, 1, [28] * 3)
    capsnet = get_model("capsnet", 3, 1, 2)
    assert three.num_parameters() < capsnet.num_parameters() / 20


def test_rescapsnet_linear_ablation_costs_the_same():
    base = get_model("rescapsnet", 2, 1, 2)
    linear = get_model("rescapsnet", 2, 1, 2, capsule_block="linear")
    one = get_model("rescapsnet", 2, 1, 2, routing_iterations=1)
    assert base.num_parameters() == linear.num_parameters() == one.num_parameters()
    assert linear.digits.linear.weight.numel() == base.digits.weight.numel()
    with pytest.raises(ValueError, match="no couplings"):
        linear.couplings(torch.rand(1, 1, 28, 28))
    attention = get_model("rescapsnet", 2, 1, 2, routing="attention")
    assert attention.couplings(torch.rand(1, 1, 28, 28)).shape == (1, 784, 2)


def test_rescapsnet_one_iteration_is_the_linear_block_with_weights_over_j():
    """routing_iterations=1 and capsule_block='linear' are one function (``W / J``), in float64."""
    torch.manual_seed(1)
    one = get_model("rescapsnet", 2, 1, 3, routing_iterations=1).double().eval()
    linear = get_model("rescapsnet", 2, 1, 3, capsule_block="linear").double().eval()
    linear.load_state_dict({k: v for k, v in one.state_dict().items() if not k.startswith("digits")},
                           strict=False)
    w = one.digits.weight  # (I, J, Dout, Din)
    i, j, d_out, d_in = w.shape
    with torch.no_grad():
        linear.digits.linear.weight.copy_(w.permute(1, 2, 0, 3).reshape(j * d_out, i * d_in) / j)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(linear.class_capsules(x), one.class_capsules(x))


@pytest.mark.parametrize("name", ["rescapsnet", "densecapsnet"])
def test_classifiers_cosine_agreement_costs_the_same(name):
    dot = get_model(name, 3, 1, 2)
    cosine = get_model(name, 3, 1, 2, agreement="cosine")
    assert dot.digits.agreement == "dot" and cosine.digits.agreement == "cosine"
    assert cosine.num_parameters() == dot.num_parameters()
    size = [28] * 3
    assert estimate_flops(cosine, 1, size) == estimate_flops(dot, 1, size)
    x = torch.rand(2, 1, *size)
    out = cosine.forward_train(x, torch.tensor([0, 1]))
    build_loss(cosine)(out, torch.tensor([0, 1]), x).backward()
    assert _finite_grads(cosine)
    torch.testing.assert_close(cosine.couplings(x).sum(-1), torch.ones(2, cosine.num_primary))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rescapsnet_per_type_votes_share_weights_across_positions(spatial_dims):
    torch.manual_seed(0)
    base = get_model("rescapsnet", spatial_dims, 1, 2)
    shared = get_model("rescapsnet", spatial_dims, 1, 2, vote_weights="per_type")
    assert isinstance(shared.digits, GridCapsule)
    # the front end is the same; the class layer keeps one transformation per type, not per capsule
    assert base.num_parameters() - base.digits.weight.numel() == (
        shared.num_parameters() - shared.digits.weight.numel())
    assert shared.digits.weight.numel() == base.digits.weight.numel() // base.grid_size**spatial_dims
    size = [28] * spatial_dims
    assert estimate_flops(shared, 1, size) == estimate_flops(base, 1, size)
    x = torch.rand(2, 1, *size)
    couplings = shared.couplings(x)
    assert couplings.shape == (2, shared.num_primary, 2)
    # capsule n = type * G + position in both layouts
    flat = shared.primary_capsules(x)
    grid = shared._digit_inputs(x).flatten(3)
    positions = grid.shape[-1]
    torch.testing.assert_close(flat[:, 3], grid[:, 0, :, 3])
    torch.testing.assert_close(flat[:, 5 * positions + 1], grid[:, 5, :, 1])
    out = shared.forward_train(x, torch.tensor([0, 1]))
    build_loss(shared)(out, torch.tensor([0, 1]), x).backward()
    assert _finite_grads(shared)


def test_rescapsnet_batch_norm_front_end():
    model = get_model("rescapsnet", 3, 1, 2, norm="batch", vote_weights="per_type")
    norms = {type(m).__name__ for m in model.features.modules()}
    assert "BatchNorm3d" in norms and "InstanceNorm3d" not in norms
    assert "InstanceNorm3d" in {type(m).__name__ for m in get_model("rescapsnet", 3, 1, 2).modules()}
    model.eval()
    assert model(torch.rand(1, 1, 28, 28, 28)).shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"channels": ()}, "channels must list"), ({"stem_stride": 3}, "stem_stride"),
     ({"routing": "em"}, "routing must be"), ({"capsule_block": "conv"}, "capsule_block must be"),
     ({"vote_weights": "per_position"}, "vote_weights must be one of per_capsule, per_type"),
     ({"vote_weights": "per_type", "capsule_block": "linear"}, "its fixed-weight ablation is"),
     ({"vote_weights": "per_type", "routing": "attention"}, "routes dynamically"),
     ({"norm": "group"}, "norm must be one of instance, batch"),
     ({"agreement": "l2"}, "agreement must be one of dot, cosine"),
     ({"agreement": "cosine", "capsule_block": "linear"}, "an option of dynamic routing"),
     ({"agreement": "cosine", "routing": "attention"}, "an option of dynamic routing"),
     ({"image_size": 6}, "image_size must be >= 8"), ({"class_dim": 0}, "must be >= 1")],
)
def test_rescapsnet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_model("rescapsnet", 2, 1, 2, **kwargs)


def test_ucaps_paper_configuration_of_the_example_builds():
    """The example config's 3D-UCaps at the paper's widths, one vote kernel per input type."""
    import yaml

    from tests.conftest import REPO_ROOT

    cfg = yaml.safe_load((REPO_ROOT / "config/examples/msd_hippocampus.yaml").read_text())
    args = cfg["models"]["ucaps"]["args"]
    with torch.device("meta"):
        paper = get_model("ucaps", 3, 1, 3, **args)
        narrow = get_model("ucaps", 3, 1, 3)
    assert not paper.encoder[0].shared_votes and narrow.encoder[0].shared_votes
    assert paper.num_parameters() > 5 * narrow.num_parameters()


# ---------------------------------------------------------------- DenseCapsNet
@pytest.mark.parametrize(("spatial_dims", "size", "grid"), [(2, 28, 3), (2, 33, 4), (3, 28, 3),
                                                            (3, 17, 2)])
def test_densecapsnet_shapes_odd_sizes(spatial_dims, size, grid):
    torch.manual_seed(0)
    model = get_model("densecapsnet", spatial_dims, 1, 3, image_size=size)
    assert model.grid_size == grid and model.num_primary == 16 * grid**spatial_dims
    x = torch.rand(2, 1, *[size] * spatial_dims)
    lengths = model(x)
    assert lengths.shape == (2, 3) and ((lengths >= 0) & (lengths < 1)).all()
    out = model.forward_train(x, torch.tensor([0, 2]))
    loss_fn = build_loss(model)
    loss_fn(out, torch.tensor([0, 2]), x).backward()
    assert set(loss_fn.last_terms) == {"margin"} and _finite_grads(model)
    couplings = model.couplings(x)
    torch.testing.assert_close(couplings.sum(-1), torch.ones(2, model.num_primary))


def test_densecapsnet_is_the_densenet_baseline_with_a_capsule_head():
    """Same front end as the DenseNet of the AdrenalMNIST3D example; its FLOPs, fewer weights."""
    caps = get_model("densecapsnet", 3, 1, 2)
    dense = get_model("densenet", 3, 1, 2, **DENSENET_ADRENAL)
    front = caps.features[0]
    assert [n for n, _ in front.named_children()] == [
        "conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "norm5"]
    shared = {k: v.shape for k, v in front.state_dict().items() if not k.startswith("norm5")}
    theirs = {k: v.shape for k, v in dense.net.features.state_dict().items() if k in shared}
    assert theirs == shared  # the DenseNet's first two blocks, layer for layer
    assert isinstance(caps.digits, GridCapsule) and caps.num_parameters() < dense.num_parameters()
    flops, dense_flops = (estimate_flops(m, 1, [28] * 3) for m in (caps, dense))
    assert 0.9 * dense_flops < flops < 1.1 * dense_flops
    one = get_model("densecapsnet", 3, 1, 2, routing_iterations=1)
    assert one.num_parameters() == caps.num_parameters()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"block_config": ()}, "block_config must list"), ({"growth_rate": 0}, "growth_rate"),
     ({"image_size": 12}, "image_size must be >= 16"), ({"primary_dim": 0}, "must be >= 1"),
     ({"capsule_block": "linear"}, "its fixed-weight ablation is"),
     ({"vote_weights": "shared"}, "vote_weights must be one of"),
     ({"block_config": (2, 2, 2, 2, 2), "image_size": 16}, "leaves no grid")],
)
def test_densecapsnet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_model("densecapsnet", 2, 1, 2, **kwargs)
