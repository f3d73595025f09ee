"""Reconstruction regularisers of capsule networks (CapsNet, SegCaps, 3D-UCaps)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from capsmed.layers.tensors import plain_tensor

__all__ = ["MaskedReconstructionLoss", "ReconstructionLoss"]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum", "none")
_REGIONS = ("all", "foreground")


def _check_common(weight: float, reduction: str) -> None:
    if weight < 0:
        raise ValueError(f"weight must be >= 0; got {weight}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_pair(reconstruction: torch.Tensor, image: torch.Tensor) -> None:
    if reconstruction.shape[0] != image.shape[0] or reconstruction.numel() != image.numel():
        raise ValueError(
            f"reconstruction shape {tuple(reconstruction.shape)} does not match image shape "
            f"{tuple(image.shape)}"
        )


class ReconstructionLoss(nn.Module):
    """CapsNet reconstruction loss: weighted sum of squared errors per sample.

    ``weight * sum_i (reconstruction_i - image_i)^2`` over all pixels and channels of a sample, then
    reduced over the batch. Sabour et al. (2017) use ``weight = 0.0005`` so that the term does not
    dominate the margin loss on 28 x 28 MNIST digits (Efficient-CapsNet's 0.392 on the pixel mean is
    the same number: 0.0005 * 784).

    Args:
        weight: scale of the summed squared error, >= 0.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (per sample ``(B,)``).

    Raises:
        ValueError: when the weight is negative or the reduction unknown.

    """

    def __init__(self, weight: float = 0.0005, reduction: str = "mean") -> None:
        super().__init__()
        _check_common(weight, reduction)
        self.weight = float(weight)
        self.reduction = reduction

    def forward(self, reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            reconstruction: decoder output ``(B, C_in, *S)`` (or flattened ``(B, C_in * prod(S))``).
            image: input batch ``(B, C_in, *S)``.

        Returns:
            Scalar for ``"mean"`` / ``"sum"``; ``(B,)`` for ``"none"``.

        Raises:
            ValueError: when the two tensors hold different numbers of values per sample.

        """
        reconstruction, image = plain_tensor(reconstruction), plain_tensor(image)
        _check_pair(reconstruction, image)
        diff = reconstruction.reshape(image.shape[0], -1) - image.reshape(image.shape[0], -1)
        per_sample = self.weight * diff.pow(2).sum(dim=1)
        return _reduce(per_sample, self.reduction)

    def extra_repr(self) -> str:
        """Describe the settings in the module repr."""
        return f"weight={self.weight}, reduction={self.reduction!r}"


class MaskedReconstructionLoss(nn.Module):
    """Reconstruction of the input inside the labelled foreground (SegCaps, 3D-UCaps).

    The foreground mask ``M`` is ``label > 0`` (every non-background class), broadcast over image
    channels. Two regions are supported:

    - ``"all"`` (SegCaps, LaLonde and Bagci 2018): the decoder must reproduce ``image * M``
      everywhere, so the loss per sample is ``mean_i (reconstruction_i - image_i M_i)^2`` over all
      voxels and channels; background voxels must reconstruct to zero.
    - ``"foreground"`` (3D-UCaps, Nguyen et al. 2021): only foreground voxels count,
      ``sum_i M_i (reconstruction_i - image_i)^2 / (sum_i M_i + eps)`` (sums over voxels and
      channels), so a sample without foreground contributes 0.

    The result is multiplied by ``weight`` and reduced over the batch.

    Args:
        weight: scale of the per-sample mean squared error, >= 0.
        region: ``"all"`` or ``"foreground"``, see above.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (per sample ``(B,)``).

    Raises:
        ValueError: when the weight is negative, or the region or reduction unknown.

    """

    def __init__(self, weight: float = 1.0, region: str = "all", reduction: str = "mean") -> None:
        super().__init__()
        _check_common(weight, reduction)
        if region not in _REGIONS:
            raise ValueError(f"region must be one of {_REGIONS}; got {region!r}")
        self.weight = float(weight)
        self.region = region
        self.reduction = reduction

    def forward(
        self, reconstruction: torch.Tensor, image: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            reconstruction: decoder output ``(B, C_in, *S)``.
            image: input batch ``(B, C_in, *S)``.
            label: integer label map ``(B, 1, *S)`` or ``(B, *S)``; 0 is background.

        Returns:
            Scalar for ``"mean"`` / ``"sum"``; ``(B,)`` for ``"none"``.

        Raises:
            ValueError: when shapes do not match.

        """
        reconstruction, image, label = (plain_tensor(t) for t in (reconstruction, image, label))
        if reconstruction.shape != image.shape:
            raise ValueError(
                f"reconstruction shape {tuple(reconstruction.shape)} does not match image shape "
                f"{tuple(image.shape)}"
            )
        if label.dim() == image.dim() - 1:
            label = label.unsqueeze(1)
        if label.dim() != image.dim() or label.shape[1] != 1 or label.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"label shape {tuple(label.shape)} does not fit image shape {tuple(image.shape)}: "
                "expected (B, 1, *S) or (B, *S)"
            )
        mask = (label > 0).to(image.dtype).expand_as(image)
        batch = image.shape[0]
        if self.region == "all":
            per_sample = (reconstruction - image * mask).pow(2).reshape(batch, -1).mean(dim=1)
        else:
            squared = ((reconstruction - image).pow(2) * mask).reshape(batch, -1).sum(dim=1)
            per_sample = squared / (mask.reshape(batch, -1).sum(dim=1) + 1e-8)
        return _reduce(self.weight * per_sample, self.reduction)

    def extra_repr(self) -> str:
        """Describe the settings in the module repr."""
        return f"weight={self.weight}, region={self.region!r}, reduction={self.reduction!r}"
