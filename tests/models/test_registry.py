import inspect

import pytest
import torch

from capsmed.models import MODEL_REGISTRY, CapsmedModel, describe_models, get_model, list_models

EXPECTED = {"capsnet", "efficient_capsnet", "rescapsnet", "densecapsnet", "segcaps", "ucaps",
            "capsunet", "emcapsnet", "emcapsunet", "seed_cnn", "unet", "densenet"}


def test_list_models_has_every_model():
    assert set(list_models()) == EXPECTED
    assert list_models() == sorted(list_models())
    assert all(issubclass(cls, CapsmedModel) for cls in MODEL_REGISTRY.values())


def test_class_attributes_follow_the_contract():
    for name, cls in MODEL_REGISTRY.items():
        assert cls.task in ("classification", "segmentation"), name
        assert cls.output_kind in ("logits", "lengths"), name
        if cls.task == "segmentation":
            assert cls.size_divisible > 1, name
        assert cls.__doc__ and ("logits" in cls.__doc__ or "lengths" in cls.__doc__), name


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet'") as info:
        get_model("resnet", 2, 1, 2)
    for name in EXPECTED:
        assert name in str(info.value)


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ValueError, match="does not take option") as info:
        get_model("unet", 2, 1, 2, depth=5)
    assert "channels" in str(info.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [((4, 1, 2), "spatial_dims"), ((2, 0, 2), "in_channels"), ((2, 1, 1), "out_channels")],
)
def test_bad_constructor_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        get_model("seed_cnn", *args)


def test_describe_models_rows():
    rows = describe_models()
    assert [row["name"] for row in rows] == sorted(EXPECTED)
    for row in rows:
        assert set(row) == {"name", "task", "kind", "params_2d", "params_3d", "summary"}
        assert row["params_2d"] > 0 and row["params_3d"] > 0
        assert row["summary"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["segcaps"]["kind"] == "lengths"
    assert by_name["unet"]["task"] == "segmentation"


def test_describe_counts_match_real_models():
    row = next(r for r in describe_models() if r["name"] == "unet")
    assert row["params_3d"] == get_model("unet", 3, 1, 3).num_parameters()
    assert isinstance(get_model("unet", 2, 1, 2).net.model[0], torch.nn.Module)


def test_model_arguments_are_the_defaults_then_the_given_options():
    from capsmed.models import model_arguments
    from capsmed.models.capsunet import CapsUNet

    args = model_arguments("capsunet", {"routing_iterations": 1})
    assert args["routing_iterations"] == 1
    assert args["capsule_block"] == "capsule"  # the class default
    defaults = inspect.signature(CapsUNet.__init__).parameters
    assert args["encoder_channels"] == list(defaults["encoder_channels"].default)  # JSON-plain
    assert set(args) == {k for k in defaults if k not in (
        "self", "spatial_dims", "in_channels", "out_channels")}
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        model_arguments("resnet")
