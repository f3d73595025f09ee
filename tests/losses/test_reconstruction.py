import pytest
import torch

from capsmed.losses import MaskedReconstructionLoss, ReconstructionLoss


def test_reconstruction_loss_by_hand():
    image = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    recon = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    # summed squared errors: sample 0 -> 1, sample 1 -> 2
    loss = ReconstructionLoss(weight=0.5, reduction="none")(recon, image)
    torch.testing.assert_close(loss, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(ReconstructionLoss(weight=0.5)(recon, image), torch.tensor(0.75))
    torch.testing.assert_close(ReconstructionLoss(reduction="sum")(recon, image),
                               torch.tensor(0.0005 * 3))
    # flattened reconstructions are accepted
    torch.testing.assert_close(ReconstructionLoss()(recon.flatten(1), image),
                               ReconstructionLoss()(recon, image))


def test_masked_reconstruction_by_hand():
    image = torch.tensor([[[[2.0, 1.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    label = torch.tensor([[[[0, 1], [2, 0]]]])
    recon = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    # SegCaps: target image * mask = [[0, 1], [3, 0]]; errors 1, 0, 4, 0 -> mean 1.25
    loss = MaskedReconstructionLoss(weight=2.0)(recon, image, label)
    torch.testing.assert_close(loss, torch.tensor(2.5))
    # 3D-UCaps: only foreground (0 and 4 over 2 voxels) -> 2.0
    loss = MaskedReconstructionLoss(region="foreground")(recon, image, label[:, 0])
    torch.testing.assert_close(loss, torch.tensor(2.0))


def test_masked_reconstruction_without_foreground_is_zero_for_foreground_region():
    image = torch.rand(2, 1, 3, 3, 3)
    label = torch.zeros(2, 1, 3, 3, 3)
    loss = MaskedReconstructionLoss(region="foreground")(torch.rand_like(image), image, label)
    assert loss.item() == 0.0


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="weight"):
        ReconstructionLoss(weight=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        ReconstructionLoss(reduction="max")
    with pytest.raises(ValueError, match="region"):
        MaskedReconstructionLoss(region="inside")
    with pytest.raises(ValueError, match="does not match"):
        ReconstructionLoss()(torch.zeros(2, 5), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="label shape"):
        MaskedReconstructionLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
                                   torch.zeros(1, 2, 2, 2))
