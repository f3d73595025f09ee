"""Every constructor check raises ValueError naming the broken rule."""

import pytest

from capsmed.layers import ConvCapsule, ConvTransposeCapsule, DenseCapsule, PrimaryCapsule

CONV_ARGS = {"spatial_dims": 2, "in_capsules": 2, "in_dim": 3, "out_capsules": 4, "out_dim": 5}
DENSE_ARGS = {"in_capsules": 2, "in_dim": 3, "out_capsules": 4, "out_dim": 5}
PRIMARY_ARGS = {"spatial_dims": 2, "in_channels": 1, "capsules": 4, "capsule_dim": 8}


@pytest.mark.parametrize("cls", [ConvCapsule, ConvTransposeCapsule])
@pytest.mark.parametrize(
    "override, message",
    [
        ({"spatial_dims": 4}, r"spatial_dims must be 1, 2 or 3, got 4"),
        ({"spatial_dims": True}, r"spatial_dims must be 1, 2 or 3, got True"),
        ({"in_capsules": 0}, r"in_capsules must be >= 1, got 0"),
        ({"in_dim": -1}, r"in_dim must be >= 1, got -1"),
        ({"out_capsules": 0}, r"out_capsules must be >= 1, got 0"),
        ({"out_dim": 2.5}, r"out_dim must be an integer >= 1, got 2.5"),
        ({"kernel_size": 0}, r"kernel_size must be >= 1, got 0"),
        ({"kernel_size": (3, 3, 3)}, r"kernel_size must be an int or a sequence of spatial_dims=2"),
        ({"stride": 0}, r"stride must be >= 1, got 0"),
        ({"padding": -1}, r"padding must be >= 0, got -1"),
        ({"routing_iterations": 0}, r"routing_iterations must be >= 1, got 0"),
        ({"agreement": "l1"}, r"agreement must be one of \('dot', 'cosine'\), got 'l1'"),
        ({"shared_votes": 1}, r"shared_votes must be a bool, got 1"),
        ({"bias": "yes"}, r"bias must be a bool, got 'yes'"),
    ],
)
def test_conv_capsule_argument_errors(cls, override, message):
    with pytest.raises(ValueError, match=message):
        cls(**{**CONV_ARGS, **override})


def test_conv_transpose_output_padding_errors():
    with pytest.raises(ValueError, match=r"output_padding must be < stride in every dim"):
        ConvTransposeCapsule(**CONV_ARGS, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"output_padding must be >= 0, got -1"):
        ConvTransposeCapsule(**CONV_ARGS, output_padding=-1)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"in_capsules": 0}, r"in_capsules must be >= 1, got 0"),
        ({"in_dim": 0}, r"in_dim must be >= 1, got 0"),
        ({"out_capsules": -3}, r"out_capsules must be >= 1, got -3"),
        ({"out_dim": None}, r"out_dim must be an integer >= 1, got None"),
        ({"routing_iterations": 0}, r"routing_iterations must be >= 1, got 0"),
        ({"routing": "em"}, r"routing must be one of \('dynamic', 'attention'\), got 'em'"),
        ({"bias": 0}, r"bias must be a bool, got 0"),
        ({"agreement": "dotx"}, r"agreement must be one of \('dot', 'cosine'\), got 'dotx'"),
        ({"detach_logits": "no"}, r"detach_logits must be a bool, got 'no'"),
    ],
)
def test_dense_capsule_argument_errors(override, message):
    with pytest.raises(ValueError, match=message):
        DenseCapsule(**{**DENSE_ARGS, **override})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"spatial_dims": 0}, r"spatial_dims must be 1, 2 or 3, got 0"),
        ({"in_channels": 0}, r"in_channels must be >= 1, got 0"),
        ({"capsules": 0}, r"capsules must be >= 1, got 0"),
        ({"capsule_dim": 0}, r"capsule_dim must be >= 1, got 0"),
        ({"kernel_size": (9,)}, r"kernel_size must be an int or a sequence of spatial_dims=2"),
        ({"stride": -2}, r"stride must be >= 1, got -2"),
        ({"padding": (0, -1)}, r"padding must be >= 0, got -1"),
        ({"squash": "sabour"}, r"squash must be True, False or 'efficient', got 'sabour'"),
        ({"squash": 1}, r"squash must be True, False or 'efficient', got 1"),
    ],
)
def test_primary_capsule_argument_errors(override, message):
    with pytest.raises(ValueError, match=message):
        PrimaryCapsule(**{**PRIMARY_ARGS, **override})
