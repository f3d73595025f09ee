import pytest
import torch

from capsmed.losses import SpreadClassificationLoss, SpreadLoss, build_loss
from capsmed.models import get_model


def test_spread_loss_by_hand():
    acts = torch.tensor([[0.9, 0.5, 0.85], [0.1, 0.3, 0.2]])
    target = torch.tensor([0, 2])
    loss = SpreadLoss(reduction="none")  # margin 0.2 before any progress
    # sample 0: a_t = 0.9; class 1: max(0, 0.2 - 0.4) = 0; class 2: (0.2 - 0.05)^2 = 0.0225
    # sample 1: a_t = 0.2; class 0: (0.2 - 0.1)^2 = 0.01; class 1: (0.2 + 0.1)^2 = 0.09
    expected = torch.tensor([0.0225, 0.10])
    torch.testing.assert_close(loss(acts, target), expected)
    torch.testing.assert_close(SpreadLoss()(acts, target), expected.mean())
    torch.testing.assert_close(SpreadLoss(reduction="sum")(acts, target), expected.sum())


def test_margin_anneals_linearly_from_0_2_to_0_9():
    loss = SpreadLoss()
    assert loss.margin == pytest.approx(0.2)
    loss.set_progress(0.5)
    assert loss.margin == pytest.approx(0.55)
    loss.set_progress(1.0)
    assert loss.margin == pytest.approx(0.9)
    acts = torch.tensor([[0.9, 0.5]])
    torch.testing.assert_close(loss(acts, torch.tensor([0])), torch.tensor(0.25))  # (0.9-0.4)^2


def test_one_hot_and_index_targets_agree_and_per_voxel():
    torch.manual_seed(0)
    acts = torch.rand(2, 3, 4, 5)
    label = torch.randint(0, 3, (2, 4, 5))
    one_hot = torch.nn.functional.one_hot(label, 3).movedim(-1, 1)
    loss = SpreadLoss(reduction="none")
    torch.testing.assert_close(loss(acts, label), loss(acts, one_hot))
    assert loss(acts, label).shape == (2, 4, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"m_min": 0.0}, "m_min must lie in"), ({"m_max": 0.1}, "m_max must lie in"),
     ({"reduction": "max"}, "reduction must be one of")],
)
def test_spread_loss_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpreadLoss(**kwargs)


def test_progress_out_of_range():
    with pytest.raises(ValueError, match="progress must lie in"):
        SpreadLoss().set_progress(1.5)


def test_build_loss_picks_spread_for_em_classifier():
    model = get_model("emcapsnet", 2, 1, 3, conv_channels=4, primary_capsules=2, capsules=(2, 2))
    loss_fn = build_loss(model, spread_m_min=0.3, spread_m_max=0.6, spread_weight=2.0)
    assert isinstance(loss_fn, SpreadClassificationLoss)
    x, target = torch.rand(2, 1, 16, 16), torch.tensor([0, 2])
    out = model.forward_train(x, target)
    loss_fn.set_progress(1.0)
    expected = 2.0 * SpreadLoss(0.6, 0.6)(out["scores"], target)
    torch.testing.assert_close(loss_fn(out, target, x), expected)
    assert set(loss_fn.last_terms) == {"spread"}


def test_class_weights_give_a_weighted_mean():
    acts = torch.tensor([[0.9, 0.5, 0.85], [0.1, 0.3, 0.2]])
    target = torch.tensor([0, 2])
    loss_fn = SpreadClassificationLoss(SpreadLoss(), class_weights=torch.tensor([1.0, 1.0, 3.0]))
    # per sample 0.0225 (weight 1) and 0.10 (weight 3)
    torch.testing.assert_close(loss_fn({"scores": acts}, target, acts),
                               torch.tensor((0.0225 + 3 * 0.10) / 4))


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"spread_m_min": 0.5, "spread_m_max": 0.4}, "spread margins must satisfy"),
     ({"spread_weight": -1.0}, "spread_weight must be >= 0")],
)
def test_build_loss_spread_errors(weights, message):
    model = get_model("emcapsnet", 2, 1, 3, conv_channels=4, primary_capsules=2, capsules=(2, 2))
    with pytest.raises(ValueError, match=message):
        build_loss(model, **weights)
