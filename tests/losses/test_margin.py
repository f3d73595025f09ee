import pytest
import torch

from capsmed.losses import MarginLoss, as_one_hot


def test_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.30, 0.05], [0.50, 0.20, 0.80]])
    target = torch.tensor([0, 2])
    # sample 0: present 0 (0.95 > 0.9); absent 0.5 * (0.30 - 0.1)^2 = 0.02; 0.05 < 0.1 -> 0
    # sample 1: present (0.9 - 0.8)^2 = 0.01; absent 0.5 * ((0.5 - 0.1)^2 + (0.2 - 0.1)^2) = 0.085
    expected = torch.tensor([0.02, 0.095])
    per_sample = MarginLoss(reduction="none")(lengths, target)
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(MarginLoss()(lengths, target), expected.mean())
    torch.testing.assert_close(MarginLoss(reduction="sum")(lengths, target), expected.sum())


def test_margin_loss_custom_margins_by_hand():
    lengths = torch.tensor([[0.6, 0.4]])
    loss = MarginLoss(m_plus=0.8, m_minus=0.2, lambda_=1.0)(lengths, torch.tensor([1]))
    # present class 1: (0.8 - 0.4)^2 = 0.16; absent class 0: (0.6 - 0.2)^2 = 0.16
    torch.testing.assert_close(loss, torch.tensor(0.32))


def test_index_and_one_hot_targets_agree():
    torch.manual_seed(0)
    lengths = torch.rand(5, 4)
    index = torch.tensor([0, 3, 1, 1, 2])
    one_hot = torch.nn.functional.one_hot(index, 4)
    loss = MarginLoss()
    torch.testing.assert_close(loss(lengths, index), loss(lengths, one_hot))
    torch.testing.assert_close(loss(lengths, index), loss(lengths, one_hot.float()))
    torch.testing.assert_close(loss(lengths, index), loss(lengths, index[:, None]))


def test_segmentation_shapes_average_over_voxels():
    torch.manual_seed(0)
    lengths = torch.rand(2, 3, 4, 5, 6)
    label = torch.randint(0, 3, (2, 4, 5, 6))
    loss = MarginLoss(reduction="none")
    per_voxel = loss(lengths, label)
    assert per_voxel.shape == (2, 4, 5, 6)
    # each voxel is a classification problem
    flat = lengths.movedim(1, -1).reshape(-1, 3)
    torch.testing.assert_close(per_voxel.reshape(-1), loss(flat, label.reshape(-1)))
    mean = MarginLoss()(lengths, label)
    torch.testing.assert_close(mean, per_voxel.mean())
    torch.testing.assert_close(MarginLoss()(lengths, label[:, None].float()), mean)
    one_hot = torch.nn.functional.one_hot(label, 3).movedim(-1, 1)
    torch.testing.assert_close(MarginLoss()(lengths, one_hot), mean)


def test_perfect_prediction_has_zero_loss_and_gradients_are_finite():
    lengths = torch.tensor([[0.95, 0.05], [0.0, 0.92]], requires_grad=True)
    loss = MarginLoss()(lengths, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(lengths.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m_plus": 0.0}, "m_plus"),
        ({"m_plus": 1.5}, "m_plus"),
        ({"m_minus": 0.95}, "m_minus"),
        ({"m_minus": -0.1}, "m_minus"),
        ({"lambda_": -1.0}, "lambda_"),
        ({"reduction": "avg"}, "reduction"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MarginLoss(**kwargs)


def test_bad_targets():
    lengths = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        MarginLoss()(lengths, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="does not fit"):
        MarginLoss()(lengths, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="whole numbers"):
        MarginLoss()(lengths, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MarginLoss()(lengths, torch.full((2, 3), 2.0))


def test_as_one_hot_layouts():
    scores = torch.zeros(2, 3, 4)
    expected = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]]), 3)
    expected = expected.movedim(-1, 1).float()
    label = expected.argmax(1)
    torch.testing.assert_close(as_one_hot(label, scores), expected)
    torch.testing.assert_close(as_one_hot(label[:, None].double(), scores), expected)
    torch.testing.assert_close(as_one_hot(expected, scores), expected)
