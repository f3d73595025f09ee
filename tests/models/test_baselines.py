import pytest
import torch

from capsmed.models import get_model


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("image_size", [28, 20])
def test_seed_cnn_shapes(spatial_dims, image_size):
    model = get_model("seed_cnn", spatial_dims, 2, 5, image_size=image_size,
                      channels=8 if spatial_dims == 3 else 64)
    x = torch.rand(3, 2, *(image_size,) * spatial_dims)
    scores = model(x)
    assert scores.shape == (3, 5)
    probs = model.probabilities(scores)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert model.fixed_size and model.input_size() == (image_size,) * spatial_dims
    assert model.forward_train(x).keys() == {"scores"}
    assert model.extra_outputs(x) == {}


def test_seed_cnn_wrong_size_is_a_clear_error():
    model = get_model("seed_cnn", 2, 1, 2)
    with pytest.raises(ValueError, match=r"built for inputs of size \(28, 28\)"):
        model(torch.rand(1, 1, 27, 28))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="spatial axes"):
        model(torch.rand(1, 1, 28, 28, 28))


def test_seed_cnn_paper_layout_parameter_count():
    model = get_model("seed_cnn", 2, 1, 10)
    # conv 1->64 (640) + conv 64->64 (36928) + dense 64*24*24 -> 10 (368650)
    assert model.num_parameters() == 640 + 36928 + 64 * 24 * 24 * 10 + 10


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (48, 32)), (3, (16, 48, 32))])
def test_unet_shapes_and_divisibility(spatial_dims, size):
    model = get_model("unet", spatial_dims, 1, 3, channels=(4, 8, 16, 32, 64))
    assert model.size_divisible == 16
    x = torch.rand(2, 1, *size)
    scores = model(x)
    assert scores.shape == (2, 3, *size)
    torch.testing.assert_close(model.probabilities(scores).sum(1), torch.ones(2, *size))
    bad = (17,) + size[1:]
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(1, 1, *bad))


def test_unet_options_change_size_divisible():
    model = get_model("unet", 2, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    assert model.size_divisible == 4
    assert model(torch.rand(1, 1, 12, 20)).shape == (1, 2, 12, 20)
    with pytest.raises(ValueError, match="strides"):
        get_model("unet", 2, 1, 2, channels=(4, 8, 16), strides=(2,))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_densenet_shapes(spatial_dims):
    model = get_model("densenet", spatial_dims, 1, 4, init_features=8, growth_rate=4,
                      block_config=(2, 2, 2))
    assert model.min_size == 13
    for size in (28, 20, 13):
        assert model(torch.rand(2, 1, *(size,) * spatial_dims)).shape == (2, 4)
    with pytest.raises(ValueError, match=">= 13"):
        model(torch.rand(2, 1, *(12,) * spatial_dims))


def test_densenet121_needs_29_voxels():
    model = get_model("densenet", 2, 1, 2)
    assert model.min_size == 29
    model.eval()
    assert model(torch.rand(1, 1, 29, 33)).shape == (1, 2)
    with pytest.raises(ValueError, match=">= 29"):
        model(torch.rand(1, 1, 28, 28))
